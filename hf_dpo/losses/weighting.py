"""Two per-sequence reweightings built from per-token quantities: WPO's pair weights and LD-DPO's log-probs.

Both need more than the per-sequence sums; the scoring stage returns what they need only when asked
(``score_batch(..., log_sum_sq=True, prefix_lengths=...)``), as per-sequence sums ``(2B,)``, sequences in
the order ``[chosen_1..B, rejected_1..B]``.

* **WPO** (Zhou et al. 2024, "Weighted Preference Optimization", Eq. 2 with weight alignment): each pair's
  loss is multiplied by ``w(y_w) w(y_l)``, ``w(y) = exp(mean_t [log p(y_t) - log sum_v p(v)^2])`` under the
  current policy, without gradient: off-policy pairs (unlikely under the policy) count less.
* **LD-DPO** (Liu et al. 2024, "length desensitization"): per pair, the first ``l_s = min(n_w, n_l)``
  response tokens of each side keep weight 1 and the rest (only the longer side has any) get ``ld_alpha``:
  ``logp_LD(y) = P(y) + ld_alpha (S(y) - P(y))``, ``P`` the sum over the first ``l_s`` tokens. The same for
  policy and reference; ``ld_alpha = 1`` is the plain sum, 0 truncates both sides to the shorter length.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


@torch.no_grad()
def wpo_pair_weights(policy_logp_sums: Tensor, log_sum_sq_sums: Tensor, counts: Tensor) -> Tensor:
    """WPO weight ``w(y_w) * w(y_l)`` per pair, ``(B,)``, from ``(2B,)`` policy log-prob sums, sums of
    ``log sum_v p_v^2`` over the same tokens, and token counts. No gradient."""
    per_token = (policy_logp_sums - log_sum_sq_sums) / counts.clamp_min(1).to(policy_logp_sums.dtype)  # (2B,)
    weights = torch.exp(per_token)
    n_pairs = weights.shape[0] // 2
    return weights[:n_pairs] * weights[n_pairs:]


def ld_prefix_lengths(chosen_lengths: Tensor, rejected_lengths: Tensor) -> Tensor:
    """``(2B,)``: for every sequence, the token count of the shorter response of its pair (LD-DPO's ``l_s``)."""
    shared = torch.minimum(chosen_lengths, rejected_lengths)  # (B,)
    return torch.cat([shared, shared])


def ld_logps(logp_sums: Tensor, prefix_sums: Tensor, ld_alpha: float) -> Tensor:
    """LD-DPO sequence log-probs ``(2B,)``: the first ``l_s`` tokens' sum plus ``ld_alpha`` times the rest."""
    return prefix_sums + ld_alpha * (logp_sums - prefix_sums)
