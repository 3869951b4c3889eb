"""DPOConfig: TrainingArguments plus the DPO settings, one help text per field."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Optional, Union

from transformers import TrainingArguments

from ..common.flags import parse_auto_bool
from ..losses import LOSS_REGISTRY
from .generations import check_generation_kwargs
from .trl_names import accept_trl_names

REFERENCE_CHOICES = ("auto", "model", "adapter", "none")
COMPLETION_TURNS_CHOICES = ("last", "all")
ON_BAD_ROW_CHOICES = ("error", "skip")
NONFINITE_LOSS_CHOICES = ("error", "skip")

# Per-token log-ratios are about |y| times smaller than summed ones, so the
# normalized loss needs a larger beta for the same sigmoid slope.
DEFAULT_BETA_SUM = 0.1
DEFAULT_BETA_MEAN = 2.0


def _choices_help(text: str, choices) -> str:
    return f"{text} Choices: {', '.join(choices)}."


@accept_trl_names  # DPOConfig(precompute_ref_log_probs=True) and TRL's other names (hf_dpo/training/trl_names.py)
@dataclass
class DPOConfig(TrainingArguments):
    """Training arguments for :class:`hf_dpo.NormalizedDPOTrainer`.

    Everything not listed here (batch size, learning rate, precision, logging,
    checkpointing, distribution) is a regular ``TrainingArguments`` field.
    """

    beta: Optional[float] = field(
        default=None,
        metadata={
            "help": "Inverse temperature of the preference loss. Default: "
            f"{DEFAULT_BETA_MEAN} with length_normalize (per-token log-ratios; about 2-10 works), "
            f"{DEFAULT_BETA_SUM} for summed log-probs."
        },
    )
    loss_type: str = field(
        default="sigmoid",
        metadata={
            "help": _choices_help(
                "Preference loss. "
                + "; ".join(f"{name}: {spec.description}" for name, spec in LOSS_REGISTRY.items())
                + ".",
                LOSS_REGISTRY,
            ),
            "choices": list(LOSS_REGISTRY),
        },
    )
    length_normalize: bool = field(
        default=True,
        metadata={
            "help": "Compare the mean log-prob per response token (True) instead of the sum (False, classic DPO)."
        },
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={
            "help": "Assumed probability that a preference label is flipped (cDPO for sigmoid, robust DPO); in [0, 0.5)."
        },
    )
    simpo_gamma: float = field(
        default=0.5, metadata={"help": "Target reward margin of the simpo loss, in reward units."}
    )
    sft_weight: float = field(
        default=0.0, metadata={"help": "Weight of an added per-token NLL term on the chosen response (0 turns it off)."}
    )
    max_length: Optional[int] = field(
        default=1024, metadata={"help": "Longest prompt + response in tokens; responses are cut from the right to fit."}
    )
    max_prompt_length: Optional[int] = field(
        default=None,
        metadata={
            "help": "Longest prompt in tokens; longer prompts lose their oldest tokens first. Default: half of "
            "max_length (512 for 1024), so that max_length alone is always valid; no limit when max_length is unset."
        },
    )
    completion_turns: str = field(
        default="last",
        metadata={
            "help": _choices_help(
                "Which assistant turns are scored: only the final answer, or every assistant turn of the conversation.",
                COMPLETION_TURNS_CHOICES,
            ),
            "choices": list(COMPLETION_TURNS_CHOICES),
        },
    )
    reference: str = field(
        default="auto",
        metadata={
            "help": _choices_help(
                "Reference for the log-ratios: a separate frozen model, the PEFT model with its adapter disabled, "
                "or none (reference-free losses). auto: the given ref_model, else the disabled adapter for a PEFT "
                "model, else none for reference-free losses, else a frozen copy of the initial policy.",
                REFERENCE_CHOICES,
            ),
            "choices": list(REFERENCE_CHOICES),
        },
    )
    on_bad_row: str = field(
        default="error",
        metadata={
            "help": _choices_help(
                "What a malformed data row does: stop with an error naming file and line, or count and skip it.",
                ON_BAD_ROW_CHOICES,
            ),
            "choices": list(ON_BAD_ROW_CHOICES),
        },
    )
    nonfinite_loss: str = field(
        default="error",
        metadata={
            "help": _choices_help(
                "What a NaN or infinite training loss does: stop with an error naming the rows of the batch, or skip "
                "that optimizer step (parameters, optimizer state and learning rate untouched) and count it in the "
                "logs as nonfinite_loss_skipped.",
                NONFINITE_LOSS_CHOICES,
            ),
            "choices": list(NONFINITE_LOSS_CHOICES),
        },
    )
    disable_dropout: bool = field(
        default=True, metadata={"help": "Turn dropout off in policy and reference, so that both score alike at step 0."}
    )
    logprob_chunk_size: int = field(
        default=1024,
        metadata={"help": "Response positions per fp32 log-sum-exp chunk; bounds the log-prob temporaries."},
    )
    pad_to_multiple_of: Optional[int] = field(
        default=None, metadata={"help": "Pad each batch's length to a multiple of this (e.g. 8 for tensor cores)."}
    )
    dataset_num_proc: Optional[int] = field(default=None, metadata={"help": "Processes for tokenizing the data set."})
    # Speed paths (docs/performance.md); each one is checked against the plain path by an equivalence test.
    response_only_logits: bool = field(
        default=True,
        metadata={
            "help": "Project only the last hidden states that predict scored tokens through the output embedding, in "
            "chunks recomputed in backward instead of stored logits. Models whose logits are not a plain projection "
            "(soft-capping, logit scaling, PEFT or quantized heads, sharded weights) are detected and use their full logits."
        },
    )
    padding_free: str = field(
        default="auto",
        metadata={
            "help": "auto, true or false. Pack each batch's 2B sequences into rows without padding; positions restart per "
            "sequence and attention never crosses sequences (sdpa/eager: an explicit mask; flash attention: from "
            "position_ids). auto: on when padding is at least 10 percent of the padded batch and the model passes the "
            "first-batch check, in rows bounded by the longest sequence on sdpa/eager.",
            "nargs": "?",
            "const": "true",
        },
    )
    padding_free_max_row_tokens: Optional[int] = field(
        default=None,
        metadata={
            "help": "With padding_free: pack sequences into rows of at most this many tokens, or of the batch's longest "
            "sequence if longer (first fit, longest first), instead of one row. SDPA/eager attention computes the whole "
            "row x row mask, so one row costs (batch tokens)^2; 1 (rows as long as the longest sequence) keeps it near "
            "the padded cost. Leave unset for flash attention, whose variable-length kernel prefers one row."
        },
    )
    share_prompt: str = field(
        default="auto",
        metadata={
            "help": "auto, true or false. Compute each pair's prompt once: lay out [prompt | chosen | rejected], the "
            "rejected tokens attending to the prompt but not to the chosen ones (needs attn_implementation sdpa, eager or "
            "flex_attention). auto: on when prompts are at least 10 percent of the tokens and the model passes the first-batch check.",
            "nargs": "?",
            "const": "true",
        },
    )
    precompute_ref_logps: bool = field(
        default=False,
        metadata={
            "help": "Score the train and eval sets with the reference once before training (cached on disk, keyed by "
            "data, reference weights, tokenizer and truncation settings), then release the reference model."
        },
    )
    precompute_ref_batch_size: Optional[int] = field(
        default=None,
        metadata={
            "help": "Pairs per batch when precomputing reference log-probs (default: per_device_eval_batch_size)."
        },
    )
    ref_logps_cache_dir: Optional[str] = field(
        default=None,
        metadata={
            "help": "Directory of the precomputed reference log-probs cache (default: $HF_DPO_CACHE/ref_logps, "
            "HF_DPO_CACHE defaulting to ~/.cache/hf_dpo); an empty string turns the disk cache off."
        },
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={
            "help": "Kept False: the DPO collator needs the tokenized pair columns, which the model's forward does not name."
        },
    )
    chat_template_kwargs: Optional[Union[dict, str]] = field(
        default=None,
        metadata={
            "help": "Keyword arguments passed to every chat template call, as a dict or a JSON object string, e.g. "
            "'{\"enable_thinking\": false}' for Qwen3; a row's own chat_template_kwargs update them for that row."
        },
    )
    router_aux_loss_coef: Optional[float] = field(
        default=None,
        metadata={
            "help": "Weight of the mixture-of-experts router load-balancing loss added to the DPO loss (policy only, "
            "logged as aux_loss). Default: the model config's router_aux_loss_coef when its output_router_logits is "
            "true, else off; 0 logs aux_loss without training on it."
        },
    )
    # Evaluation generations (hf_dpo/training/generation_eval.py, docs/metrics.md).
    eval_generations: int = field(
        default=0,
        metadata={
            "help": "At every evaluation (the one before training included, with eval_on_start), complete the first N "
            "held-out prompts and log their length, end-of-turn rate and log-ratio to the reference; records in "
            "output_dir/generations.jsonl and the trackers' tables. 0 turns it off."
        },
    )
    eval_generation_max_new_tokens: int = field(
        default=256, metadata={"help": "Most tokens generated per prompt by --eval_generations."}
    )
    eval_generation_kwargs: Optional[Union[dict, str]] = field(
        default=None,
        metadata={
            "help": "GenerationConfig settings for --eval_generations as a dict or JSON object string; greedy when "
            'unset. E.g. \'{"do_sample": true, "temperature": 0.7, "top_p": 0.9}\' (seeded by seed + step).'
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Allow custom modeling and tokenizer code from a checkpoint's directory or hub repository "
            "(auto_map) whenever hf_dpo or hf-dpo loads a model or tokenizer by name or path. Off by default: "
            "it runs that code."
        },
    )

    def __post_init__(self):
        self.beta_is_default = self.beta is None
        self.padding_free = parse_auto_bool("padding_free", self.padding_free)
        self.share_prompt = parse_auto_bool("share_prompt", self.share_prompt)
        if self.beta is None:
            self.beta = DEFAULT_BETA_MEAN if self.length_normalize else DEFAULT_BETA_SUM
        _check_choice("loss_type", self.loss_type, LOSS_REGISTRY)
        _check_choice("completion_turns", self.completion_turns, COMPLETION_TURNS_CHOICES)
        _check_choice("reference", self.reference, REFERENCE_CHOICES)
        _check_choice("on_bad_row", self.on_bad_row, ON_BAD_ROW_CHOICES)
        _check_choice("nonfinite_loss", self.nonfinite_loss, NONFINITE_LOSS_CHOICES)
        self.chat_template_kwargs = _parse_kwargs(self.chat_template_kwargs)
        self.eval_generation_kwargs = _parse_kwargs(self.eval_generation_kwargs, "eval_generation_kwargs")
        check_generation_kwargs(self.eval_generation_kwargs)
        if self.eval_generations < 0:
            raise ValueError(f"--eval_generations must be >= 0, got {self.eval_generations}")
        if self.router_aux_loss_coef is not None and self.router_aux_loss_coef < 0:
            raise ValueError(f"--router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")
        if not self.beta > 0:
            raise ValueError(f"--beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"--label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and not LOSS_REGISTRY[self.loss_type].uses_label_smoothing:
            raise ValueError(
                f"--label_smoothing {self.label_smoothing} has no effect with --loss_type {self.loss_type}; set it to 0"
            )
        if self.sft_weight < 0:
            raise ValueError(f"--sft_weight must be >= 0, got {self.sft_weight}")
        for name in (
            "max_length",
            "max_prompt_length",
            "pad_to_multiple_of",
            "logprob_chunk_size",
            "precompute_ref_batch_size",
            "padding_free_max_row_tokens",
            "eval_generation_max_new_tokens",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be a positive integer, got {value}")
        # Unset: half the budget, as TRL's 512/1024; an explicit value that leaves no room is still refused below.
        self.max_prompt_length_is_default = self.max_prompt_length is None
        if self.max_prompt_length is None and self.max_length is not None:
            if self.max_length < 2:
                raise ValueError(
                    f"--max_length must be at least 2 (one prompt and one response token), got {self.max_length}"
                )
            self.max_prompt_length = self.max_length // 2
        if (
            self.max_length is not None
            and self.max_prompt_length is not None
            and self.max_prompt_length >= self.max_length
        ):
            raise ValueError(
                f"--max_prompt_length ({self.max_prompt_length}) must be below --max_length ({self.max_length}) "
                "to leave room for the response"
            )
        if self.reference == "none" and LOSS_REGISTRY[self.loss_type].needs_reference:
            raise ValueError(
                f"--reference none cannot be used with --loss_type {self.loss_type}, which needs a reference"
            )
        if self.precompute_ref_logps and (
            self.reference == "none" or not LOSS_REGISTRY[self.loss_type].needs_reference
        ):
            raise ValueError(
                f"--precompute_ref_logps has no reference to precompute with --reference {self.reference} "
                f"and --loss_type {self.loss_type}"
            )
        super().__post_init__()


def _check_choice(flag: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"--{flag}: got {value!r}; choose one of {', '.join(choices)}")


def _parse_kwargs(value, flag: str = "chat_template_kwargs") -> Optional[dict]:
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else None
        except json.JSONDecodeError as err:
            raise ValueError(f"--{flag}: not valid JSON ({err}): {value!r}") from None
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"--{flag}: expected a JSON object, got {type(value).__name__}")
    return value


def as_dpo_config(args: Optional[TrainingArguments]) -> DPOConfig:
    """Accept plain ``TrainingArguments`` (drop-in use) by carrying every field over to a :class:`DPOConfig`."""
    if args is None:
        return DPOConfig(output_dir="hf_dpo_output")
    if isinstance(args, DPOConfig):
        return args
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    values["remove_unused_columns"] = False
    return DPOConfig(**values)
