"""NormalizedDPOTrainer: a thin Trainer subclass for length-normalized DPO.

Trainer and accelerate own the loop, mixed precision, gradient accumulation,
checkpointing and distribution. This class adds what DPO needs: data preparation,
a reference, ``compute_loss``/``prediction_step``, and metric logging.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import defaultdict
from typing import Any, Optional, Union

import datasets
import torch
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, Trainer, TrainingArguments

from .auto_layout import choose_layouts, log_choice
from .checkpoints import resolve_resume_checkpoint
from .collator import default_pad_token_id
from .config import DPOConfig
from .data import is_canonical, load_preference_dataset
from .engines import EngineCheck, check_launch, prepare_reference
from .guards import install_guards
from .layout_check import check_layout
from .logprobs import sequence_logps
from .model_card import write_model_card
from .moe import RouterAux
from .losses import preference_loss, sft_nll
from .reference import build_reference_model, disable_dropout, is_peft_model, reference_logp_sums, resolve_reference_mode
from .packing import build_collator
from .ref_cache import precompute_reference
from .report import DataReportCallback
from .sampling import add_length_column, wants_length_grouping
from .scoring import check_layout_support, score_batch
from .tokenization import TOKENIZED_COLUMNS, tokenize_dataset

logger = logging.getLogger(__name__)

BATCH_COLUMNS = [*TOKENIZED_COLUMNS, "prompt_length", "row_id", "ref_chosen_logp_sums", "ref_rejected_logp_sums"]


def as_dpo_config(args: Optional[TrainingArguments]) -> DPOConfig:
    """Accept plain ``TrainingArguments`` (drop-in use) by carrying every field over to a :class:`DPOConfig`."""
    if args is None:
        return DPOConfig(output_dir="hf_dpo_output")
    if isinstance(args, DPOConfig):
        return args
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    values["remove_unused_columns"] = False
    return DPOConfig(**values)


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
        trust_remote_code = args.trust_remote_code
        if isinstance(model, str):
            model = AutoModelForCausalLM.from_pretrained(model, trust_remote_code=trust_remote_code)
        if isinstance(ref_model, str):
            ref_model = AutoModelForCausalLM.from_pretrained(ref_model, trust_remote_code=trust_remote_code)
        if peft_config is not None and not is_peft_model(model):
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
            if args.gradient_checkpointing:
                model.enable_input_require_grads()
        if args.disable_dropout:
            disable_dropout(model)
        self.reference_mode = resolve_reference_mode(model, ref_model, args.reference, args.loss_type)
        self.ref_model = build_reference_model(model, ref_model, self.reference_mode)
        if args.share_prompt is True:
            check_layout_support(model, True)

        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        self.data_reports = {}
        train_dataset = self._prepare_dataset(train_dataset, tokenizer, args, "train")
        if isinstance(eval_dataset, dict):
            eval_dataset = {k: self._prepare_dataset(v, tokenizer, args, f"eval_{k}") for k, v in eval_dataset.items()}
        else:
            eval_dataset = self._prepare_dataset(eval_dataset, tokenizer, args, "eval")
        self.router_aux = RouterAux(model, self.ref_model, args.router_aux_loss_coef)  # MoE load balancing: hf_dpo/moe.py
        self.router_aux.refuse_packed_layouts(args.padding_free, args.share_prompt)
        packed_refusal = None if self.router_aux.coef is None else "an MoE router aux loss needs the padded layout"
        self.layout = choose_layouts(args, model, train_dataset, packed_refusal)  # resolves "auto"; verified on the first batch
        if data_collator is None:
            if tokenizer is None:
                raise ValueError("processing_class (the tokenizer) is required to build the default DPOCollator")
            data_collator = build_collator(default_pad_token_id(tokenizer), self.layout)  # DPOCollator unless padding_free / share_prompt
            log_choice(self.layout, args)

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
        # split -> metric -> [(sum over the step's pairs, pair count)], so log() weights every pair equally.
        self._metrics: dict[str, defaultdict[str, list[tuple[float, float]]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._metric_key_prefix: Optional[str] = None  # set while evaluate() runs
        self.add_callback(DataReportCallback(self))
        self.guards = install_guards(self)  # non-finite loss, first-step ln 2 check, beta warning
        check_launch(self)  # refuses a launch that asked for an engine it would not get
        self.add_callback(EngineCheck(self))
        if self.ref_model is not None:
            self.ref_model = prepare_reference(self, self.ref_model)  # sharded like the policy: hf_dpo/engines.py
        if wants_length_grouping(args):
            self.train_dataset = add_length_column(self.train_dataset, args.length_column_name, self.layout.share_prompt)
        if args.precompute_ref_logps:
            precompute_reference(self)  # adds ref_*_logp_sums columns, releases self.ref_model

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """``Trainer.train``, except that ``resume_from_checkpoint=True`` skips partly written checkpoints."""
        return super().train(resolve_resume_checkpoint(resume_from_checkpoint, self.args), *args, **kwargs)

    def save_model(self, output_dir: Optional[str] = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model``, plus the DPO model card (README.md) next to the weights."""
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            write_model_card(self, output_dir or self.args.output_dir)

    def create_model_card(self, **kwargs) -> None:
        """The DPO model card (:mod:`hf_dpo.model_card`) in ``output_dir``; ``push_to_hub`` uploads it."""
        if self.is_world_process_zero():
            write_model_card(self, self.args.output_dir, **kwargs)

    # ------------------------------------------------------------------ data

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
                dataset = load_preference_dataset(dataset, on_bad_row=args.on_bad_row)
            tokenized, report = tokenize_dataset(
                dataset,
                tokenizer,
                max_length=args.max_length,
                max_prompt_length=args.max_prompt_length,
                completion_turns=args.completion_turns,
                num_proc=args.dataset_num_proc,
                on_bad_row=args.on_bad_row,
                chat_template_kwargs=getattr(args, "chat_template_kwargs", None),
            )
        self.data_reports[name] = report
        logger.info(
            "%s data: %d rows read, %d pairs kept, skipped %s",
            name, report.rows_read, len(tokenized), dict(report.skipped) or "none",
        )
        return tokenized

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = list(BATCH_COLUMNS)

    # ------------------------------------------------------------------ loss

    def score(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Response log-prob sums and token counts, each ``(2B,)``, of ``batch`` under ``model``.

        The seam where faster scoring paths plug in; policy and reference share it.
        """
        return score_batch(model, batch, self.args.logprob_chunk_size, self.args.response_only_logits)

    def pair_losses(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-pair losses ``(B,)`` and the batch's metrics (scalars) for ``batch``."""
        args = self.args
        batch = check_layout(self, model, batch)  # once per model: the packed layouts must give the padded numbers
        with self.router_aux.capture():  # the policy's router logits, never the reference's
            policy_sums, counts = self.score(model, batch)  # (2B,), (2B,)
        aux_loss = self.router_aux.loss(batch)
        ref_sums = reference_logp_sums(self.reference_mode, model, self.ref_model, batch, self.score)
        n_pairs = counts.shape[0] // 2
        policy_logps = sequence_logps(policy_sums, counts, args.length_normalize)  # (2B,)
        ref_logps = None if ref_sums is None else sequence_logps(ref_sums, counts, args.length_normalize)
        losses, chosen_rewards, rejected_rewards = preference_loss(
            policy_logps[:n_pairs],
            policy_logps[n_pairs:],
            None if ref_logps is None else ref_logps[:n_pairs],
            None if ref_logps is None else ref_logps[n_pairs:],
            loss_type=args.loss_type,
            beta=args.beta,
            label_smoothing=args.label_smoothing,
            simpo_gamma=args.simpo_gamma,
        )
        if args.sft_weight:
            losses = losses + args.sft_weight * sft_nll(policy_sums[:n_pairs], counts[:n_pairs])
        # Sums and means ran in float64 for accuracy; Trainer, GradScaler and DeepSpeed expect an fp32 loss.
        losses = losses.float()
        if aux_loss is not None:
            losses = losses + self.router_aux.coef * aux_loss  # a batch term: the mean over pairs adds it once
        detached = policy_logps.detach()
        metrics = {
            "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            # Exact ties (policy == reference at step 0) count half: no preference scores chance, 0.5, not 0.
            "rewards/accuracies": ((chosen_rewards > rejected_rewards).float() + 0.5 * (chosen_rewards == rejected_rewards).float()).mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": detached[:n_pairs].mean(),
            "logps/rejected": detached[n_pairs:].mean(),
            "lengths/chosen": counts[:n_pairs].float().mean(),
            "lengths/rejected": counts[n_pairs:].float().mean(),
        }
        if aux_loss is not None:
            metrics["aux_loss"] = aux_loss.detach()
        return losses, metrics

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        losses, metrics = self.pair_losses(model, inputs)
        loss = losses.mean()
        # The step-0 self-check predicts the preference loss alone, without the router's aux term.
        aux_term = self.router_aux.coef * metrics["aux_loss"] if "aux_loss" in metrics else 0.0
        self.guards.check_loss(model, loss, losses, inputs, first_step_loss=loss.detach() - aux_term)
        self._store_metrics(metrics, "train" if model.training else "eval", losses.shape[0])
        return (loss, metrics) if return_outputs else loss

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        """``Trainer.evaluate``, also on raw or canonical rows; the DPO metrics get ``metric_key_prefix`` like the loss."""
        if eval_dataset is not None and not isinstance(eval_dataset, str):  # a str names one of several eval sets
            tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
            if isinstance(eval_dataset, dict):
                eval_dataset = {k: self._prepare_dataset(v, tokenizer, self.args, f"eval_{k}") for k, v in eval_dataset.items()}
            else:
                eval_dataset = self._prepare_dataset(eval_dataset, tokenizer, self.args, metric_key_prefix)
        # Trainer.evaluate calls itself once per named eval set with the prefix "eval_<name>".
        outer, self._metric_key_prefix = self._metric_key_prefix, metric_key_prefix
        self._metrics["eval"].clear()  # left by predict(), which logs nothing: not part of this evaluation
        try:
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        finally:
            self._metric_key_prefix = outer

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            losses, metrics = self.pair_losses(model, inputs)
        self._store_metrics(metrics, "eval", losses.shape[0])
        # The DPO metrics are logged through log(); there are no logits to hand to compute_metrics.
        return losses.mean().detach(), None, None

    # ------------------------------------------------------------------ metrics

    def _store_metrics(self, metrics: dict[str, torch.Tensor], split: str, n_pairs: int) -> None:
        # One collective per step: the batch means times the pair count, and the count, summed over processes.
        # Weighting by pairs keeps a partial last batch from counting as much as a full one, as in eval_loss.
        means = torch.stack([value.detach().float() for value in metrics.values()])  # (K,)
        weighted = torch.cat([means * n_pairs, means.new_tensor([n_pairs])])  # (K + 1,)
        *sums, count = self.accelerator.gather_for_metrics(weighted[None]).sum(0).tolist()
        for key, value in zip(metrics, sums):
            self._metrics[split][key].append((value, count))

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """Add the DPO metrics averaged over the logging interval, every pair weighing the same (prefixed like ``eval_loss`` in evaluation)."""
        split = "train" if self._metric_key_prefix is None else "eval"
        prefix = "" if self._metric_key_prefix is None else f"{self._metric_key_prefix}_"
        for key, records in self._metrics[split].items():
            if records:
                logs[prefix + key] = sum(value for value, _ in records) / sum(count for _, count in records)
        self._metrics[split].clear()
        if split == "train":
            logs.update(self.guards.log_entries())
        return super().log(logs, *args, **kwargs)
