"""benchmarks/bench.py runs end to end on a tiny configuration, so the benchmark cannot rot unnoticed."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench.py"


def test_bench_tiny_runs_both_implementations_on_the_same_work(tmp_path):
    pytest.importorskip("trl")
    out = tmp_path / "bench.json"
    command = [sys.executable, str(BENCH), "--size", "tiny", "--steps", "2", "--warmup", "1", "--repeats", "1",
               "--impls", "trl,hf_dpo+pf+sp", "--threads", "1", "--cpu", "--json", str(out)]
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
