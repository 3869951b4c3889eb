"""What a run optimizes, in one object: the weighted list of losses and every setting they read.

:class:`LossObjective` is built from the config (any object with the ``DPOConfig`` field names), checks
the combination once at start (:meth:`LossObjective.check`, errors name the flag and the fix), says
which per-sequence extras the scoring stage must return (:meth:`LossObjective.score_extras`), predicts
the step-0 loss (:meth:`LossObjective.loss_at_zero`) and describes itself for the model card. The
losses themselves are combined by :func:`hf_dpo.losses.combination.objective_losses`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch

from .fdivergence import DEFAULT_F_ALPHA, DEFAULT_F_DIVERGENCE, F_DIVERGENCES
from .registry import ALWAYS, BY_FLAG, LOSS_REGISTRY, TOKEN_MEAN, LossSpec, get_loss
from .weighting import ld_logps, ld_prefix_lengths

Tensor = torch.Tensor

# Loss parameters (besides beta) and the value that means "not set"; a set value no loss of the run reads is refused.
PARAMETER_DEFAULTS: dict[str, Any] = {
    "label_smoothing": None,  # None: each loss's own default (1e-3 for exo_pair, 0 otherwise)
    "simpo_gamma": 0.5,
    "discopop_tau": 0.05,
    "f_divergence_type": DEFAULT_F_DIVERGENCE,
    "f_alpha_divergence_coef": DEFAULT_F_ALPHA,
}
# Loss types that sort the batch: WPO's per-pair weights would land on the wrong ranks.
_SORTING = ("aot", "aot_unpaired")


def as_loss_types(loss_type: Union[str, Sequence[str]]) -> tuple[str, ...]:
    """``"sigmoid"`` or ``["sigmoid", "sft"]`` -> a tuple of names (TRL: a string is a one-element list)."""
    return (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)


def _number(value: float) -> str:
    return f"{value:g}"


@dataclass(frozen=True)
class LossObjective:
    """``loss = sum_k loss_weights[k] * mean_i(wpo_i * loss_k,i)`` (+ ``sft_weight * mean_i sft_nll_i``).

    Field names are the config's. ``loss_weights`` default to 1 each and are not normalized (TRL's semantics).
    """

    loss_types: tuple[str, ...] = ("sigmoid",)
    loss_weights: Optional[tuple[float, ...]] = None
    beta: float = 0.1
    length_normalize: bool = True
    label_smoothing: Optional[float] = None
    simpo_gamma: float = 0.5
    discopop_tau: float = 0.05
    f_divergence_type: str = DEFAULT_F_DIVERGENCE
    f_alpha_divergence_coef: float = DEFAULT_F_ALPHA
    use_weighting: bool = False
    ld_alpha: Optional[float] = None
    sft_weight: float = 0.0

    @classmethod
    def from_config(cls, config: Any) -> LossObjective:
        """The objective of a ``DPOConfig`` (or any object with its field names; missing ones take the defaults)."""
        values = {name: getattr(config, name) for name in cls.__dataclass_fields__ if hasattr(config, name)}
        values["loss_types"] = as_loss_types(getattr(config, "loss_type", "sigmoid"))
        weights = getattr(config, "loss_weights", None)
        values["loss_weights"] = None if weights is None else tuple(float(w) for w in weights)
        return cls(**values)

    # ------------------------------------------------------------------ what it is

    @property
    def specs(self) -> list[LossSpec]:
        return [get_loss(name) for name in self.loss_types]

    @property
    def weights(self) -> tuple[float, ...]:
        return self.loss_weights if self.loss_weights is not None else (1.0,) * len(self.loss_types)

    @property
    def needs_reference(self) -> bool:
        return any(spec.needs_reference for spec in self.specs)

    @property
    def per_token(self) -> bool:
        """Whether the log-ratios (and rewards, ``logps/*``) are per token: the flag, or only per-token losses."""
        return self.length_normalize or all(spec.normalization == ALWAYS for spec in self.specs)

    def normalizes(self, spec: LossSpec) -> bool:
        """Whether ``spec`` gets the response lengths (its length-normalized form) in this run."""
        return spec.normalization == ALWAYS or (spec.normalization == BY_FLAG and self.length_normalize)

    def params(self) -> dict[str, Any]:
        """The loss parameters to pass to the loss functions (``label_smoothing`` only when set)."""
        values = {name: getattr(self, name) for name in PARAMETER_DEFAULTS}
        if values["label_smoothing"] is None:
            del values["label_smoothing"]
        return values

    def describe(self) -> str:
        """``sigmoid`` or ``sigmoid + sft (weights 1, 0.5)``."""
        names = " + ".join(self.loss_types)
        if self.loss_weights is not None and (len(self.loss_types) > 1 or self.loss_weights != (1.0,)):
            names += f" (weights {', '.join(_number(w) for w in self.loss_weights)})"
        return names

    # ------------------------------------------------------------------ checks

    def check(self, precompute_ref_logps: bool = False) -> None:
        """Raise ``ValueError`` naming the flag and the fix for a combination that is not defined."""
        specs = self.specs  # unknown names raise here, listing the registry
        names = " ".join(self.loss_types)
        if not self.loss_types:
            raise ValueError("--loss_type: give at least one loss")
        if len(set(self.loss_types)) != len(self.loss_types):
            raise ValueError(f"--loss_type {names}: each loss at most once (give one weight per loss instead)")
        if len(self.weights) != len(self.loss_types):
            raise ValueError(
                f"--loss_weights: {len(self.weights)} weights for {len(self.loss_types)} loss types ({names}); "
                "give one weight per loss type"
            )
        if any(not (math.isfinite(w) and w >= 0) for w in self.weights):
            raise ValueError(f"--loss_weights must be finite and >= 0, got {list(self.weights)}")
        if not self.beta > 0:
            raise ValueError(f"--beta must be > 0, got {self.beta}")
        if self.label_smoothing is not None and not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"--label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if "exo_pair" in self.loss_types and self.label_smoothing == 0:
            raise ValueError("--loss_type exo_pair needs --label_smoothing > 0 (the EXO paper uses 1e-3, the default)")
        if not self.discopop_tau > 0:
            raise ValueError(f"--discopop_tau must be > 0, got {self.discopop_tau}")
        if self.f_divergence_type not in F_DIVERGENCES:
            raise ValueError(
                f"--f_divergence_type: got {self.f_divergence_type!r}; choose one of {', '.join(F_DIVERGENCES)}"
            )
        if self.f_divergence_type != DEFAULT_F_DIVERGENCE:
            without = [spec_name for spec_name, spec in zip(self.loss_types, specs) if not spec.f_divergence]
            if without:
                raise ValueError(
                    f"--f_divergence_type {self.f_divergence_type} is not defined for --loss_type {', '.join(without)}: "
                    "these losses use each side's reward on its own, and the f-DPO derivation holds only for the "
                    "chosen-rejected difference. Supported: "
                    + ", ".join(n for n, s in LOSS_REGISTRY.items() if s.f_divergence)
                )
        self._check_unread_parameters(specs, names)
        if self.use_weighting and any(name in _SORTING for name in self.loss_types):
            raise ValueError(
                "--use_weighting (WPO) cannot be used with --loss_type aot or aot_unpaired: they sort the batch, so "
                "per-pair weights would land on the wrong ranks"
            )
        if self.ld_alpha is not None:
            if not 0 <= self.ld_alpha <= 1:
                raise ValueError(f"--ld_alpha must be in [0, 1], got {self.ld_alpha}")
            if precompute_ref_logps:
                raise ValueError(
                    "--ld_alpha cannot be used with --precompute_ref_logps: LD-DPO splits each reference response at "
                    "the shorter response's length, and the cache stores only whole sums; drop one of the two"
                )
        if self.sft_weight < 0:
            raise ValueError(f"--sft_weight must be >= 0, got {self.sft_weight}")
        if self.sft_weight and "sft" in self.loss_types:
            raise ValueError(
                "--sft_weight and --loss_type sft both add a chosen NLL term; give it once "
                "(--loss_weights sets the weight of sft)"
            )

    def _check_unread_parameters(self, specs: list[LossSpec], names: str) -> None:
        read = {param for spec in specs for param in spec.params}
        for name, default in PARAMETER_DEFAULTS.items():
            value = getattr(self, name)
            if value != default and name not in read and not (name == "label_smoothing" and value == 0):
                raise ValueError(
                    f"--{name} {value} has no effect with --loss_type {names}; "
                    + ("set it to 0" if name == "label_smoothing" else f"remove it (default {default})")
                )
        if self.f_alpha_divergence_coef != DEFAULT_F_ALPHA and self.f_divergence_type != "alpha_divergence":
            raise ValueError(
                f"--f_alpha_divergence_coef {self.f_alpha_divergence_coef} has no effect with --f_divergence_type "
                f"{self.f_divergence_type}; it is the alpha of alpha_divergence"
            )

    def notes(self) -> list[str]:
        """What the run does differently from TRL 1.16 with the same names, for the log."""
        notes = []
        if "sigmoid" in self.loss_types and self.label_smoothing:
            notes.append(
                f"--loss_type sigmoid with --label_smoothing {self.label_smoothing} is conservative DPO (cDPO, as "
                "TRL < 1.0); TRL 1.16's sigmoid ignores label_smoothing"
            )
        if "ipo" in self.loss_types and not self.length_normalize:
            notes.append(
                "--loss_type ipo with --length_normalize false is IPO on summed log-ratios (the IPO paper's form); "
                "TRL 1.16's ipo is always per token, which is --length_normalize true here"
            )
        if "exo_pair" in self.loss_types and self.label_smoothing is None:
            notes.append("exo_pair: label_smoothing 1e-3 (the EXO paper's value; TRL 1.16 requires it to be set)")
        return notes

    # ------------------------------------------------------------------ what scoring must return

    def score_extras(self, batch: Mapping[str, Tensor], reference: bool = False) -> dict[str, Any]:
        """Keyword arguments for ``score_batch`` beyond sums and counts: ``log_sum_sq`` (WPO, the policy only)
        and ``prefix_lengths`` (LD-DPO); empty, at no cost, when neither is on."""
        extras: dict[str, Any] = {}
        if self.use_weighting and not reference:
            extras["log_sum_sq"] = True
        if self.ld_alpha is not None:
            extras["prefix_lengths"] = ld_prefix_lengths(batch["chosen_lengths"], batch["rejected_lengths"])
        return extras

    def sequence_logps(self, sums: Tensor, extras: Optional[Mapping[str, Tensor]] = None) -> Tensor:
        """The per-sequence log-probs the losses compare ``(2B,)``: the sums, LD-weighted with ``ld_alpha``."""
        if self.ld_alpha is None:
            return sums
        if not extras or "prefix_sums" not in extras:
            raise ValueError("--ld_alpha needs the prefix sums that score_batch returns for prefix_lengths")
        return ld_logps(sums, extras["prefix_sums"], self.ld_alpha)

    # ------------------------------------------------------------------ step 0

    def loss_at_zero(self) -> tuple[Optional[float], str]:
        """``(loss, "")`` of a policy equal to its reference (every log-ratio 0), or ``(None, why not)``."""
        if self.sft_weight or any(spec.normalization == TOKEN_MEAN for spec in self.specs):
            return None, "the chosen NLL term (sft) depends on the data"
        if not self.needs_reference:
            return None, "a reference-free loss depends on the policy's own log-probs"
        if self.use_weighting:
            return None, "WPO's weights depend on the policy's probabilities of the batch"
        zero, one = torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
        total = 0.0
        for spec, weight in zip(self.specs, self.weights):
            lengths = {"chosen_lengths": one, "rejected_lengths": one} if self.normalizes(spec) else {}
            losses, _, _ = spec.fn(zero, zero, zero, zero, beta=self.beta, **self.params(), **lengths)
            total += weight * float(losses[0])
        return total, ""

    # ------------------------------------------------------------------ the model card

    def card_rows(self) -> list[tuple[str, Any]]:
        """``(name, value)`` rows that say what was optimized, with each loss's formula from the registry."""
        rows: list[tuple[str, Any]] = [
            ("loss_type", "; ".join(f"{name}: {spec.description}" for name, spec in zip(self.loss_types, self.specs)))
        ]
        if len(self.loss_types) > 1 or self.weights != (1.0,):
            rows.append(("loss_weights", ", ".join(_number(w) for w in self.weights)))
        read = {param for spec in self.specs for param in spec.params}
        for name, default in PARAMETER_DEFAULTS.items():
            value = getattr(self, name)
            if name in read and (value != default or name == "simpo_gamma") and value is not None:
                rows.append((name, value))
        if self.use_weighting:
            rows.append(("use_weighting", "True (WPO: each pair weighted by the policy's probability of it)"))
        if self.ld_alpha is not None:
            rows.append(("ld_alpha", f"{self.ld_alpha} (LD-DPO: tokens past the shorter response weighted by it)"))
        if self.sft_weight:
            rows.append(("sft_weight", self.sft_weight))
        return rows
