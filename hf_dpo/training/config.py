"""DPOConfig: TrainingArguments plus the DPO settings, one help text per field."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Union

from transformers import TrainingArguments

from ..common.flags import parse_auto_bool, parse_json_object
from ..data.columns import parse_columns
from ..losses import F_DIVERGENCES, LOSS_REGISTRY, LossObjective, as_loss_types, loss_type_help
from .dpo_defaults import DPOTrainingDefaults
from .generation_args import GenerationArguments, check_generation_arguments
from .reference_args import ReferenceArguments, check_reference_arguments
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
class DPOConfig(GenerationArguments, ReferenceArguments, DPOTrainingDefaults):
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
    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={"help": loss_type_help(), "choices": list(LOSS_REGISTRY)},
    )
    loss_weights: Optional[list[float]] = field(
        default=None,
        metadata={
            "help": "One weight per --loss_type (TRL's loss_weights): loss = sum of weight * loss; default 1 each, "
            "not normalized. E.g. --loss_type sigmoid sft --loss_weights 1 0.5."
        },
    )
    length_normalize: bool = field(
        default=True,
        metadata={
            "help": "Compare the mean log-prob per response token (True) instead of the sum (False, classic DPO and "
            "TRL's default), in every loss of the list (sigmoid_norm is always per token, sft always a token mean)."
        },
    )
    label_smoothing: Optional[float] = field(
        default=None,
        metadata={
            "help": "Assumed probability that a preference label is flipped, in [0, 0.5): cDPO for sigmoid, robust "
            "DPO, EXO's epsilon (exo_pair, default 1e-3), aot. Default: each loss's own (0 except exo_pair)."
        },
    )
    simpo_gamma: float = field(
        default=0.5, metadata={"help": "Target reward margin of the simpo loss, in reward units."}
    )
    discopop_tau: float = field(
        default=0.05, metadata={"help": "Temperature of the discopop loss's modulation sigmoid(beta*m/tau)."}
    )
    f_divergence_type: str = field(
        default="reverse_kl",
        metadata={
            "help": _choices_help(
                "f-DPO: the divergence whose f'(pi/pi_ref) replaces the log-ratio in sigmoid, sigmoid_norm, hinge, "
                "ipo, exo_pair, robust and discopop (docs/loss.md).",
                F_DIVERGENCES,
            ),
            "choices": list(F_DIVERGENCES),
        },
    )
    f_alpha_divergence_coef: float = field(
        default=0.5,
        metadata={"help": "alpha of f_divergence_type alpha_divergence, (u^(alpha-1) - 1)/(alpha - 1) (TRL 1.16's)."},
    )
    use_weighting: bool = field(
        default=False,
        metadata={
            "help": "WPO: weight each pair's loss by the policy's length-normalized probability of both responses "
            "(Zhou et al. 2024), for off-policy preference data."
        },
    )
    ld_alpha: Optional[float] = field(
        default=None,
        metadata={
            "help": "LD-DPO, in [0, 1]: response tokens past the shorter response's length count ld_alpha times in the "
            "log-probs of policy and reference (1: plain sums, 0: both cut to the shorter length)."
        },
    )
    sft_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of an added per-token NLL of the chosen response, averaged per pair (0 turns it off); "
            "TRL's token mean over the batch is --loss_type ... sft."
        },
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
                "Which assistant turns are scored: the final answer (last) or every assistant turn (all).",
                COMPLETION_TURNS_CHOICES,
            ),
            "choices": list(COMPLETION_TURNS_CHOICES),
        },
    )
    reference: str = field(
        default="auto",
        metadata={
            "help": _choices_help(
                "Reference for the log-ratios; model: a separate frozen model, adapter: the PEFT model with its "
                "adapter disabled, none: reference-free losses. auto: the given ref_model, else the disabled adapter "
                "for a PEFT model, else none for reference-free losses, else a frozen copy of the initial policy.",
                REFERENCE_CHOICES,
            ),
            "choices": list(REFERENCE_CHOICES),
        },
    )
    on_bad_row: str = field(
        default="error",
        metadata={
            "help": _choices_help(
                "What a malformed data row does; error: stop, naming its file and line; skip: count and skip it.",
                ON_BAD_ROW_CHOICES,
            ),
            "choices": list(ON_BAD_ROW_CHOICES),
        },
    )
    nonfinite_loss: str = field(
        default="error",
        metadata={
            "help": _choices_help(
                "What a NaN or infinite training loss does; error: stop, naming the rows of the batch; skip: skip "
                "that optimizer step (parameters, optimizer state and learning rate untouched) and count it in the "
                "logs as nonfinite_loss_skipped.",
                NONFINITE_LOSS_CHOICES,
            ),
            "choices": list(NONFINITE_LOSS_CHOICES),
        },
    )
    nonfinite_max_consecutive_skips: int = field(
        default=5,
        metadata={
            "help": "With nonfinite_loss=skip: this many optimizer steps skipped in a row stop the run with the "
            "non-finite loss error (a model that gives NaN at every step would otherwise go on without training)."
        },
    )
    step_timeout: float = field(
        default=300,
        metadata={
            "help": "Seconds a process waits for the others in a collective operation (all-reduce, all-gather, "
            "barrier) during a training step, from the second step of a run on, before its process group fails: a "
            "killed or hung process then stops the others within this time instead of ddp_timeout. Every process "
            "group (the default one, DeepSpeed's and FSDP's) gets it at each step start and ddp_timeout back at the "
            "step end, so data preparation, evaluation and saving keep ddp_timeout. 0: ddp_timeout throughout."
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
            "help": "Project only the hidden states that predict scored tokens, in chunks recomputed in backward; "
            "saves the stored logits. Models whose logits are not a plain projection "
            "(soft-capping, logit scaling, PEFT or quantized heads, sharded weights) are detected and use their full logits."
        },
    )
    padding_free: str = field(
        default="auto",
        metadata={
            "help": "Pack each batch's 2B sequences into rows without padding (auto, true or false); positions restart per "
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
            "help": "With padding_free, rows of at most this many tokens (or the longest sequence) instead of one row; "
            "packed first fit, longest first. SDPA/eager attention computes the whole "
            "row x row mask, so one row costs (batch tokens)^2; 1 (rows as long as the longest sequence) keeps it near "
            "the padded cost. Leave unset for flash attention, whose variable-length kernel prefers one row."
        },
    )
    share_prompt: str = field(
        default="auto",
        metadata={
            "help": "Compute each pair's prompt once (auto, true or false); lay out [prompt | chosen | rejected], the "
            "rejected tokens attending to the prompt but not to the chosen ones (needs attn_implementation sdpa, eager or "
            "flex_attention). auto: on when prompts are at least 10 percent of the tokens and the model passes the first-batch check.",
            "nargs": "?",
            "const": "true",
        },
    )
    precompute_ref_logps: bool = field(
        default=False,
        metadata={
            "help": "Score the data with the reference once before training, then release the reference model; "
            "cached on disk, keyed by data, reference weights, tokenizer and truncation settings."
        },
    )
    precompute_ref_batch_size: Optional[int] = field(
        default=None,
        metadata={
            "help": "Pairs per batch when precomputing reference log-probs. Default: --per_device_eval_batch_size."
        },
    )
    ref_logps_cache_dir: Optional[str] = field(
        default=None,
        metadata={
            "help": "Folder of the precomputed reference log-probs cache; an empty string turns the disk cache off. "
            "Default: $HF_DPO_CACHE/ref_logps (HF_DPO_CACHE defaults to ~/.cache/hf_dpo)."
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
            "help": "Keyword arguments for every chat template call, e.g. '{\"enable_thinking\": false}' for Qwen3; "
            "a dict or a JSON object string; a row's own chat_template_kwargs update them for that row."
        },
    )
    dataset_columns: Optional[Union[dict, str]] = field(
        default=None,
        metadata={
            "help": "Column mapping for data in no layout hf_dpo detects, hf_dpo's name -> your column, as a dict or "
            'a JSON object string, e.g. \'{"prompt": "question", "chosen": "response_j", "rejected": "response_k"}\' '
            "(docs/data.md)."
        },
    )
    router_aux_loss_coef: Optional[float] = field(
        default=None,
        metadata={
            "help": "Weight of the MoE router load-balancing loss added to the DPO loss; policy only, logged as "
            "aux_loss, 0 logs it without training on it. Default: the model config's router_aux_loss_coef when its "
            "output_router_logits is true, else off."
        },
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={
            "help": "Run a checkpoint's own model and tokenizer code (auto_map); off by default, as it runs that "
            "code. Applies whenever hf_dpo or hf-dpo loads a model or tokenizer by name or path."
        },
    )

    def __post_init__(self):
        self.beta_is_default = self.beta is None
        self.padding_free = parse_auto_bool("padding_free", self.padding_free)
        self.share_prompt = parse_auto_bool("share_prompt", self.share_prompt)
        self.loss_type = list(as_loss_types(self.loss_type))
        for name in self.loss_type:
            _check_choice("loss_type", name, LOSS_REGISTRY)
        if self.loss_weights is not None:
            self.loss_weights = [float(weight) for weight in self.loss_weights]
        if self.beta is None:
            per_token = LossObjective.from_config(self).per_token
            self.beta = DEFAULT_BETA_MEAN if per_token else DEFAULT_BETA_SUM
        objective = LossObjective.from_config(self)
        objective.check(precompute_ref_logps=self.precompute_ref_logps)
        _check_choice("completion_turns", self.completion_turns, COMPLETION_TURNS_CHOICES)
        _check_choice("reference", self.reference, REFERENCE_CHOICES)
        _check_choice("on_bad_row", self.on_bad_row, ON_BAD_ROW_CHOICES)
        _check_choice("nonfinite_loss", self.nonfinite_loss, NONFINITE_LOSS_CHOICES)
        if self.nonfinite_max_consecutive_skips < 1:
            raise ValueError(
                f"--nonfinite_max_consecutive_skips must be >= 1, got {self.nonfinite_max_consecutive_skips}"
            )
        if self.step_timeout < 0:
            raise ValueError(
                f"--step_timeout must be >= 0 seconds (0: ddp_timeout throughout), got {self.step_timeout}"
            )
        self.chat_template_kwargs = parse_json_object(self.chat_template_kwargs, "chat_template_kwargs")
        self.dataset_columns = parse_columns(self.dataset_columns)
        if self.router_aux_loss_coef is not None and self.router_aux_loss_coef < 0:
            raise ValueError(f"--router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")
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
        losses = " ".join(self.loss_type)
        if self.reference == "none" and objective.needs_reference:
            raise ValueError(f"--reference none cannot be used with --loss_type {losses}, which needs a reference")
        if self.precompute_ref_logps and (self.reference == "none" or not objective.needs_reference):
            raise ValueError(
                f"--precompute_ref_logps has no reference to precompute with --reference {self.reference} "
                f"and --loss_type {losses}"
            )
        check_reference_arguments(self)
        check_generation_arguments(self)
        super().__post_init__()


def _check_choice(flag: str, value: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"--{flag}: got {value!r}; choose one of {', '.join(choices)}")


def as_dpo_config(args: Optional[TrainingArguments]) -> DPOConfig:
    """Accept plain ``TrainingArguments`` (drop-in use) by carrying every field over to a :class:`DPOConfig`."""
    if args is None:
        return DPOConfig(output_dir="hf_dpo_output")
    if isinstance(args, DPOConfig):
        return args
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainingArguments) if f.init}
    values["remove_unused_columns"] = False
    return DPOConfig(**values)
