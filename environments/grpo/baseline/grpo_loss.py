"""GRPO advantages and policy-gradient losses (editable)."""

from __future__ import annotations

import torch


def group_advantages(
    rewards: torch.Tensor, group_size: int, eps: float = 1e-6, normalize_std: bool = True
) -> torch.Tensor:
    """Reward minus its group's mean, divided by the group's std + eps; rewards are grouped by prompt."""
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if normalize_std:
        centred = centred / (grouped.std(dim=1, keepdim=True) + eps)
    return centred.reshape(-1)


def per_token_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    loss_type: str = "grpo_clip",
    clip_range: float = 0.2,
) -> torch.Tensor:
    """Per-token loss, shape (batch, tokens); advantages have shape (batch,).

    grpo_clip: PPO's clipped importance-weighted objective against the rollout policy.
    reinforce: -A * log pi, the vanilla policy gradient (no ratio, no clipping).
    """
    adv = advantages.unsqueeze(1)
    if loss_type == "reinforce":
        return -adv * logp
    if loss_type == "grpo_clip":
        ratio = torch.exp(logp - old_logp)
        return -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_range, 1 + clip_range) * adv)
    raise ValueError(f"unknown loss_type {loss_type!r}: choose grpo_clip or reinforce")


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def sequence_loss(token_loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over each response's tokens, then mean over responses (every response weighs the same)."""
    return masked_mean(token_loss, mask, dim=1).mean()
