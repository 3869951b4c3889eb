"""NormalizedDPOTrainer under DDP, ZeRO-2, ZeRO-3 and FSDP2: 2 CPU processes over gloo, against 1 process and
under faults.

Per engine, two ``accelerate launch`` runs of tests/dist_harness.py: ``kill`` (rank 1 SIGKILLs itself while
saving checkpoint-4, after checkpoint-2) and ``main`` (separate reference with a checkpoint and a final save, the
LoRA adapter reference, precompute_ref_logps under ZeRO; the resume of the killed run; NaN on rank 1 in both
nonfinite_loss modes; then one process raising or hanging, which ends the launch).

Against the 1-process run on the same global batch of 4 pairs (SGD with momentum, 4 steps, losses moving
from ln 2 to about 0.04-0.09): every per-step loss within 1e-5; the reference's per-pair log-prob sums
equal the unsharded reference's within 1e-5; under ZeRO-3 and FSDP2 each rank stores exactly its shard of
the reference; the saved model loads with from_pretrained and evaluates like the trained one; evaluation
generations (split over the ranks, with the engine's gathered parameters) hold every prompt once and equal one
process's, token for token. Under faults:
the survivor of the killed run stops within seconds, the resume passes over the partial checkpoint-4 with a
WARNING and reproduces steps 3-4; a NaN on rank 1 stops both processes at the same step with the same message
naming rank 1 and its rows, or (skip) skips the same steps on both, logs the loss of rank 0 alone with the count
of the other, and stops after 2 consecutive skips; one process's exception or hang makes both log the same line.
"""

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import dist_harness  # noqa: E402
from cpu_run import cpu_args  # noqa: E402

CONFIGS = {
    "ddp": ROOT / "examples" / "accelerate_configs" / "ddp.yaml",
    "zero2": ROOT / "tests" / "accelerate_configs" / "cpu" / "zero2.yaml",
    "zero3": ROOT / "tests" / "accelerate_configs" / "cpu" / "zero3.yaml",
    "fsdp2": ROOT / "tests" / "accelerate_configs" / "cpu" / "fsdp2.yaml",
}
TOL = 1e-5


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("dist_fixture")
    dist_harness.build_fixture(directory)
    return directory


@pytest.fixture(scope="module")
def baseline(fixture_dir, tmp_path_factory):
    """1 process, 4 pairs per step: the separate (unsharded) reference, the LoRA adapter reference, TR-DPO."""
    out = tmp_path_factory.mktemp("single")
    return {
        "model": dist_harness.run_phase("single", fixture_dir, out / "model", generations=True),
        "adapter": dist_harness.run_phase(
            "single", fixture_dir, out / "adapter", reference="adapter", generations=True
        ),
        "sync": dist_harness.run_phase("single", fixture_dir, out / "sync", sync=True),
        "out": out,
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(engine, fixture_dir, out, mode) -> dict:
    """Run one launch of the harness; returns its exit code, output and the wall time it ended at."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(CONFIGS[engine]),
        "--num_processes",
        "2",
        "--main_process_port",
        str(_free_port()),
        str(ROOT / "tests" / "dist_harness.py"),
        engine,
        str(fixture_dir),
        str(out),
        mode,
    ]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    return {"returncode": proc.returncode, "output": proc.stdout + proc.stderr, "ended": time.time(), "out": out}


def tail(launched) -> str:
    return f"exit code {launched['returncode']}\n{launched['output'][-8000:]}"


@pytest.fixture(scope="module", params=["ddp", "zero2", "zero3", "fsdp2"])
def engine_run(request, fixture_dir, tmp_path_factory):
    """The two launches of one engine: ``kill`` first (its checkpoints are what ``main`` resumes), then ``main``."""
    engine = request.param
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed")
    root = tmp_path_factory.mktemp(engine)
    started = time.time()
    kill = launch(engine, fixture_dir, root / "kill", "kill")
    main = launch(engine, fixture_dir, root / "main", "main")
    print(f"{engine}: kill launch {kill['ended'] - started:.1f} s, main launch {main['ended'] - kill['ended']:.1f} s")
    assert (root / "main" / "result.json").is_file(), tail(main)
    result = json.loads((root / "main" / "result.json").read_text())
    assert "nan_skip" in result, tail(main)  # every phase before the terminal one finished
    print(f"{engine} phases (s):", {name: round(phase["seconds"], 1) for name, phase in result.items()})
    return {"engine": engine, "kill": kill, "main": main, "result": result}


def read_generations(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "generations.jsonl").read_text().splitlines()]


def assert_losses_equal(got: dict, expected: dict, steps=(1, 2, 3, 4)):
    for step in steps:
        assert abs(got[str(step)] - expected[str(step)]) < TOL, (step, got[str(step)], expected[str(step)])


def ref_sums_by_row(rows) -> dict:
    return {int(row_id): (chosen, rejected) for row_id, chosen, rejected in rows}


def assert_reference_sums_equal(got_rows, expected_rows, tol=TOL):
    got, expected = ref_sums_by_row(got_rows), ref_sums_by_row(expected_rows)
    assert set(got) == set(expected) and len(got) == 16  # 4 steps x 4 pairs: every training pair once
    for row_id, (chosen, rejected) in got.items():
        assert abs(chosen - expected[row_id][0]) < tol and abs(rejected - expected[row_id][1]) < tol, row_id


def expected_local_numel(shapes, engine, rank, world=2, hidden=32):
    """What rank ``rank`` stores of the reference: ZeRO-3 ceil(numel / world) per tensor, FSDP2 its dim-0 chunk."""
    total = 0
    for shape in shapes:
        numel = math.prod(shape)
        if engine == "zero3":
            total += -(-numel // world)
        elif engine == "fsdp2":
            chunk = -(-shape[0] // world)
            rows = max(0, min(chunk, shape[0] - rank * chunk))
            total += rows * numel // shape[0]
        else:
            total += numel
    return total


def reload_and_evaluate(final_dir, fixture_dir, tmp_path) -> dict:
    """Evaluate the saved checkpoint in this process, against the initial model as reference."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_dpo import NormalizedDPOTrainer

    args = cpu_args(
        tmp_path / "reload",
        per_device_eval_batch_size=4,
        beta=2.0,
        max_length=64,
        max_prompt_length=48,
    )
    trainer = NormalizedDPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(final_dir, dtype=torch.float32),
        ref_model=AutoModelForCausalLM.from_pretrained(fixture_dir / "init", dtype=torch.float32),
        args=args,
        eval_dataset=str(fixture_dir / "eval.jsonl"),
        processing_class=AutoTokenizer.from_pretrained(final_dir),
    )
    return trainer.evaluate()


def test_two_processes_match_one_process(engine_run, fixture_dir, baseline, tmp_path):
    engine, result = engine_run["engine"], engine_run["result"]
    single = baseline["model"]
    assert single["losses"]["1"] == pytest.approx(math.log(2), abs=1e-6)  # step 0: policy == reference
    assert single["losses"]["4"] < 0.2 and baseline["adapter"]["losses"]["4"] < 0.67  # both runs moved

    # Separate reference: losses, reference sums, shards.
    run = result["model"]
    assert_losses_equal(run["losses"], single["losses"])
    assert_reference_sums_equal(run["ref_rows"], single["ref_rows"])
    full = sum(math.prod(s) for s in run["ref_shapes"])
    for rank, (local, full_numel) in enumerate(run["ref_numel"]):
        assert full_numel == full
        assert local == expected_local_numel(run["ref_shapes"], engine, rank), (rank, local)
    if engine == "zero3":
        # Only tensors under the persistence threshold (10 x hidden: the norms) stay gathered between forwards.
        assert run["ref_resident"] == sum(math.prod(s) for s in run["ref_shapes"] if math.prod(s) <= 320)
    if engine == "fsdp2":
        assert run["ref_plain_tensors"] == 0  # every reference parameter is resharded (a DTensor) after its forwards

    # Evaluation gathered across processes equals one process; the saved checkpoint scores like the trained model.
    reloaded = reload_and_evaluate(engine_run["main"]["out"] / "model" / "final", fixture_dir, tmp_path)
    for key in ("eval_loss", "eval_logps/chosen", "eval_logps/rejected", "eval_rewards/margins"):
        assert abs(run["eval"][key] - reloaded[key]) < TOL, key
        assert abs(run["eval"][key] - single["eval"][key]) < 1e-4, key

    # The first-step self-check ran and passed in every fresh run, under the engine as in one process.
    assert single["self_check_passed"] and run["self_check_passed"] and result["adapter"]["self_check_passed"]

    # LoRA: the adapter-disabled policy is the reference.
    adapter = result["adapter"]
    assert_losses_equal(adapter["losses"], baseline["adapter"]["losses"])
    assert_reference_sums_equal(adapter["ref_rows"], single["ref_rows"])

    # Generations: the ranks' shares gathered, every prompt once, as one process generates them (the policy with its
    # adapter too, before training: the adapter-disabled base), with the same KL estimate.
    for phase, steps in (("model", [0, 4]), ("adapter", [0])):
        got = read_generations(engine_run["main"]["out"] / phase)
        expected = read_generations(baseline["out"] / phase)
        assert [(r["step"], r["row_id"]) for r in expected] == [(s, i) for s in steps for i in (1, 2, 3)], phase
        assert [(r["step"], r["row_id"]) for r in got] == [(r["step"], r["row_id"]) for r in expected], phase
        assert [r["completion_ids"] for r in got] == [r["completion_ids"] for r in expected], phase
        for a, b in zip(got, expected):
            assert abs(a["logratio"] - b["logratio"]) < 1e-4, (phase, a["step"], a["row_id"])
    assert run["eval"]["eval_generation/kl"] == pytest.approx(single["eval"]["eval_generation/kl"], abs=1e-4)

    if engine.startswith("zero"):
        precompute = result["precompute"]
        assert_losses_equal(precompute["losses"], single["losses"])
        assert_reference_sums_equal(precompute["ref_rows"], single["ref_rows"])

    if engine in ("ddp", "zero2"):
        # TR-DPO: the reference synced after every step is the same on every process as in one process.
        synced = result["sync"]
        assert_losses_equal(synced["losses"], baseline["sync"]["losses"])
        # The synced reference carries the policy's float32 rounding (ZeRO-2 reduces gradients in another order):
        # sums of about -60 agree to 3e-5, a few float32 ulps (measured: 1.0e-5 under ZeRO-2).
        assert_reference_sums_equal(synced["ref_rows"], baseline["sync"]["ref_rows"], tol=3e-5)
        assert abs(baseline["sync"]["losses"]["3"] - single["losses"]["3"]) > 1e-4  # the syncs change the run


# --------------------------------------------------------------------------- faults

# The survivors of a failed process must be gone (and the launcher with them) within this many seconds of the failure
# on this 2-core machine: the relay's 1 s poll and 5 s grace, the launcher's 0.1 s check, then process teardown.
STOP_BOUND_S = 30


def batch_losses(run, rank, step) -> list[float]:
    """The losses the harness recorded for ``rank``'s batches at ``step`` (one per micro-batch)."""
    return [row[2] for row in run["batches"] if row[0] == rank and row[1] == step]


def batch_rows(run, rank, step) -> list[int]:
    return [int(r) for row in run["batches"] if row[0] == rank and row[1] == step for r in row[3:]]


def test_killed_rank_stops_the_survivor_and_the_resume_reproduces_the_run(engine_run):
    """Rank 1 is SIGKILLed while saving checkpoint-4 (checkpoint-2 complete): the launch fails within the bound, and
    ``resume_from_checkpoint=True`` passes over checkpoint-4 with a WARNING and reproduces steps 3-4 within 1e-5."""
    from hf_dpo.training.checkpoints import checkpoint_problems

    engine, kill, result = engine_run["engine"], engine_run["kill"], engine_run["result"]
    phase = dist_harness.KILL_PHASE[engine]
    assert kill["returncode"] != 0, tail(kill)
    assert "Signal 9 (SIGKILL) received by PID" in kill["output"], tail(kill)  # the launcher names the killed rank
    stopped_after = kill["ended"] - float((kill["out"] / "killed_at").read_text())
    print(f"{engine}: survivor and launcher gone {stopped_after:.1f} s after the SIGKILL")
    assert 0 < stopped_after < STOP_BOUND_S

    # What the kill left, as the resume found it (the resume then saved a whole checkpoint-4 over it).
    run_dir = kill["out"] / phase
    resumed = result["resume_killed"]
    warnings = [m for m in resumed["checkpoint_messages"] if m.startswith("not resuming from")]
    prefix = f"not resuming from {run_dir / 'checkpoint-4'}, which is incomplete: "
    assert len(warnings) == 1 and warnings[0].startswith(prefix), warnings
    problems = warnings[0].removeprefix(prefix).split("; ")
    # Rank 0 finished its part (only rank 1's RNG state is missing), or was stopped before its trainer state.
    assert "rng_state_1.pth is missing" in problems or "trainer_state.json is missing" in problems, problems
    assert checkpoint_problems(run_dir / "checkpoint-2") == [] and checkpoint_problems(run_dir / "checkpoint-4") == []
    assert sorted(resumed["losses"], key=int) == ["1", "2", "3", "4"]  # 1-2 from checkpoint-2's history, 3-4 trained
    assert_losses_equal(resumed["losses"], result[phase]["losses"])
    assert {row[1] for row in resumed["batches"]} == {3.0, 4.0}  # it trained steps 3 and 4 only


def test_nan_on_one_rank_stops_every_rank_with_the_same_message(engine_run):
    """nonfinite_loss=error, rank 1 NaN from step 2: both processes raise NonFiniteLossError at step 2, at the same
    time, with one message naming rank 1 and its two rows (not rank 0's)."""
    run = engine_run["result"]["nan_error"]
    (kind0, message0, time0), (kind1, message1, time1) = run["errors"]
    assert kind0 == kind1 == "NonFiniteLossError" and message0 == message1
    assert abs(time0 - time1) < 5
    rows1, rows0 = batch_rows(run, 1, 2), batch_rows(run, 0, 2)
    assert len(rows1) == 2 and len(rows0) == 2 and math.isnan(batch_losses(run, 1, 2)[0])
    named = message0.split("Non-finite pairs: ")[1].split(". Rows in the batch: ")[0].split(", ")
    assert message0.startswith("non-finite training loss (nan) on rank 1 at step 2. Non-finite pairs: ")
    assert [n.rsplit(":", 1)[1] for n in named] == [str(r) for r in rows1]
    assert all(n.rsplit(":", 1)[0].endswith("train.jsonl") for n in named)
    assert message0.endswith("Set nonfinite_loss='skip' to skip such optimizer steps instead of stopping.")
    assert sorted(run["losses"]) == ["1"]  # step 1 logged, the run stopped in step 2 on both processes


def test_nan_skip_on_one_rank_skips_on_every_rank_and_logs_honest_means(engine_run):
    """nonfinite_loss=skip with nonfinite_max_consecutive_skips=2, rank 1 NaN from step 2: both skip step 2 and stop at
    step 3 with the same error; step 2's logged loss is rank 0's alone with loss_nonfinite 1 (Trainer's own mean
    counts rank 1 as 0 and halves it). Under DeepSpeed, skip is refused at construction."""
    engine, run = engine_run["engine"], engine_run["result"]["nan_skip"]
    if engine.startswith("zero"):
        assert run["refused"][0] == "EngineError"
        assert run["refused"][1].startswith("nonfinite_loss='skip' cannot work under DeepSpeed")
        return
    assert run["skipped_steps"] == [[2], [2]]
    (kind0, message0, _), (kind1, message1, _) = run["errors"]
    assert kind0 == kind1 == "NonFiniteLossError" and message0 == message1
    assert message0.startswith(
        "nonfinite_loss='skip' skipped 2 optimizer steps in a row (steps 2-3), the limit set by "
        "nonfinite_max_consecutive_skips=2: the run stops instead of going on without training. The last: non-finite "
        "training loss (nan) on rank 1 at step 3. "
    )
    step1, step2 = run["log"]["1"], run["log"]["2"]
    assert sorted(run["log"]) == ["1", "2"]
    assert step1["loss"] == pytest.approx((batch_losses(run, 0, 1)[0] + batch_losses(run, 1, 1)[0]) / 2, abs=1e-6)
    assert "loss_nonfinite" not in step1 and step1["nonfinite_loss_skipped"] == 0
    rank0_loss = batch_losses(run, 0, 2)[0]
    assert math.isnan(batch_losses(run, 1, 2)[0])
    assert step2["loss"] == pytest.approx(rank0_loss, abs=1e-6) and step2["loss_nonfinite"] == 1
    assert step2["nonfinite_loss_skipped"] == 1 and step2["nonfinite_pairs"] == 2
    assert all(math.isfinite(v) for k, v in step2.items() if k.startswith(("rewards/", "logps/")))
    warnings0, warnings1 = run["guard_messages"]
    skip_warnings = [m for m in warnings0 if m.startswith("non-finite training loss")]
    assert [m.split(". Non-finite pairs: ")[0] for m in skip_warnings] == [
        "non-finite training loss (nan) on rank 1 at step 2",
        "non-finite training loss (nan) on rank 1 at step 3",
    ]
    assert all(m.endswith("Skipping this optimizer step on every process.") for m in skip_warnings)
    assert not [m for m in warnings1 if m.startswith("non-finite training loss")]  # the main process warns
    assert not [m for m in warnings0 + warnings1 if "non-finite gradient" in m]


def test_one_failing_process_stops_every_process_with_one_line(engine_run):
    """Rank 1 raises in compute_loss at step 2 (``raise``), or hangs at step 3 with step_timeout=3 s so that rank 0's
    collective times out (``hang``): both processes log the failing rank's one line and the launch ends in the bound."""
    engine, main = engine_run["engine"], engine_run["main"]
    terminal = dist_harness.TERMINAL[engine]
    assert main["returncode"] != 0, tail(main)
    logs = [(main["out"] / f"rank{rank}.log").read_text() for rank in (0, 1)]
    # Lines are "<unix time> LEVEL logger: message".
    lines = [
        [line.split(" ", 1)[1] for line in log.splitlines() if " ERROR hf_dpo.training.faults: rank " in line]
        for log in logs
    ]
    assert lines[0] and lines[0][:1] == lines[1][:1], lines
    line = lines[0][0].removeprefix("ERROR hf_dpo.training.faults: ")
    if terminal == "raise":
        started = float((main["out"] / "failed_at").read_text())
        assert line.startswith("rank 1 failed at step 2 (rows of the step: ")
        assert line.endswith("): ValueError: injected failure in compute_loss on rank 1")
    else:
        started = float((main["out"] / "hung_at").read_text())
        assert line.startswith("rank 0 failed at step 3 (rows of the step: ")
        assert "RuntimeError" in line and "3000ms" in line, line  # gloo's timeout: step_timeout, not ddp_timeout
    rows = line.split("(rows of the step: ")[1].split("): ")[0].split(", ")
    assert len(rows) == 2 and all(r.rsplit(":", 1)[0].endswith("train.jsonl") for r in rows)
    stopped_after = main["ended"] - started
    print(f"{engine}: {terminal} on one process, every process gone {stopped_after:.1f} s later")
    assert stopped_after < STOP_BOUND_S + (dist_harness.STEP_TIMEOUT if terminal == "hang" else 0)


def test_fsdp_asked_for_but_not_enabled_stops(fixture_dir, tmp_path, monkeypatch):
    """An FSDP accelerate config on CPU: accelerate keeps DistributedType.NO (no sharding, no gradient sync); we refuse."""
    import torch
    from accelerate.state import AcceleratorState
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_dpo import NormalizedDPOTrainer
    from hf_dpo.reference.engines import EngineError

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    args = cpu_args(tmp_path, max_length=64, max_prompt_length=48)
    try:
        with pytest.raises(EngineError, match="FSDP was asked for .* accelerate runs"):
            NormalizedDPOTrainer(
                model=AutoModelForCausalLM.from_pretrained(fixture_dir / "init", dtype=torch.float32),
                args=args,
                train_dataset=str(fixture_dir / "train.jsonl"),
                processing_class=AutoTokenizer.from_pretrained(fixture_dir / "init"),
            )
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
