"""NormalizedDPOTrainer under DDP, ZeRO-2, ZeRO-3 and FSDP2: 2 CPU processes over gloo against 1 process.

One ``accelerate launch`` per engine runs tests/dist_harness.py (separate reference with a checkpoint and a
final save, a resume from checkpoint-2, the LoRA adapter reference, and for ZeRO-3 precompute_ref_logps).
Against the 1-process run on the same global batch of 4 pairs (SGD with momentum, 4 steps, losses moving
from ln 2 to about 0.04-0.09): every per-step loss within 1e-5; the reference's per-pair log-prob sums
equal the unsharded reference's within 1e-5; under ZeRO-3 and FSDP2 each rank stores exactly its shard of
the reference; the saved model loads with from_pretrained and evaluates like the trained one; resuming
reproduces steps 3-4; evaluation generations (split over the ranks, with the engine's gathered parameters)
hold every prompt once and equal one process's, token for token.
"""

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import dist_harness  # noqa: E402

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
    """1 process, 4 pairs per step: the separate (unsharded) reference and the LoRA adapter reference."""
    out = tmp_path_factory.mktemp("single")
    return {
        "model": dist_harness.run_phase("single", fixture_dir, out / "model", generations=True),
        "adapter": dist_harness.run_phase(
            "single", fixture_dir, out / "adapter", reference="adapter", generations=True
        ),
        "out": out,
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(engine, fixture_dir, out) -> dict:
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
    ]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"exit code {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-6000:]}"
    return json.loads((out / "result.json").read_text())


def read_generations(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "generations.jsonl").read_text().splitlines()]


def assert_losses_equal(got: dict, expected: dict, steps=(1, 2, 3, 4)):
    for step in steps:
        assert abs(got[str(step)] - expected[str(step)]) < TOL, (step, got[str(step)], expected[str(step)])


def ref_sums_by_row(rows) -> dict:
    return {int(row_id): (chosen, rejected) for row_id, chosen, rejected in rows}


def assert_reference_sums_equal(got_rows, expected_rows):
    got, expected = ref_sums_by_row(got_rows), ref_sums_by_row(expected_rows)
    assert set(got) == set(expected) and len(got) == 16  # 4 steps x 4 pairs: every training pair once
    for row_id, (chosen, rejected) in got.items():
        assert abs(chosen - expected[row_id][0]) < TOL and abs(rejected - expected[row_id][1]) < TOL, row_id


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

    from hf_dpo import DPOConfig, NormalizedDPOTrainer

    args = DPOConfig(
        output_dir=str(tmp_path / "reload"),
        per_device_eval_batch_size=4,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
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


@pytest.mark.parametrize("engine", ["ddp", "zero2", "zero3", "fsdp2"])
def test_two_processes_match_one_process(engine, fixture_dir, baseline, tmp_path):
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed")
    result = launch(engine, fixture_dir, tmp_path / engine)
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
    reloaded = reload_and_evaluate(tmp_path / engine / "model" / "final", fixture_dir, tmp_path)
    for key in ("eval_loss", "eval_logps/chosen", "eval_logps/rejected", "eval_rewards/margins"):
        assert abs(run["eval"][key] - reloaded[key]) < TOL, key
        assert abs(run["eval"][key] - single["eval"][key]) < 1e-4, key

    # The first-step self-check ran and passed in every fresh run, under the engine as in one process.
    assert single["self_check_passed"] and run["self_check_passed"] and result["adapter"]["self_check_passed"]

    # Resume from checkpoint-2 reproduces steps 3 and 4.
    assert_losses_equal(result["resume"]["losses"], run["losses"], steps=(3, 4))

    # LoRA: the adapter-disabled policy is the reference.
    adapter = result["adapter"]
    assert_losses_equal(adapter["losses"], baseline["adapter"]["losses"])
    assert_reference_sums_equal(adapter["ref_rows"], single["ref_rows"])

    # Generations: the ranks' shares gathered, every prompt once, as one process generates them (the policy with its
    # adapter too, before training: the adapter-disabled base), with the same KL estimate.
    for phase, steps in (("model", [0, 4]), ("adapter", [0])):
        got = read_generations(tmp_path / engine / phase)
        expected = read_generations(baseline["out"] / phase)
        assert [(r["step"], r["row_id"]) for r in expected] == [(s, i) for s in steps for i in (1, 2, 3)], phase
        assert [(r["step"], r["row_id"]) for r in got] == [(r["step"], r["row_id"]) for r in expected], phase
        assert [r["completion_ids"] for r in got] == [r["completion_ids"] for r in expected], phase
        for a, b in zip(got, expected):
            assert abs(a["logratio"] - b["logratio"]) < 1e-4, (phase, a["step"], a["row_id"])
    assert run["eval"]["eval_generation/kl"] == pytest.approx(single["eval"]["eval_generation/kl"], abs=1e-4)

    if engine == "zero3":
        precompute = result["precompute"]
        assert_losses_equal(precompute["losses"], single["losses"])
        assert_reference_sums_equal(precompute["ref_rows"], single["ref_rows"])


def test_fsdp_asked_for_but_not_enabled_stops(fixture_dir, tmp_path, monkeypatch):
    """An FSDP accelerate config on CPU: accelerate keeps DistributedType.NO (no sharding, no gradient sync); we refuse."""
    import torch
    from accelerate.state import AcceleratorState
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_dpo import DPOConfig, NormalizedDPOTrainer
    from hf_dpo.reference.engines import EngineError

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    args = DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_length=64, max_prompt_length=48)
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
