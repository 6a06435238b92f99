"""GRPO building blocks (editable): group-normalised rewards, per-token policy-gradient losses,
masked reductions, and one micro-batch's backward pass.

Shapes: B responses, T response-aligned positions (the labels of a right-padded batch). Per-sequence
quantities (rewards, advantages) are (B,) or (B, 1); per-token ones are (B, T).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

LOSS_TYPES = ("no_baseline", "reinforce_with_baseline", "grpo_clip")
# token_mean: the masked mean over every response token of the micro-batch (the paper's: a long
# response weighs more); sequence_mean: each response's token mean, then the mean over responses.
LOSS_NORMALIZATIONS = ("token_mean", "sequence_mean")


def group_normalized_rewards(
    reward_fn: Callable[[str, str], dict[str, float]],
    rollout_responses: list[str],
    repeated_ground_truths: list[str],
    group_size: int,
    advantage_eps: float,
    normalize_by_std: bool,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Score every response and turn the scores into advantages within each group of `group_size`
    consecutive responses (the responses to one prompt).

    advantage = (r - group mean) / (group std + eps), std being torch's unbiased estimator (n - 1);
    with `normalize_by_std` off, advantage = r - group mean.
    Returns (advantages (B,), raw rewards (B,), summary): the summary has the mean, std, max and min of
    the reward and the mean of every other score reward_fn returns (e.g. `format_reward_mean`).
    """
    if len(rollout_responses) != len(repeated_ground_truths) or len(rollout_responses) % group_size:
        raise ValueError(
            f"{len(rollout_responses)} responses and {len(repeated_ground_truths)} ground truths: "
            f"need equal counts, a multiple of group_size {group_size}"
        )
    scores = [reward_fn(r, gt) for r, gt in zip(rollout_responses, repeated_ground_truths, strict=True)]
    raw_rewards = torch.tensor([s["reward"] for s in scores], dtype=torch.float32)
    grouped = raw_rewards.view(-1, group_size)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize_by_std:
        advantages = advantages / (grouped.std(dim=1, keepdim=True) + advantage_eps)
    summary = {
        "reward_mean": raw_rewards.mean().item(),
        "reward_std": raw_rewards.std().item() if len(raw_rewards) > 1 else 0.0,
        "reward_max": raw_rewards.max().item(),
        "reward_min": raw_rewards.min().item(),
    }
    for key in sorted(scores[0].keys() - {"reward"}):
        summary[f"{key}_mean"] = sum(s[key] for s in scores) / len(scores)
    return advantages.reshape(-1), raw_rewards, summary


def _per_sequence(values: torch.Tensor) -> torch.Tensor:
    """(B,) or (B, 1) -> (B, 1), so that it broadcasts over a sequence's tokens."""
    return values.reshape(-1, 1)


def naive_policy_gradient_loss(weights: torch.Tensor, policy_log_probs: torch.Tensor) -> torch.Tensor:
    """-weight * log pi per token: the REINFORCE estimator. weights are the raw rewards (no baseline)
    or the advantages (reward minus the group-mean baseline)."""
    return -_per_sequence(weights).to(policy_log_probs.dtype) * policy_log_probs


def grpo_clip_loss(
    advantages: torch.Tensor,
    policy_log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped objective, -min(rho * A, clip(rho, 1 - c, 1 + c) * A), rho = pi / pi_old per token.

    The metadata's `clipped` marks the tokens whose clipped term is the smaller one: their gradient is 0.
    """
    adv = _per_sequence(advantages).to(policy_log_probs.dtype)
    ratio = torch.exp(policy_log_probs - old_log_probs)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - clip_range, 1 + clip_range) * adv
    return -torch.minimum(unclipped, clipped), {"clipped": clipped < unclipped}


def policy_gradient_loss(
    policy_log_probs: torch.Tensor,
    loss_type: str,
    raw_rewards: torch.Tensor | None = None,
    advantages: torch.Tensor | None = None,
    old_log_probs: torch.Tensor | None = None,
    clip_range: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss (B, T) of `loss_type` (one of LOSS_TYPES) and its metadata."""
    if loss_type == "no_baseline":
        _require(loss_type, raw_rewards=raw_rewards)
        return naive_policy_gradient_loss(raw_rewards, policy_log_probs), {}
    if loss_type == "reinforce_with_baseline":
        _require(loss_type, advantages=advantages)
        return naive_policy_gradient_loss(advantages, policy_log_probs), {}
    if loss_type == "grpo_clip":
        _require(loss_type, advantages=advantages, old_log_probs=old_log_probs, clip_range=clip_range)
        return grpo_clip_loss(advantages, policy_log_probs, old_log_probs, clip_range)
    raise ValueError(f"unknown loss_type {loss_type!r}: choose one of {', '.join(LOSS_TYPES)}")


def _require(loss_type: str, **arguments: object) -> None:
    missing = [name for name, value in arguments.items() if value is None]
    if missing:
        raise ValueError(f"loss_type {loss_type!r} needs {', '.join(missing)}")


def masked_mean(tensor: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of the entries where mask is true, along `dim` (all entries when None). A slice with no
    entry gives 0, not NaN: an empty response contributes nothing."""
    total = torch.where(mask.bool(), tensor, 0).sum(dim=dim)
    count = mask.to(tensor.dtype).sum(dim=dim)
    return total / count.clamp(min=1)


def masked_normalize(
    tensor: torch.Tensor, mask: torch.Tensor, normalize_constant: float, dim: int | None = None
) -> torch.Tensor:
    """Sum of the entries where mask is true, along `dim` (all entries when None), divided by a
    constant: a length normalisation that does not depend on how long each response is (Dr. GRPO)."""
    return torch.where(mask.bool(), tensor, 0).sum(dim=dim) / normalize_constant


def microbatch_train_step(
    policy_log_probs: torch.Tensor,
    response_mask: torch.Tensor,
    gradient_accumulation_steps: float,
    loss_type: str,
    normalization: str = "token_mean",
    **loss_inputs: torch.Tensor | float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Backward pass of one micro-batch: the per-token loss of `loss_type` (loss_inputs are what
    policy_gradient_loss takes for it: raw_rewards, advantages, old_log_probs, clip_range) is reduced
    as `normalization` says (LOSS_NORMALIZATIONS) and divided by gradient_accumulation_steps (the
    optimizer batch is that many micro-batches of this size).

    Returns the loss that was back-propagated (detached) and the loss's metadata, with `clip_fraction`
    (the share of response tokens that were clipped) for grpo_clip.
    """
    token_loss, metadata = policy_gradient_loss(policy_log_probs, loss_type, **loss_inputs)
    if normalization == "token_mean":
        reduced = masked_mean(token_loss, response_mask)
    elif normalization == "sequence_mean":
        reduced = masked_mean(token_loss, response_mask, dim=1).mean()
    else:
        raise ValueError(
            f"unknown normalization {normalization!r}: choose one of {', '.join(LOSS_NORMALIZATIONS)}"
        )
    loss = reduced / gradient_accumulation_steps
    loss.backward()
    if "clipped" in metadata:
        metadata["clip_fraction"] = masked_mean(metadata["clipped"].float(), response_mask)
    return loss.detach(), metadata
