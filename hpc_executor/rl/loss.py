"""The policy-gradient loss of one RL step, over the recorded completion tokens.

Both losses are importance-sampled at the token level: each completion token carries the ratio
``exp(new - old)`` of its log-probability under the policy being trained to the one it was sampled
with, so a step taken on samples drawn from an earlier version (or a sampler whose numbers differ
slightly, like vLLM's) still estimates the gradient of the current policy.

``grpo_clip``: ``-min(ratio·A, clip(ratio, 1-ε, 1+ε)·A)`` (PPO's clipped surrogate, as GRPO uses it).
``reinforce``: ``-ratio·A``, REINFORCE with the group baseline (the advantages arrive centred). The
ratio is *not* detached: ``∇(ratio·A) = ratio·A·∇log π``, the importance-weighted REINFORCE
gradient, and the loss's value is the same surrogate Tinker's ``importance_sampling`` loss reports,
so the backends' numbers can be compared. (Detaching the ratio and multiplying by ``new`` gives
the same gradient but a loss whose value means nothing.) Without clipping, ``grpo_clip`` with a
huge ε equals ``reinforce``.

The per-token losses are averaged over *all completion tokens of the batch* (not per sequence and
then over sequences): every token weighs the same, so a long completion counts in proportion to its
length. A per-sequence mean would give each token of a short completion more weight than one of a
long completion, a length bias the paper's shrinking thinking traces make us want to avoid (this is
Dr. GRPO's / DAPO's token-level normalisation; Tinker sums over tokens, the same up to a constant).

An optional KL penalty towards a reference (the base model) uses the k3 estimator
``exp(ref - new) - (ref - new) - 1``, unbiased for KL(new || ref) on the policy's own samples and
never negative.
"""

from __future__ import annotations

import torch

from hpc_executor.errors import ConfigError

LOSSES = ("grpo_clip", "reinforce")


def policy_loss(
    new_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss: str,
    clip_eps: float,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The scalar loss to minimise and its stats.

    ``new_logprobs``, ``old_logprobs``, ``mask`` (and ``ref_logprobs``): (batch, tokens), one row
    per completion, right-padded; ``mask`` is 1 on completion tokens, 0 on padding. ``advantages``:
    (batch,), one per completion. Stats: ``loss``, ``pg_loss``, ``clip_fraction`` (share of tokens
    whose clipped term was taken), ``mean_ratio``, ``kl_ref`` (k3 to the reference, 0 without one)
    and ``kl_old`` (k3 estimate of KL(sampler || current) on the sampled tokens: how far off-policy
    the step is). A batch without completion tokens gives a zero loss, never NaN.
    """
    if loss not in LOSSES:
        raise ConfigError(f"unknown policy loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if clip_eps <= 0 and loss == "grpo_clip":
        raise ConfigError(f"clip_eps must be positive for grpo_clip, got {clip_eps}")
    shape = new_logprobs.shape
    tensors = {"old_logprobs": old_logprobs, "mask": mask}
    if ref_logprobs is not None:
        tensors["ref_logprobs"] = ref_logprobs
    for name, tensor in tensors.items():
        if tensor.shape != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, new_logprobs {tuple(shape)}")
    if advantages.shape != shape[:1]:
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}, expected ({shape[0]},)")
    if kl_coef and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs (the reference model's log-probs)")

    weights = mask.to(new_logprobs.dtype)
    tokens = weights.sum().clamp(min=1.0)  # an empty batch: 0 / 1, not 0 / 0

    def masked_mean(per_token: torch.Tensor) -> torch.Tensor:
        return (per_token * weights).sum() / tokens

    # Padding may hold anything (old = 0 against new = -30, say): keep exp() finite there.
    log_ratio = torch.where(weights > 0, new_logprobs - old_logprobs, torch.zeros_like(new_logprobs))
    ratio = torch.exp(log_ratio)
    adv = advantages.to(new_logprobs.dtype).unsqueeze(1)
    unclipped = ratio * adv
    if loss == "grpo_clip":
        clipped = torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * adv
        per_token = -torch.minimum(unclipped, clipped)
        clip_taken = (clipped < unclipped).to(weights.dtype)
    else:
        per_token = -unclipped
        clip_taken = torch.zeros_like(weights)
    pg_loss = masked_mean(per_token)
    total = pg_loss

    kl_ref = torch.zeros((), dtype=new_logprobs.dtype)
    if ref_logprobs is not None:
        ref_gap = torch.where(weights > 0, ref_logprobs - new_logprobs, torch.zeros_like(new_logprobs))
        kl_ref = masked_mean(torch.exp(ref_gap) - ref_gap - 1.0)
        total = total + kl_coef * kl_ref

    with torch.no_grad():
        stats = {
            "loss": float(total),
            "pg_loss": float(pg_loss),
            "clip_fraction": float(masked_mean(clip_taken)),
            "mean_ratio": float(masked_mean(ratio)) if weights.sum() > 0 else 1.0,
            "kl_ref": float(kl_ref),
            "kl_old": float(masked_mean(ratio - 1.0 - log_ratio)),
        }
    return total, stats
