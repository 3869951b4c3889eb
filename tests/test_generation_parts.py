"""The pieces of --eval_generations, each against hand-written expectations: shards, padding, stops, batches, tables,
flag checks and the records a resumed run keeps."""

from __future__ import annotations

import json
import types

import pytest
import torch
from cpu_run import cpu_args

from hf_dpo import DPOConfig
from hf_dpo.cli.demo import build_model, build_tokenizer
from hf_dpo.training.generation_kl import completion_batch, completion_logratios, mean_token_logratio
from hf_dpo.training.generation_records import before_after, card_lines, write_records
from hf_dpo.training.generation_tables import COLUMNS, log_tables, markdown_table, table_key
from hf_dpo.training.generations import Completion, Prompt, cut_at_stop, left_padded, shard, stop_token_ids


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_hold_every_prompt_once_in_order(world):
    for n in range(10):
        items = list(range(n))
        shards = [shard(items, rank, world) for rank in range(world)]
        assert sum(shards, []) == items  # gather_object concatenates in rank order: the original order, once each
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_left_padding_right_aligns_the_prompts():
    batch = left_padded([(5, 6, 7), (8,)], pad_token_id=0, device="cpu")
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_a_completion_is_cut_after_its_first_stop_token():
    assert cut_at_stop([4, 9, 2, 9, 9], [9]) == ((4, 9), True)  # generate() pads finished rows with pad (here = stop)
    assert cut_at_stop([4, 5, 6], [9, 2]) == ((4, 5, 6), False)  # budget exhausted
    assert cut_at_stop([2], [9, 2]) == ((2,), True)


def test_completion_batch_scores_exactly_the_generated_tokens():
    completions = [
        Completion(Prompt(0, (1, 2, 3), 4), (7, 9), True),  # 3 prompt + 2 new
        Completion(Prompt(1, (1,), 4), (5, 6, 8), False),  # 1 prompt + 3 new
    ]
    batch = completion_batch(completions, pad_token_id=0, device="cpu")
    assert batch["input_ids"].tolist() == [[1, 2, 3, 7, 9], [1, 5, 6, 8, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # response_mask[i, t] = 1 iff input_ids[i, t + 1] is generated: positions 2, 3 (row 0) and 0, 1, 2 (row 1).
    assert batch["response_mask"].int().tolist() == [[0, 0, 1, 1, 0], [1, 1, 1, 0, 0]]


def test_log_ratios_of_a_fixed_sample_equal_plain_forwards():
    """Two different random models score a fixed sample; each sum is a plain log_softmax difference."""
    tokenizer = build_tokenizer("chatml")
    policy, reference = build_model(tokenizer, 32, 2, seed=1), build_model(tokenizer, 32, 2, seed=2)
    completions = [
        Completion(Prompt(0, (11, 12, 13, 14), 3), (21, 22, 23), True),
        Completion(Prompt(1, (15, 16), 3), (24,), False),
        Completion(Prompt(2, (17,), 3), (25, 26, 27, 28, 29), False),
    ]

    def score(model, batch):
        from hf_dpo.scoring import score_batch

        return score_batch(model, batch)

    sums, counts = completion_logratios(completions, policy, "model", reference, score, 0, 2, "cpu")
    assert counts.tolist() == [3, 1, 5]
    expected = []
    for c in completions:
        ids = torch.tensor([list(c.prompt.ids) + list(c.ids)])
        positions = torch.arange(len(c.prompt.ids) - 1, ids.shape[1] - 1)
        targets = ids[0, len(c.prompt.ids) :]
        with torch.no_grad():
            a = policy(ids).logits[0].double().log_softmax(-1)[positions, targets]
            b = reference(ids).logits[0].double().log_softmax(-1)[positions, targets]
        expected.append(float((a - b).sum()))
    assert sums.tolist() == pytest.approx(expected, abs=1e-5)
    assert mean_token_logratio(sums, counts) == pytest.approx(sum(expected) / 9, abs=1e-6)


@pytest.mark.parametrize(("template", "stop"), [("chatml", "<|im_end|>"), ("llama3", "<|eot_id|>"), ("bos", "</s>")])
def test_stop_tokens_are_the_templates_end_of_turn_and_eos(template, stop):
    tokenizer = build_tokenizer(template)
    model = build_model(tokenizer, 32, 2)
    # The demo's EOS is each template's end-of-turn token, so one id; the model config names the same.
    assert stop_token_ids(tokenizer, model) == [tokenizer.convert_tokens_to_ids(stop)]


def test_stop_tokens_without_a_chat_template_are_the_eos_ids():
    tokenizer = build_tokenizer("chatml")
    tokenizer.chat_template = None
    model = build_model(tokenizer, 32, 2)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, 7]
    assert stop_token_ids(tokenizer, model) == [tokenizer.eos_token_id, 7]


def test_generation_flags_are_checked(tmp_path):
    base = {"output_dir": str(tmp_path), "report_to": []}
    args = DPOConfig(**base, eval_generation_kwargs='{"do_sample": true, "top_p": 0.9}')
    assert args.eval_generation_kwargs == {"do_sample": True, "top_p": 0.9} and args.eval_generations == 0
    for kwargs, message in (
        ('{"max_new_tokens": 5}', "max_new_tokens cannot be set there"),
        ('{"num_return_sequences": 2}', "num_return_sequences cannot be set there"),
        ('{"temperature": 0.7}', "eval_generation_kwargs"),  # sampling settings without do_sample
        ("{not json", "--eval_generation_kwargs: not valid JSON"),
        ("[1]", "--eval_generation_kwargs: expected a JSON object"),
    ):
        with pytest.raises(ValueError, match=message):
            DPOConfig(**base, eval_generation_kwargs=kwargs)
    with pytest.raises(ValueError, match="--eval_generations must be >= 0"):
        DPOConfig(**base, eval_generations=-1)
    with pytest.raises(ValueError, match="--eval_generation_max_new_tokens must be a positive integer"):
        DPOConfig(**base, eval_generation_max_new_tokens=0)


def record(step, row_id, tokens, finished=True, logratio=0.0, completion="x", eval_set="eval"):
    return {
        "step": step,
        "eval_set": eval_set,
        "row_id": row_id,
        "source": f"eval.jsonl:{row_id + 1}",
        "prompt": f"prompt {row_id}",
        "completion": completion,
        "completion_ids": [1] * tokens,
        "tokens": tokens,
        "finished": finished,
        "logratio": logratio,
    }


def test_before_after_takes_the_first_and_last_evaluation():
    records = [
        record(0, 0, 10, False, 0.0, "long"),
        record(0, 1, 30, True, 0.0),
        record(5, 0, 4, True, 0.5, "short"),
        record(5, 1, 4, True, 1.0),
        record(9, 0, 2, True, 1.0, "shorter"),
        record(9, 1, 6, False, 2.0),
        record(9, 0, 99, eval_set="eval_other"),
    ]
    view = before_after(records)
    assert view["before"] == {"step": 0, "length_mean": 20.0, "finished_fraction": 0.5, "kl": 0.0}
    # kl: token-weighted (2 x 1.0 + 6 x 2.0) / 8 = 1.75
    assert view["after"] == {"step": 9, "length_mean": 4.0, "finished_fraction": 0.5, "kl": 1.75}
    assert (view["prompt"], view["source"]) == ("prompt 0", "eval.jsonl:1")
    assert (view["completion_before"], view["completion_after"]) == ("long", "shorter")
    assert before_after(records[:2]) is None  # one evaluation: nothing to compare


def test_model_card_section_shows_the_sample(tmp_path):
    write_records(tmp_path / "generations.jsonl", [record(0, 0, 10, completion="before"), record(4, 0, 3)], False)
    text = "\n".join(card_lines(tmp_path))
    assert "## Generations before and after training" in text
    assert "mean generated length 10.0 -> 3.0 tokens" in text and "```text\nbefore\n```" in text
    assert card_lines(tmp_path / "missing") == []


class FakeTable:
    """W&B's ``Table(columns=, data=)`` or Trackio's ``Table(dataframe=)``; pandas turns a missing log-ratio into NaN."""

    def __init__(self, columns=None, data=None, dataframe=None):
        if dataframe is not None:
            columns = list(dataframe.columns)
            data = [[None if v != v else v for v in row] for row in dataframe.values.tolist()]
        self.columns, self.data = columns, data


def test_tables_reach_every_started_tracker(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers.integrations import MLflowCallback, TensorBoardCallback, TrackioCallback, WandbCallback

    logged = []
    wandb = object.__new__(WandbCallback)
    wandb._initialized, wandb._wandb = True, types.SimpleNamespace(Table=FakeTable, log=logged.append)
    trackio = object.__new__(TrackioCallback)
    trackio._initialized, trackio._trackio = True, types.SimpleNamespace(Table=FakeTable, log=logged.append)
    mlflow = object.__new__(MLflowCallback)
    tables = []
    mlflow._initialized, mlflow._ml_flow = True, types.SimpleNamespace(log_table=lambda **kw: tables.append(kw))
    mlflow._auto_end_run = False
    idle = object.__new__(WandbCallback)
    idle._initialized = False  # a tracker that never started is left alone
    tensorboard = TensorBoardCallback()
    tensorboard.tb_writer = tensorboard._SummaryWriter(log_dir=str(tmp_path))
    records = [record(3, 0, 2, completion="a|b\nc"), record(3, 1, 5, False, None)]

    written = log_tables([tensorboard, wandb, trackio, mlflow, idle], records, "eval", 3)
    assert written == ["tensorboard", "wandb", "trackio", "mlflow"]
    rows = [
        [3, "eval.jsonl:1", "prompt 0", "a|b\nc", 2, True, 0.0],
        [3, "eval.jsonl:2", "prompt 1", "x", 5, False, None],
    ]
    for entry in logged:  # W&B and Trackio: the table under eval/generations at the trainer's step
        assert entry["train/global_step"] == 3
        assert entry["eval/generations"].columns == list(COLUMNS) and entry["eval/generations"].data == rows
    assert tables == [
        {"data": {c: [row[i] for row in rows] for i, c in enumerate(COLUMNS)}, "artifact_file": "eval/generations/step_0000003.json"}
    ]  # fmt: skip
    tensorboard.tb_writer.close()
    accumulator = EventAccumulator(str(tmp_path))
    accumulator.Reload()
    [event] = accumulator.Tensors("eval/generations/text_summary")
    text = event.tensor_proto.string_val[0].decode()
    assert event.step == 3 and text == markdown_table(records)
    assert "a\\|b<br>c" in text  # the cell's pipe and newline cannot break the Markdown table
    assert table_key("eval_other") == "eval/other_generations"


def test_a_resumed_run_keeps_the_records_up_to_its_checkpoint_and_the_step0_lengths(tmp_path):
    from accelerate import PartialState

    from hf_dpo.training.generation_eval import GenerationEval
    from hf_dpo.training.generation_records import read_records

    path = tmp_path / "generations.jsonl"
    write_records(path, [record(0, 0, 10), record(0, 1, 20), record(4, 0, 5), record(8, 0, 1)], append=False)
    args = cpu_args(tmp_path, eval_generations=2)
    accelerator = types.SimpleNamespace(is_main_process=PartialState().is_main_process, state=types.SimpleNamespace())
    callback = GenerationEval(args, accelerator, build_tokenizer("chatml"), "model", None, "single", list)
    callback.on_train_begin(args, types.SimpleNamespace(global_step=4), None)
    assert [(r["step"], r["row_id"]) for r in read_records(path)] == [(0, 0), (0, 1), (4, 0)]  # step 8 is redone
    assert callback.baselines == {"eval": 15.0} and callback.append
    assert json.loads(path.read_text().splitlines()[0])["tokens"] == 10
    # With eval_on_start the resumed run evaluates step 4 again: its earlier records go too.
    args.eval_on_start = True
    callback.on_train_begin(args, types.SimpleNamespace(global_step=4), None)
    assert [(r["step"], r["row_id"]) for r in read_records(path)] == [(0, 0), (0, 1)]


def test_fsdp1_is_refused_when_the_trainer_is_built():
    from hf_dpo.reference.engines import EngineError
    from hf_dpo.training.generation_engines import refuse_generation_engine

    with pytest.raises(EngineError, match="--eval_generations under FSDP1.*FSDP2.*--eval_generations 0"):
        refuse_generation_engine("fsdp1")
    for engine in ("single", "ddp", "zero0", "zero2", "zero3", "fsdp2"):
        refuse_generation_engine(engine)  # the engines tests/test_distributed.py generates under
