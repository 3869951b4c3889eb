"""The real-model benchmark's pure parts (benchmarks/bench_real.py, bench_flops.py, bench.py's same-tokens refusal).

No model weights: the conversions, row selection, token digests and FLOP counts are checked on hand-made rows and
batches, so a broken real-model path shows here in a second rather than minutes into `bench.py --preset real`.
"""

import importlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench(monkeypatch):
    """benchmarks/bench.py as a module, with the benchmarks folder importable (as bench.py itself arranges)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location("hf_dpo_bench", BENCHMARKS / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def bench_real(bench):
    return importlib.import_module("bench_real")


@pytest.fixture
def bench_flops(bench):
    return importlib.import_module("bench_flops")


def test_sharegpt_rows_become_trl_conversational_messages(bench_real):
    multi_turn = {
        "conversations": [
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello!"},
            {"from": "human", "value": "2+2?"},
        ],
        "system": "Be brief.",
        "chosen": {"from": "gpt", "value": "4"},
        "rejected": {"from": "gpt", "value": "5"},
    }
    assert bench_real.sharegpt_to_trl(multi_turn) == {
        "prompt": [
            {"role": "system", "content": "Be brief."},  # the system column first (LLaMA-Factory's rule)
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "2+2?"},
        ],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "5"}],
    }
    # A conversation that opens with its own system turn keeps it, and the column is not added twice.
    opens_with_system = dict(multi_turn, conversations=[{"from": "system", "value": "S"}, *multi_turn["conversations"]])
    prompt = bench_real.sharegpt_to_trl(opens_with_system)["prompt"]
    assert [m["role"] for m in prompt] == ["system", "user", "assistant", "user"] and prompt[0]["content"] == "S"


class WordTokenizer:
    """A stand-in tokenizer: the chat template joins the contents, one token per whitespace-separated word."""

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and not tokenize
        return " ".join(m["content"] for m in messages)

    def __call__(self, text, add_special_tokens):
        return {"input_ids": list(range(len(text.split())))}


def test_real_rows_keeps_in_file_order_the_rows_whose_prompt_fits_half_of_max_length(bench_real, monkeypatch, tmp_path):
    """Prompts of 3, 10 and 2 words, max_length 8: rows 0 and 2 fit 8 // 2 = 4 tokens; a third row is refused."""

    def row(words):
        return {
            "conversations": [{"from": "human", "value": " ".join(["w"] * words)}],
            "chosen": {"from": "gpt", "value": "a"},
            "rejected": {"from": "gpt", "value": "b"},
        }

    rows = [row(3), row(10), row(2)]
    data = tmp_path / "pairs.json"
    data.write_text(json.dumps(rows))
    monkeypatch.setattr(bench_real, "REAL_DATA", data)
    assert bench_real.real_rows(WordTokenizer(), max_length=8, n=2) == [rows[0], rows[2]]
    with pytest.raises(ValueError, match="has 2 pairs with a prompt of at most 4 tokens, 3 needed"):
        bench_real.real_rows(WordTokenizer(), max_length=8, n=3)


def test_pair_tokens_read_the_same_pairs_from_trl_batches_and_hf_dpo_features(bench_real):
    """Two pairs: prompt [5, 6], chosen [7, 1] / [8, 9, 1]; prompt [4], rejected [9, 1] / [1]; pad 0, right padding.

    TRL's collated rows are [chosen 1, chosen 2, rejected 1, rejected 2]; its completion_mask marks the answer.
    """
    features = [
        {
            "chosen_input_ids": [5, 6, 7, 1],
            "chosen_response_mask": [0, 0, 1, 1],
            "rejected_input_ids": [5, 6, 9, 1],
            "rejected_response_mask": [0, 0, 1, 1],
        },
        {
            "chosen_input_ids": [4, 8, 9, 1],
            "chosen_response_mask": [0, 1, 1, 1],
            "rejected_input_ids": [4, 1],
            "rejected_response_mask": [0, 1],
        },
    ]
    trl_features = [{"prompt_ids": [5, 6]}, {"prompt_ids": [4]}]  # only the key that tells TRL's features apart
    trl_batch = {
        "input_ids": torch.tensor([[5, 6, 7, 1], [4, 8, 9, 1], [5, 6, 9, 1], [4, 1, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]),
        "completion_mask": torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1], [0, 1, 0, 0]]),
    }
    ours = bench_real.pair_tokens(features, batch={})
    theirs = bench_real.pair_tokens(trl_features, trl_batch)
    assert (
        theirs
        == ours
        == [
            [[5, 6, 7, 1], [0, 0, 1, 1], [5, 6, 9, 1], [0, 0, 1, 1]],
            [[4, 8, 9, 1], [0, 1, 1, 1], [4, 1], [0, 1]],
        ]
    )
    assert bench_real.tokens_digest(theirs) == bench_real.tokens_digest(ours)
    # One token, or one scored-mask entry, different: a different digest.
    assert bench_real.tokens_digest([[[5, 6, 7, 2], *ours[0][1:]], ours[1]]) != bench_real.tokens_digest(ours)
    assert bench_real.tokens_digest([[ours[0][0], [0, 1, 1, 1], *ours[0][2:]], ours[1]]) != bench_real.tokens_digest(
        ours
    )


def _run(impl, digest, size="real"):
    return {"size": size, "data": "real", "impl": impl, "tokens_digest": digest, "matmul_peak_tflops": 0.1}


def test_same_tokens_names_the_contestants_that_trained_on_different_ids(bench):
    assert bench.same_tokens([_run("trl", "aa"), _run("hf_dpo", "aa"), _run("hf_dpo", "aa")]) is None
    # Random-init runs carry no digest; other configurations are not compared with this one.
    assert bench.same_tokens([_run("trl", "aa"), _run("minimind", None), _run("trl", "bb", size="small")]) is None
    why = bench.same_tokens([_run("trl", "aa"), _run("hf_dpo", "bb"), _run("hf_dpo+padded", "aa")])
    assert why == "real/real: the contestants trained on different token ids (hf_dpo+padded, trl: aa; hf_dpo: bb)"


def test_bench_refuses_a_table_built_on_different_tokens(bench, monkeypatch, tmp_path, capsys):
    """bench.py's report step on two finished runs whose digests differ: exit status 1, the reason, the JSON flag."""
    runs = [dict(_run("trl", "aa"), tokens_per_s=10.0, mfu=0.5), dict(_run("hf_dpo", "bb"), tokens_per_s=20.0, mfu=0.6)]
    monkeypatch.setattr(bench, "run_all", lambda args, entries, base_case, started: (runs, []))
    out = tmp_path / "report.json"
    assert bench.main(["--size", "real", "--impls", "trl,hf_dpo", "--json", str(out)]) == 1
    assert "the contestants trained on different token ids" in capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["token_mismatch"].startswith("real/real:")
    assert {row["impl"]: row["tokens_per_s_ratio"] for row in report["summary"]} == {"trl": 1.0, "hf_dpo": 2.0}


def test_flops_of_padded_and_shared_prompt_batches_by_hand(bench_flops):
    """N_body 1000, N_head 100, 2 layers of attention width 8: forward FLOPs = 2000 c + 200 h + 64 p for c computed
    tokens, h head positions and p (query, visible key) pairs.

    Padded (TRL's keys): rows of 3 and 2 tokens in width 3 -> c = 5, padding 1, p = 6 + 3 = 9, completion mask
    [0, 1, 1], [0, 1, 0] -> 3 scored tokens (past the first column, which nothing predicts); full logits: h = c = 5.
    Shared prompt: one row, prompt 2 (branch 0), chosen 2 (branch 1), rejected 1 (branch 2), one pad (segment -1);
    each token sees itself, the earlier prompt and its own branch's earlier tokens: 1 + 2 + 3 + 4 + 3 = 13 pairs.
    """
    shape = {"n_body": 1000, "n_head": 100, "layers": 2, "attention_width": 8}
    padded = {
        "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
        "completion_mask": torch.tensor([[0, 1, 1], [0, 1, 0]]),
    }
    work = bench_flops.batch_work(padded, full_logits=True)
    assert work == {"computed": 5, "padding": 1, "head": 5, "attention_pairs": 9, "scored": 3}
    assert bench_flops.batch_work(padded, full_logits=False)["head"] == 3
    forward = 2000 * 5 + 200 * 5 + 64 * 9
    assert bench_flops.step_flops(shape, work, reference_every_step=True) == {
        "total": 4 * forward,
        "attention": 4 * 576,
    }
    assert bench_flops.step_flops(shape, work, reference_every_step=False)["total"] == 3 * forward
    shared = {
        "segment_ids": torch.tensor([[0, 0, 0, 0, 0, -1]]),
        "branch_ids": torch.tensor([[0, 0, 1, 1, 2, 0]]),
        "logp_positions": torch.tensor([1, 2, 1]),
    }
    work = bench_flops.batch_work(shared, full_logits=False)
    assert work == {"computed": 5, "padding": 1, "head": 3, "attention_pairs": 13, "scored": 3}
