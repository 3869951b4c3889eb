"""benchmarks/bench.py runs end to end on a tiny configuration, so the benchmark cannot rot unnoticed."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


def test_bench_tiny_runs_both_implementations_on_the_same_work(tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "bench.json"
    command = [
        sys.executable,
        str(BENCH),
        "--size",
        "tiny",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--repeats",
        "1",
        "--impls",
        "trl,hf_dpo+pf+sp",
        "--threads",
        "1",
        "--cpu",
        "--same-process",  # one interpreter start instead of one per run: the suite's time budget
        "--json",
        str(out),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| tiny | standard | hf_dpo+pf+sp |" in done.stdout  # the markdown table
    report = json.loads(out.read_text())
    runs = {run["impl"]: run for run in report["runs"]}
    assert set(runs) == {"trl", "hf_dpo+pf+sp"}
    trl, ours = runs["trl"], runs["hf_dpo+pf+sp"]
    for run in (trl, ours):
        assert len(run["step_times"]) == 2 and run["tokens_per_s"] > 0 and run["peak_rss_mb"] > 0
    # Same data in the same order: the same logical tokens were trained on.
    assert trl["timed_tokens"] == ours["timed_tokens"]
    # Same weights, data, beta and loss: both start at ln 2 and take the same first steps.
    assert math.isclose(trl["first_loss"], math.log(2), abs_tol=1e-4)
    assert math.isclose(ours["final_loss"], trl["final_loss"], abs_tol=1e-4)
    # Shared prompts and no padding: fewer tokens computed than trained on.
    assert ours["computed_fraction"] < 1.0 == trl["computed_fraction"]
    summary = {row["impl"]: row for row in report["summary"]}
    assert summary["trl"]["tokens_per_s_ratio"] == 1.0


# --------------------------------------------------------------------------- the GPU benchmark, dry-run on CPU

GPU_SH = BENCH.parent / "gpu.sh"


def _bench_module(name: str = "bench"):
    """benchmarks/bench.py, or a ``bench_*`` module next to it (bench.py puts its folder on the path)."""
    import importlib
    import importlib.util

    spec = importlib.util.spec_from_file_location("hf_dpo_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module if name == "bench" else importlib.import_module(name)


def test_gpu_sh_dry_run_on_cpu_runs_the_three_contestants_and_the_mfu_table(tmp_path):
    """`benchmarks/gpu.sh` end to end on a tiny Qwen2 on CPU: the preset's command, contestants, FLOP fraction, table.

    The model is the GPU size's architecture (Qwen2, tied embeddings) at hidden 64 x 2 layers, vocab 1024, so the
    body's parameters (all but the input embedding and the head) are by hand, per layer: q 64*64+64, k and v
    64*32+32 each, o 64*64, MLP 3*64*192, two norms 2*64 = 49408; two layers 98816 and the final norm 64:
    N_body = 98880; the tied head 1024*64 = 65536. A step's FLOPs without attention are 4 passes (policy forward
    and backward, reference forward) x (2 N_body per computed token + 2 N_head per position the head projects).
    """
    pytest.importorskip("trl")
    out = tmp_path / "gpu.json"
    impls = "trl,hf_dpo,minimind"  # the preset's three contestants (its +padded and minimind+dyn variants left out)
    command = [
        "bash",
        str(GPU_SH),
        "--size",
        "gpu_tiny",
        "--cpu",
        "--steps",
        "1",
        "--warmup",
        "1",
        "--repeats",
        "1",
        "--threads",
        "1",
        "--impls",
        impls,
        "--same-process",
        "--json",
        str(out),
    ]
    env = dict(os.environ, HF_DPO_BENCH_INSTALL="0", PYTHON=sys.executable)
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "--preset gpu" in done.stdout  # gpu.sh ran bench.py's gpu preset
    # ... after the numerical checks, at their tiny size on the CPU, in the same command.
    assert done.stdout.index("all checks passed") < done.stdout.index("--preset gpu")
    checks = json.loads((tmp_path / "gpu_checks.json").read_text())
    assert checks["size"] == "tiny" and checks["device"] == "cpu" and checks["passed"]
    table = [line for line in done.stdout.splitlines() if line.startswith("| gpu_tiny |")]
    assert [line.split("|")[3].strip() for line in table] == impls.split(",")  # one table, one row per contestant
    report = json.loads(out.read_text())
    runs = {run["impl"]: run for run in report["runs"]}
    trl, ours, plain = runs["trl"], runs["hf_dpo"], runs["minimind"]
    for run in runs.values():
        assert run["size"] == "gpu_tiny" and run["device"] == "cpu" and len(run["step_times"]) == 1
        assert run["shape"]["n_body"] == 98880 and run["shape"]["n_head"] == 65536
        (flops,) = run["step_flops"]
        dense = 4 * (2 * 98880 * run["computed_per_step"] + 2 * 65536 * run["head_positions_per_step"])
        assert math.isclose(flops * (1 - run["attention_flops_fraction"]), dense, rel_tol=1e-9)
        # The fraction of the peak = the step's FLOPs / its time / the matmul peak measured in that run.
        assert run["matmul_peak_tflops"] > 0
        expected = flops / run["step_times"][0] / (run["matmul_peak_tflops"] * 1e12)
        assert math.isclose(run["mfu"], expected, rel_tol=1e-9) and 0 < run["mfu"] < 1
        # Same weights: every contestant starts at ln 2.
        assert math.isclose(run["first_loss"], math.log(2), abs_tol=1e-5)
    # TRL projects every computed token through the head; hf_dpo only the positions that predict a scored token.
    assert trl["head_positions_per_step"] == trl["computed_per_step"]
    assert ours["head_positions_per_step"] < ours["computed_per_step"]
    # The same pairs in the same batches: equal logical tokens; the plain loop computes them all (padding excluded).
    assert trl["timed_tokens"] == ours["timed_tokens"] == plain["timed_tokens"]
    assert plain["computed_tokens"] == trl["computed_tokens"] == trl["timed_tokens"]
    # hf_dpo (summed log-probs, like TRL here) takes TRL's step; the plain loop's loss is length-normalized.
    assert math.isclose(ours["final_loss"], trl["final_loss"], abs_tol=1e-5)
    assert plain["final_loss"] != plain["first_loss"]  # it trained


def test_minimind_batch_and_logps_follow_the_recipe():
    """Two pairs, prompt [5, 6]; chosen [7, EOS=1] / [8, 9, 1], rejected [9, 1] / [1]; pad id 0, padded to 6."""
    import torch

    bench = _bench_module("bench_minimind")
    pairs = [([5, 6], [7, 1], [9, 1]), ([5, 6], [8, 9, 1], [1])]
    x, y, mask, attention, real = bench.minimind_batch(pairs, pad_id=0, pad_to=6)
    # Rows: chosen 0, chosen 1, rejected 0, rejected 1; x = ids[:-1], y = ids[1:], the mask follows y.
    assert x.tolist() == [[5, 6, 7, 1, 0], [5, 6, 8, 9, 1], [5, 6, 9, 1, 0], [5, 6, 1, 0, 0]]
    assert y.tolist() == [[6, 7, 1, 0, 0], [6, 8, 9, 1, 0], [6, 9, 1, 0, 0], [6, 1, 0, 0, 0]]
    assert mask.tolist() == [[0, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 1, 1, 0, 0], [0, 1, 0, 0, 0]]
    assert attention.tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]
    assert real == 4 + 5 + 4 + 3
    # Per-sequence mean of the label's log-softmax over the masked positions, against a loop.
    logits = torch.randn(4, 5, 11, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = bench.minimind_sequence_logps(logits, y, mask)
    for row in range(4):
        scored = [torch.log_softmax(logits[row, t], -1)[y[row, t]] for t in range(5) if mask[row, t]]
        assert torch.isclose(got[row], sum(scored) / len(scored))


def test_hf_dpo_default_passes_no_layout_flag_and_variants_are_explicit():
    bench = _bench_module("bench_worker")
    assert bench.hf_dpo_options([]) == {}  # the library's defaults, whatever they are
    assert bench.hf_dpo_options(["padded"]) == {"padding_free": False, "share_prompt": False}
    assert bench.hf_dpo_options(["pf"]) == {"padding_free": True, "share_prompt": False}
    assert bench.hf_dpo_options(["sp"]) == {"padding_free": False, "share_prompt": True}
    assert bench.hf_dpo_options(["pfr", "sp"]) == {
        "padding_free": True,
        "share_prompt": True,
        "padding_free_max_row_tokens": 1,
    }
    assert bench.hf_dpo_options(["full", "ref"]) == {"response_only_logits": False, "precompute_ref_logps": True}
    assert bench.hf_dpo_options(["gc"]) == {}  # gradient checkpointing is a TrainingArguments flag, set by the worker
    with pytest.raises(ValueError, match="unknown hf_dpo option"):
        bench.hf_dpo_options(["pff"])


def test_cpu_suite_plan_measures_defaults_against_trl_and_the_padded_path():
    bench = _bench_module()
    args = bench.argparse.Namespace(
        size=None, data="standard", impls=None, steps=None, warmup=None, repeats=None, baseline=None
    )
    plan = {(e["size"], e["data"]): e for e in bench.plan(args)}
    assert set(plan) == {("small", "standard"), ("large_vocab", "standard"), ("small", "multiturn")}
    for entry in plan.values():
        assert {"hf_dpo", "hf_dpo+padded"} <= set(entry["impls"])  # "no configuration slower than the padded path"
    assert plan["small", "standard"]["baseline"] == plan["large_vocab", "standard"]["baseline"] == "trl"
    assert plan["small", "multiturn"]["baseline"] == "hf_dpo+padded"
    # TRL's 28 s large-vocabulary step runs once; every other run keeps two alternating repeats.
    assert plan["large_vocab", "standard"]["repeats"] == {"trl": 1, "hf_dpo": 2, "hf_dpo+padded": 2}
    assert plan["small", "standard"]["repeats"] == {"trl": 2, "hf_dpo": 2, "hf_dpo+padded": 2}
    # Explicit options win over the suite's.
    args.repeats, args.steps = 1, 3
    assert all(set(e["repeats"].values()) == {1} and e["steps"] == 3 for e in bench.plan(args))


GPU_CHECKS = BENCH.parent / "gpu_checks.py"

CHECK_ROWS = [
    "bf16 autocast loss vs fp32",
    "response_only_logits vs full logits (sums, grads; sdpa)",
    *[
        f"{layout} vs padded (sums, grads; {attn})"
        for attn in ("sdpa", "eager")
        for layout in ("padding_free", "padding_free_rows", "share_prompt")
    ],
]


def test_gpu_checks_dry_run_on_cpu_passes_every_check_below_its_tolerance(tmp_path, capsys):
    """benchmarks/gpu_checks.py at its tiny size on CPU: every row present, measured, below its tolerance."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("hf_dpo_gpu_checks", GPU_CHECKS)
    checks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(checks)
    out = tmp_path / "checks.json"
    assert checks.main(["--size", "tiny", "--device", "cpu", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    rows = report["checks"]
    assert [row["check"].split(" (fp32 loss")[0] for row in rows] == CHECK_ROWS
    for row in rows:
        assert row["passed"] and row["measured"] <= row["tolerance"], row
        verdict = "pass" if row["passed"] else "FAIL"
        assert f"| {row['check']} | {row['measured']:.3g} | {row['tolerance']:.3g} | {verdict} |" in printed
    by_name = {row["check"].split(" (fp32 loss")[0]: row for row in rows}
    # bf16 really ran in bf16 (a loss that moved), within the stated 1e-2; the fp32 loss is away from ln 2.
    assert 0 < by_name["bf16 autocast loss vs fp32"]["measured"] < 1e-2
    assert abs(float(rows[0]["check"].split("fp32 loss ")[1].rstrip(")")) - math.log(2)) > 1e-3
    # Each layout is a different computation (other summation order), compared for real, within 1e-5.
    for name in CHECK_ROWS[2:]:
        assert 0 < by_name[name]["measured"] < 1e-5 and by_name[name]["tolerance"] == 1e-5
    assert report["skipped"] == ["flex_attention skipped on cpu: torch's FlexAttention has no backward on CPU"]
    assert report["passed"] and "all checks passed" in printed
