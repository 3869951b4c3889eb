"""NormalizedDPOTrainer: a thin Trainer subclass for length-normalized DPO.

Trainer and accelerate own the loop, mixed precision, gradient accumulation, checkpointing and distribution. This
class adds what DPO needs: data preparation, a reference, ``compute_loss``/``prediction_step``, and metric logging.
The stages it wires together live in their own folders (docs/architecture.md).
"""

from __future__ import annotations

import gc
import logging
from typing import Any, Optional, Union

import datasets
import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, Trainer, TrainingArguments

from ..common.columns import BATCH_COLUMNS, REF_LOGP_COLUMNS, TOKENIZED_COLUMNS
from ..common.models import disable_dropout
from ..data import is_canonical, load_preference_dataset
from ..layouts import LayoutCheck, build_collator, choose_layouts, default_pad_token_id
from ..layouts.attention import require_4d_mask_attention
from ..layouts.choice import log_choice
from ..layouts.grouping import add_length_column, wants_length_grouping
from ..losses import LossObjective, objective_losses
from ..reference import build_reference_model, prepare_reference, reference_logp_sums, resolve_reference_mode
from ..reference.adapters import attach_adapters
from ..reference.cache import (
    cache_settings,
    compute_reference_sums,
    has_reference_columns,
    model_fingerprint,
    reference_sums_for,
    with_reference_columns,
)
from ..scoring import score_batch
from ..tokenization import tokenize_dataset
from .config import DPOConfig, as_dpo_config
from .faults import process_callbacks, relay_failures
from .generation_eval import GenerationEval
from .guards import TrainingGuards
from .launch import EngineCheck, check_launch
from .metrics import PairMetrics
from .model_card import write_model_card
from .moe import RouterAux
from .reference_upkeep import ReferenceUpkeep
from .selfcheck import warn_about_settings
from .splits import DataReportCallback, map_eval_sets, map_splits

logger = logging.getLogger(__name__)


@relay_failures("__init__", "train")  # an exception in either on one process stops every process with the same line
class NormalizedDPOTrainer(Trainer):
    """Direct Preference Optimization with length-normalized (per-token mean) log-probs by default.

    Args:
        model: the policy, a ``PreTrainedModel`` or a name/path for ``AutoModelForCausalLM.from_pretrained``.
        ref_model: an optional separate reference model; see ``DPOConfig.reference`` for the default.
        args: a :class:`DPOConfig` (plain ``TrainingArguments`` are converted with DPO defaults).
        train_dataset, eval_dataset: raw rows (any layout :func:`hf_dpo.load_preference_dataset` accepts),
            canonical rows, or already tokenized pairs.
        processing_class: the tokenizer; needed unless the data sets are already tokenized.
        peft_config: a ``peft.PeftConfig`` to wrap the policy with; the reference is then the adapter-disabled base.
    """

    # Our loss is a per-pair mean, so Trainer must divide it by the accumulation steps itself.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: Union[PreTrainedModel, nn.Module, str, None] = None,
        ref_model: Union[PreTrainedModel, nn.Module, str, None] = None,
        args: Optional[TrainingArguments] = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        peft_config=None,
        **kwargs: Any,
    ):
        args = as_dpo_config(args)
        if isinstance(model, str):
            model = AutoModelForCausalLM.from_pretrained(model, trust_remote_code=args.trust_remote_code)
        if isinstance(ref_model, str):
            ref_model = AutoModelForCausalLM.from_pretrained(ref_model, trust_remote_code=args.trust_remote_code)
        model = attach_adapters(model, peft_config, ref_model, args)  # LoRA, ref_adapter: reference/adapters.py
        if args.disable_dropout:
            disable_dropout(model)
        self.objective = LossObjective.from_config(args)  # the weighted list of losses and their settings
        needs_reference = self.objective.needs_reference
        self.reference_mode = resolve_reference_mode(model, ref_model, args.reference, needs_reference)
        self.ref_model = build_reference_model(model, ref_model, self.reference_mode)
        if args.share_prompt is True:
            require_4d_mask_attention(model)

        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        self.data_reports = {}
        # The data sets the model card names (hub ids or file names); the command line fills it in.
        self.model_card_datasets: list[str] = []
        train_dataset, eval_dataset = map_splits(
            lambda dataset, name: self._prepare_dataset(dataset, tokenizer, args, name), train_dataset, eval_dataset
        )
        self.router_aux = RouterAux(model, self.ref_model, args.router_aux_loss_coef)  # MoE load balancing: moe.py
        self.router_aux.refuse_packed_layouts(args.padding_free, args.share_prompt)
        self.layout = choose_layouts(  # resolves "auto"; each layout is verified on the first batch
            model,
            train_dataset,
            padding_free=args.padding_free,
            share_prompt=args.share_prompt,
            batch_size=args.per_device_train_batch_size,
            max_row_tokens=args.padding_free_max_row_tokens,
            pad_to_multiple_of=args.pad_to_multiple_of,
            packed_refusal=None if self.router_aux.coef is None else "an MoE router aux loss needs the padded layout",
        )
        if data_collator is None:
            if tokenizer is None:
                raise ValueError("processing_class (the tokenizer) is required to build the default DPOCollator")
            data_collator = build_collator(default_pad_token_id(tokenizer), self.layout)
            log_choice(self.layout)

        super().__init__(
            model=model,
            args=args,
            data_collator=data_collator,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            **kwargs,
        )
        # transformers < 4.58 decides the accumulation scaling from this flag alone.
        self.model_accepts_loss_kwargs = False
        self.metrics = PairMetrics(self.accelerator)
        self._metric_key_prefix: Optional[str] = None  # set while evaluate() runs
        # A layout chosen automatically that fails its check switches the collator back to padded.
        self.layout_check = LayoutCheck(
            self.layout.name, self.layout.explicit, self.score, getattr(self.data_collator, "use_padded", None)
        )
        self.callback_handler.callbacks.insert(0, DataReportCallback(self._data_report_splits, args))
        launch = check_launch(args, self.accelerator, self.reference_mode)  # refuses a launch without its engine
        self.response_only_logits = launch.response_only_logits
        self.guards = TrainingGuards(args, self.accelerator, self.reference_mode, lambda: self.ref_model, self._where)
        for callback in (self.guards, *process_callbacks(args)):  # checks agreed by all processes; timeouts
            self.add_callback(callback)
        warn_about_settings(args, self.model)
        for note in self.objective.notes():  # where a TRL name means something else here
            logger.warning(note)
        self.add_callback(EngineCheck(launch.engine, lambda: (self.model_wrapped, self.model)))
        self.reference_upkeep = ReferenceUpkeep(args, launch.engine, self.reference_mode, lambda: self.ref_model)
        self.add_callback(self.reference_upkeep)  # TR-DPO's syncs, the ref_adapter's state: reference_upkeep.py
        if self.ref_model is not None:
            self.ref_model = prepare_reference(self.ref_model, self.accelerator)  # sharded like the policy
        self.generation_eval = GenerationEval.attach(  # --eval_generations, or None: generation_eval.py
            self.callback_handler, args, self.accelerator, tokenizer, self.reference_mode, self.score, launch.engine
        )
        if wants_length_grouping(args):
            self.train_dataset = add_length_column(
                self.train_dataset, args.length_column_name, self.layout.share_prompt
            )
        if args.precompute_ref_logps:
            self._precompute_reference()  # adds ref_*_logp_sums columns, releases self.ref_model

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """``Trainer.train``, except that ``resume_from_checkpoint=True`` skips partly written checkpoints (and TR-DPO's
        synced reference resumes with the policy)."""
        return super().train(self.reference_upkeep.resume_point(resume_from_checkpoint), *args, **kwargs)

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model``, plus the DPO model card (README.md) next to the weights."""
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            self.reference_upkeep.saved(output_dir or self.args.output_dir)  # policy_adapter new: one adapter
            write_model_card(self, output_dir or self.args.output_dir)

    def create_model_card(self, **kwargs) -> None:
        """The DPO model card (:mod:`hf_dpo.training.model_card`) in ``output_dir``; ``push_to_hub`` uploads it."""
        if self.is_world_process_zero():
            write_model_card(self, self.args.output_dir, **kwargs)

    def _prepare_dataset(self, dataset, tokenizer, args: DPOConfig, name: str):
        """Raw or canonical rows -> tokenized pairs; already tokenized data passes through."""
        if dataset is None:
            return None
        if isinstance(dataset, datasets.Dataset) and set(TOKENIZED_COLUMNS) <= set(dataset.column_names):
            return dataset
        if tokenizer is None:
            raise ValueError(f"the {name} data set is not tokenized, so processing_class (the tokenizer) is required")
        with args.main_process_first(desc=f"preparing the {name} data set"):
            if not (isinstance(dataset, datasets.Dataset) and is_canonical(dataset)):
                dataset = load_preference_dataset(dataset, on_bad_row=args.on_bad_row, columns=args.dataset_columns)
            tokenized, report = tokenize_dataset(
                dataset,
                tokenizer,
                max_length=args.max_length,
                max_prompt_length=args.max_prompt_length,
                completion_turns=args.completion_turns,
                num_proc=args.dataset_num_proc,
                on_bad_row=args.on_bad_row,
                chat_template_kwargs=args.chat_template_kwargs,
            )
        self.data_reports[name] = report
        logger.info(
            "%s data: %d rows read, %d pairs kept, skipped %s",
            name,
            report.rows_read,
            len(tokenized),
            dict(report.skipped) or "none",
        )
        return tokenized

    def _data_report_splits(self) -> dict[str, tuple[Any, Any]]:
        """``{split name: (data report, tokenized data set)}`` of every split this trainer prepared."""
        datasets_by_name = {}
        map_splits(
            lambda dataset, name: datasets_by_name.setdefault(name, dataset), self.train_dataset, self.eval_dataset
        )
        return {name: (report, datasets_by_name.get(name)) for name, report in self.data_reports.items()}

    def _where(self, row_id: int) -> str:
        """``"file:line"`` of a training row id, for messages."""
        report = self.data_reports.get("train")
        return report.where(row_id) if report is not None else f"row {row_id}"

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = list(BATCH_COLUMNS)

    def _precompute_reference(self) -> None:
        """Add cached reference sums to the train and eval sets, then release the reference model.

        Data sets that already carry both ``ref_*_logp_sums`` columns are left as they are.
        """
        if self.reference_mode not in ("model", "adapter"):
            raise ValueError(
                f"--precompute_ref_logps needs a reference, but the reference mode is {self.reference_mode!r}"
            )
        args = self.args
        scorer = self.ref_model if self.reference_mode == "model" else self.model
        fingerprint = model_fingerprint(scorer, frozen_only=self.reference_mode == "adapter")
        settings = cache_settings(args, self.processing_class, fingerprint)
        batch_size = args.precompute_ref_batch_size or args.per_device_eval_batch_size

        def add_columns(dataset, name):
            if dataset is None or has_reference_columns(dataset):
                return dataset
            if not isinstance(dataset, datasets.Dataset):
                raise ValueError(
                    f"--precompute_ref_logps needs a datasets.Dataset, but the {name} set is a {type(dataset).__name__}"
                )

            def compute():
                description = f"Reference log-probs ({name})"
                progress = not args.disable_tqdm
                return compute_reference_sums(
                    dataset,
                    self._reference_scores,
                    self.data_collator,
                    self.accelerator,
                    batch_size,
                    description,
                    progress,
                )

            return with_reference_columns(
                dataset, reference_sums_for(dataset, name, settings, args.ref_logps_cache_dir, compute)
            )

        self.train_dataset, self.eval_dataset = map_splits(add_columns, self.train_dataset, self.eval_dataset)
        self._release_reference_model()

    def _reference_scores(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-prob sums and token counts ``(2B,)`` of a collated batch, scored as in training."""
        batch = self._prepare_inputs(batch)
        scorer = self.ref_model if self.reference_mode == "model" else self.model
        batch = self.layout_check({"reference" if self.reference_mode == "model" else "policy": scorer}, batch)
        with self.accelerator.autocast():
            sums = reference_logp_sums(self.reference_mode, self.model, self.ref_model, batch, self.score)
        return sums, torch.cat([batch["chosen_lengths"], batch["rejected_lengths"]])

    def _release_reference_model(self) -> None:
        """Drop this trainer's (and its accelerator's) references to the separate reference model and free it."""
        ref_model, self.ref_model = self.ref_model, None
        if ref_model is None:
            return
        # accelerate keeps every prepared model in this list and offers no call to drop one.
        self.accelerator._models[:] = [m for m in self.accelerator._models if m is not ref_model]
        del ref_model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        logger.info("reference model released: reference log-probs come from the precomputed columns")

    # ------------------------------------------------------------------ loss

    def score(self, model: nn.Module, batch: dict[str, torch.Tensor], **extras):
        """Response log-prob sums and token counts, each ``(2B,)``, of ``batch`` under ``model`` (and the extras a
        loss asks for, as a dict: :func:`hf_dpo.scoring.score_batch`).

        The seam where faster scoring paths plug in; policy and reference share it.
        """
        return score_batch(model, batch, self.args.logprob_chunk_size, self.response_only_logits, **extras)

    def _reference_logps(self, model: nn.Module, batch: dict[str, torch.Tensor]):
        """The reference's sequence log-probs as the losses compare them (LD-weighted with ld_alpha), and counts."""
        extras = self.objective.score_extras(batch, reference=True)
        if not extras:
            return self.score(model, batch)
        sums, counts, scored = self.score(model, batch, **extras)
        return self.objective.sequence_logps(sums, scored), counts

    def _scored_models(self, model: nn.Module) -> dict[str, nn.Module]:
        models = {"policy": model}
        if self.reference_mode == "model" and self.ref_model is not None and self.ref_model is not model:
            models["reference"] = self.ref_model
        return models

    def pair_losses(
        self, model: nn.Module, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, Optional[torch.Tensor], dict[str, torch.Tensor]]:
        """Per-pair losses ``(B,)``, the MoE router term (a scalar added once to their mean, or None) and the
        batch's metrics (scalars) for ``batch``."""
        batch = self.layout_check(self._scored_models(model), batch)  # once per model: packed == padded numbers
        with self.router_aux.capture():  # the policy's router logits, never the reference's
            policy = self.score(model, batch, **self.objective.score_extras(batch))  # (2B,) sums, counts[, extras]
        aux_loss = self.router_aux.loss(batch)
        ref_logps = reference_logp_sums(self.reference_mode, model, self.ref_model, batch, self._reference_logps)
        if self.objective.ld_alpha is not None and REF_LOGP_COLUMNS[0] in batch:
            raise ValueError("--ld_alpha needs per-token reference log-probs, but the data carries cached sums")
        sums, counts, *extras = policy
        out = objective_losses(self.objective, sums, counts, ref_logps, *extras)  # hf_dpo/losses/combination.py
        # Sums and means ran in float64 for accuracy; Trainer, GradScaler and DeepSpeed expect an fp32 loss.
        losses, metrics = out.losses.float(), out.metrics
        aux_term = None
        if aux_loss is not None:
            metrics["aux_loss"] = aux_loss.detach()
            aux_term = self.router_aux.coef * aux_loss  # a batch term: added once to the mean over pairs
        return losses, aux_term, metrics

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        losses, aux_term, metrics = self.pair_losses(model, inputs)
        preference = losses.mean()
        loss = preference if aux_term is None else preference + aux_term
        self.guards.check_loss(model, loss, losses, inputs, self.state.global_step, first_step_loss=preference.detach())
        self.metrics.add(metrics, "train" if model.training else "eval", losses.shape[0])
        return (loss, metrics) if return_outputs else loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """``Trainer.evaluate``, also on raw or canonical rows; the DPO metrics get ``metric_key_prefix`` like the loss."""
        if eval_dataset is not None and not isinstance(eval_dataset, str):  # a str names one of several eval sets
            tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)

            def prepare(dataset, key):
                return self._prepare_dataset(dataset, tokenizer, self.args, metric_key_prefix if key == "eval" else key)

            eval_dataset = map_eval_sets(prepare, eval_dataset)
        # Trainer.evaluate calls itself once per named eval set with the prefix "eval_<name>".
        outer, self._metric_key_prefix = self._metric_key_prefix, metric_key_prefix
        self.metrics.clear("eval")  # left by predict(), which logs nothing: not part of this evaluation
        try:
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        finally:
            self._metric_key_prefix = outer

    def evaluation_loop(self, dataloader, description, *args, metric_key_prefix: str = "eval", **kwargs):
        """``Trainer.evaluation_loop``, then the ``--eval_generations`` completions, logged with the evaluation."""
        output = super().evaluation_loop(dataloader, description, *args, metric_key_prefix=metric_key_prefix, **kwargs)
        if self.generation_eval is not None and description == "Evaluation":  # not predict()
            at = (self.model_wrapped, self.ref_model, dataloader.dataset, metric_key_prefix, self.state.global_step)
            output.metrics.update(self.generation_eval.evaluate(*at, self.data_reports.get(metric_key_prefix)))
        return output

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            losses, aux_term, metrics = self.pair_losses(model, inputs)
        self.metrics.add(metrics, "eval", losses.shape[0])
        loss = losses.mean() if aux_term is None else losses.mean() + aux_term
        # The DPO metrics are logged through log(); there are no logits to hand to compute_metrics.
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Add the DPO metrics of the logging interval, pair-weighted (prefixed like ``eval_loss`` in evaluation)."""
        split = "train" if self._metric_key_prefix is None else "eval"
        prefix = "" if self._metric_key_prefix is None else f"{self._metric_key_prefix}_"
        logs.update({prefix + key: value for key, value in self.metrics.drain(split).items()})
        if split == "train":
            self.guards.update_logs(logs)  # the loss over finite values only, with the count of the others
        return super().log(logs, *args, **kwargs)
