"""benchmarks/length_normalization.py end to end on the tiny demo model, so that the documented experiment cannot rot.

The real run (SmolLM2-135M-Instruct, docs/metrics.md) uses the same script with its own --model and --data; here the
data are demo pairs written in LLaMA-Factory's sharegpt layout, which hf-dpo reads as it is.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("length_normalization", ROOT / "benchmarks" / "length_normalization.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

SHAREGPT_ROLE = {"user": "human", "assistant": "gpt"}


def sharegpt(row: dict) -> dict:
    """A demo row in LLaMA-Factory's sharegpt preference layout."""
    turns = [{"from": SHAREGPT_ROLE[m["role"]], "value": m["content"]} for m in row["chosen"][:-1]]
    return {
        "conversations": turns,
        "chosen": {"from": "gpt", "value": row["chosen"][-1]["content"]},
        "rejected": {"from": "gpt", "value": row["rejected"][-1]["content"]},
    }


def test_the_experiment_runs_both_settings_and_tables_what_they_logged(tmp_path):
    from hf_dpo.cli.demo import build_model, build_tokenizer, make_preference_rows

    tokenizer = build_tokenizer("chatml")
    tokenizer.save_pretrained(tmp_path / "model")
    build_model(tokenizer, hidden_size=32, num_layers=2).save_pretrained(tmp_path / "model")
    rows = [sharegpt(row) for row in make_preference_rows(24, seed=3)]
    (tmp_path / "pairs.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")

    assert bench.read_rows(tmp_path / "pairs.json") == rows

    text = bench.main(
        ["--model", str(tmp_path / "model"), "--data", str(tmp_path / "pairs.json"), "--out", str(tmp_path / "out"),
         "--train_pairs", "16", "--eval_pairs", "8", "--max_length", "64", "--max_steps", "2", "--batch_size", "4",
         "--accumulation", "1", "--learning_rate", "3e-3", "--eval_generations", "3", "--max_new_tokens", "6",
         "--threads", "1", "--hf_dpo", f"{sys.executable} -m hf_dpo"]
    )  # fmt: skip
    lines = text.splitlines()
    assert len(lines) == 4 and lines[2].startswith("| true (2) |") and lines[3].startswith("| false (0.1) |")
    for normalize, line in zip(("true", "false"), lines[2:]):
        run = bench.results(tmp_path / "out" / f"length_normalize_{normalize}")
        assert run["steps"] == (0, 2)
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == f"0.500 -> {run['last']['eval_rewards/accuracies']:.3f}"  # step 0: every pair a tie
        assert cells[6].startswith("+0.0000 -> ")  # policy == reference before training
        assert cells[3] == "{:.1f} -> {:.1f}".format(
            run["first"]["eval_generation/length_mean"], run["last"]["eval_generation/length_mean"]
        )
        records = (tmp_path / "out" / f"length_normalize_{normalize}" / "generations.jsonl").read_text().splitlines()
        assert [json.loads(r)["step"] for r in records] == [0, 0, 0, 2, 2, 2]
    summed = json.loads((tmp_path / "out" / "length_normalize_false" / "trainer_state.json").read_text())
    assert pytest.approx(0.6931, abs=1e-4) == next(e for e in summed["log_history"] if "eval_loss" in e)["eval_loss"]
