"""``--eval_generations N``: what the model writes for the first N held-out prompts, at every evaluation.

:meth:`GenerationEval.evaluate` runs inside each evaluation (the trainer calls it after scoring
the held-out pairs, so its numbers join the same log entry): every rank completes its share of
the prompts (:mod:`~hf_dpo.training.generations`, with the engine's parameters gathered by
:mod:`~hf_dpo.training.generation_engines`), the completions are gathered so that every prompt
appears once, scored by policy and reference (:mod:`~hf_dpo.training.generation_kl`), written to
``generations.jsonl`` (:mod:`~hf_dpo.training.generation_records`) and, once the scalars are
logged, sent to the trackers as a table (:mod:`~hf_dpo.training.generation_tables`).

The cost is bounded by the flags: at most N x ``eval_generation_max_new_tokens`` decoded tokens
per evaluation (N / world size per rank, ``per_device_eval_batch_size`` prompts per ``generate``
call), plus one scoring forward of the N completions per model. Its time is logged as
``eval_generation/runtime``, and a WARNING at the end of training says when it took more than a
fifth of the training time.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Optional

import torch
from accelerate.utils import gather_object
from torch import nn
from transformers import TrainerCallback

from ..common.models import unwrap
from ..layouts import default_pad_token_id
from .generation_engines import full_parameters, refuse_generation_engine
from .generation_kl import Score, completion_logratios, mean_token_logratio
from .generation_records import read_records, records_path, write_records
from .generation_tables import log_tables
from .generations import Completion, generate, generation_config, select_prompts, shard, stop_token_ids

logger = logging.getLogger(__name__)

MAX_SHARE = 0.2  # of the training time, above which the end of training warns


@contextlib.contextmanager
def evaluation_mode(module: nn.Module):
    """``module`` in eval mode (no dropout), each submodule's own mode restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


class GenerationEval(TrainerCallback):
    """Completions of held-out prompts at every evaluation, their records, scalars and tracker tables.

    Args:
        args: the trainer's :class:`~hf_dpo.DPOConfig` (``eval_generations``, ``eval_generation_*``, ``seed``...).
        accelerator: the trainer's accelerator (ranks, device, autocast, the engine's FSDP plugin).
        tokenizer: decodes prompts and completions; its chat template gives the end-of-turn token.
        reference_mode: ``model``, ``adapter`` or ``none`` (:mod:`hf_dpo.reference.modes`).
        score: ``score(model, batch) -> (sums, counts)``, the trainer's scoring seam.
        engine: what :func:`hf_dpo.reference.engines.engine_of` returns; FSDP1 is refused here.
        callbacks: returns the trainer's callbacks (the trackers' integration callbacks among them).
    """

    def __init__(
        self, args, accelerator, tokenizer, reference_mode: str, score: Score, engine: str, callbacks: Callable
    ):
        refuse_generation_engine(engine)
        if tokenizer is None:
            raise ValueError("--eval_generations needs the tokenizer (processing_class) to decode what is generated")
        self.args, self.accelerator, self.tokenizer = args, accelerator, tokenizer
        self.reference_mode, self.score, self.engine, self.callbacks = reference_mode, score, engine, callbacks
        self.pad_token_id = default_pad_token_id(tokenizer)
        plugin_value = getattr(getattr(accelerator.state, "fsdp_plugin", None), "reshard_after_forward", True)
        self.reshard_after_forward = plugin_value if isinstance(plugin_value, bool) else True
        self.path = records_path(args.output_dir)
        self.stop_ids: Optional[list[int]] = None
        self.baselines: dict[str, float] = {}  # eval set -> mean generated length at step 0
        self.pending: list[tuple[str, int, list[dict]]] = []  # tables to send once the scalars are logged
        self.seconds = 0.0
        self.train_start: Optional[tuple[float, float]] = None  # (clock, self.seconds) when training began
        self.append = False  # a fresh run's first evaluation replaces an older file; a resumed run appends
        self.warned: set[str] = set()

    @classmethod
    def attach(
        cls, callback_handler, args, accelerator, tokenizer, reference_mode: str, score: Score, engine: str
    ) -> Optional[GenerationEval]:
        """A :class:`GenerationEval` registered with the trainer's ``callback_handler``, or None with
        ``args.eval_generations == 0``; the other arguments are those of the constructor."""
        if not args.eval_generations:
            return None
        callback = cls(args, accelerator, tokenizer, reference_mode, score, engine, lambda: callback_handler.callbacks)
        callback_handler.add_callback(callback)
        return callback

    # ------------------------------------------------------------------ one evaluation

    def evaluate(
        self, model: nn.Module, ref_model: Optional[nn.Module], dataset, eval_set: str, step: int, report=None
    ) -> dict[str, float]:
        """Generate, score and record; returns the scalars to log, ``{eval_set}_generation/<name>``.

        ``model``: the policy as Trainer wraps it; ``ref_model``: the separate reference or None;
        ``dataset``: the tokenized evaluation set; ``report``: its :class:`~hf_dpo.DataReport` (for ``file:line``).
        """
        start = time.perf_counter()
        prompts = select_prompts(dataset, self.args.eval_generations)
        if not prompts:
            return {}
        completions = self._complete(model, prompts, step)
        logratios, kl = self._logratios(model, ref_model, completions)
        records = [self._record(c, step, eval_set, report, logratios[i]) for i, c in enumerate(completions)]
        metrics = self._metrics(completions, kl, eval_set, step)
        if self.accelerator.is_main_process:
            write_records(self.path, records, append=self.append)
            self.pending.append((eval_set, step, records))
        self.append = True
        metrics["runtime"] = time.perf_counter() - start
        self.seconds += metrics["runtime"]
        return {f"{eval_set}_generation/{name}": value for name, value in metrics.items()}

    def _complete(self, model: nn.Module, prompts, step: int) -> list[Completion]:
        accelerator = self.accelerator
        if self.stop_ids is None:
            self.stop_ids = stop_token_ids(self.tokenizer, unwrap(model), self.args.chat_template_kwargs)
        config = generation_config(
            self.args.eval_generation_kwargs, self.args.eval_generation_max_new_tokens, self.stop_ids, self.pad_token_id
        )
        mine = shard(prompts, accelerator.process_index, accelerator.num_processes)
        device = accelerator.device
        # Sampling draws from a forked generator seeded by the step: training's random stream is left as it was.
        with (
            torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type),
            accelerator.autocast(),
            full_parameters(model, self.engine, self.reshard_after_forward) as module,
            evaluation_mode(module),
        ):
            torch.manual_seed(self.args.seed + step)
            local = generate(module, mine, config, self.args.per_device_eval_batch_size, device) if mine else []
        return gather_object(local) if accelerator.num_processes > 1 else local

    def _logratios(self, model: nn.Module, ref_model: Optional[nn.Module], completions) -> tuple[list, Optional[float]]:
        """Each completion's mean per-token log-ratio to the reference and the token-weighted mean over all of them;
        ``([None, ...], None)`` when there is no reference to run."""
        if self.reference_mode == "none" or (self.reference_mode == "model" and ref_model is None):
            why = "the loss is reference-free" if self.reference_mode == "none" else "the reference model was released"
            self._warn_once(
                "kl",
                f"eval_generation/kl is not logged: {why} (precompute_ref_logps caches the pairs' "
                "reference log-probs only), so the reference cannot score what the policy generates",
            )
            return [None] * len(completions), None
        policy = unwrap(model)
        with self.accelerator.autocast(), evaluation_mode(policy):
            sums, counts = completion_logratios(
                completions,
                policy,
                self.reference_mode,
                ref_model,
                self.score,
                self.pad_token_id,
                self.args.per_device_eval_batch_size,
                self.accelerator.device,
            )
        return (sums / counts.clamp(min=1)).tolist(), mean_token_logratio(sums, counts)

    def _metrics(self, completions, kl: Optional[float], eval_set: str, step: int) -> dict[str, float]:
        lengths = [len(c.ids) for c in completions]
        length_mean = sum(lengths) / len(lengths)
        chosen_mean = sum(c.prompt.chosen_tokens for c in completions) / len(completions)
        metrics = {
            "length_mean": length_mean,
            "finished_fraction": sum(c.finished for c in completions) / len(completions),
            "chosen_length_ratio": length_mean / chosen_mean if chosen_mean else float("nan"),
        }
        if step == 0:
            self.baselines[eval_set] = length_mean
        if eval_set in self.baselines:
            metrics["length_ratio"] = length_mean / self.baselines[eval_set]
        else:
            self._warn_once(
                "ratio",
                "eval_generation/length_ratio is not logged: there are no step-0 generations to "
                "compare with; set eval_on_start=True (the hf-dpo command does)",
            )
        if kl is not None:
            metrics["kl"] = kl
        return metrics

    def _record(self, completion: Completion, step: int, eval_set: str, report, logratio) -> dict[str, Any]:
        prompt = completion.prompt
        text_ids = completion.ids[:-1] if completion.finished else completion.ids  # the stop token is not text
        return {
            "step": step,
            "eval_set": eval_set,
            "row_id": prompt.row_id,
            "source": report.where(prompt.row_id) if report is not None else f"row {prompt.row_id}",
            "prompt": self.tokenizer.decode(list(prompt.ids), skip_special_tokens=False),
            "completion": self.tokenizer.decode(list(text_ids), skip_special_tokens=False),
            "completion_ids": list(completion.ids),
            "tokens": len(completion.ids),
            "finished": completion.finished,
            "logratio": logratio,
        }

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self.warned and self.accelerator.is_main_process:
            logger.warning(message)
        self.warned.add(key)

    # ------------------------------------------------------------------ callback events

    def on_train_begin(self, args, state, control, **kwargs):
        self.train_start = (time.perf_counter(), self.seconds)
        if state.global_step > 0:  # resumed: keep the records up to the checkpoint, and the step-0 lengths
            # eval_on_start evaluates the checkpoint's step again: its earlier records make way for the new ones.
            last = state.global_step - 1 if args.eval_on_start else state.global_step
            records = [r for r in read_records(self.path) if r["step"] <= last]
            if self.accelerator.is_main_process:
                write_records(self.path, records, append=False)
            for eval_set in {r.get("eval_set", "eval") for r in records}:
                lengths = [r["tokens"] for r in records if r["step"] == 0 and r.get("eval_set", "eval") == eval_set]
                if lengths:
                    self.baselines[eval_set] = sum(lengths) / len(lengths)
            self.append = True

    def on_evaluate(self, args, state, control, **kwargs):
        pending, self.pending = self.pending, []
        for eval_set, step, records in pending:
            log_tables(self.callbacks(), records, eval_set, step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.train_start is None:
            return
        started, seconds_before = self.train_start
        spent, elapsed = self.seconds - seconds_before, time.perf_counter() - started
        if elapsed > 0 and spent > MAX_SHARE * elapsed:
            self._warn_once(
                "share",
                f"evaluation generations took {spent:.1f} s of {elapsed:.1f} s of training ({spent / elapsed:.0%}): "
                "lower --eval_generations, --eval_generation_max_new_tokens or the evaluation frequency",
            )
