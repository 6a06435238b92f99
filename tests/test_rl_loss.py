"""The policy-gradient losses, against values worked out by hand.

Two completions: A (advantage +1, two tokens) and B (advantage -1, one token, then padding that
holds garbage). Sampling probabilities are 0.5 for every token; the current policy gives A's tokens
0.55 and 0.75 (ratios 1.1 and 1.5) and B's token 0.25 (ratio 0.5).
"""

from __future__ import annotations

import math

import pytest
import torch

from hpc_executor.errors import ConfigError
from hpc_executor.rl.loss import policy_loss

LN = math.log


def batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    new = torch.tensor([[LN(0.55), LN(0.75)], [LN(0.25), -30.0]], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([[LN(0.5), LN(0.5)], [LN(0.5), 0.0]], dtype=torch.float64)
    advantages = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.tensor([[1, 1], [1, 0]])
    return new, old, advantages, mask


def test_grpo_clip_by_hand() -> None:
    new, old, adv, mask = batch()
    loss, stats = policy_loss(new, old, adv, mask, loss="grpo_clip", clip_eps=0.2)
    # A1: min(1.1*1, clip(1.1)*1) = 1.1 -> -1.1, unclipped.  A2: min(1.5, 1.2) = 1.2 -> -1.2, clipped.
    # B1: min(0.5*-1, clip(0.5)=0.8 * -1) = -0.8 -> +0.8, clipped.  Mean over the 3 tokens: -1.5 / 3.
    assert float(loss) == pytest.approx(-1.5 / 3)
    assert stats["clip_fraction"] == pytest.approx(2 / 3)
    assert stats["mean_ratio"] == pytest.approx((1.1 + 1.5 + 0.5) / 3)
    # k3 of sampler to current, r - 1 - ln r: 0.1 - ln 1.1, 0.5 - ln 1.5, -0.5 - ln 0.5
    kl_old = (0.1 - LN(1.1) + 0.5 - LN(1.5) - 0.5 - LN(0.5)) / 3
    assert stats["kl_old"] == pytest.approx(kl_old)
    assert stats["kl_ref"] == 0.0
    loss.backward()
    # only A1's term depends on new: d(-ratio * A)/d new = -ratio * A = -1.1, over 3 tokens; clipped
    # terms and padding get no gradient
    assert new.grad is not None
    torch.testing.assert_close(new.grad, torch.tensor([[-1.1 / 3, 0.0], [0.0, 0.0]], dtype=torch.float64))


def test_reinforce_by_hand_weights_every_token_alike() -> None:
    new, old, adv, mask = batch()
    loss, stats = policy_loss(new, old, adv, mask, loss="reinforce", clip_eps=0.2)
    # -ratio * A per token: -1.1, -1.5, +0.5, mean over 3 tokens (a per-sequence mean would give
    # ((-1.1 - 1.5) / 2 + 0.5) / 2 = -0.4 instead)
    assert float(loss) == pytest.approx(-2.1 / 3)
    assert stats["clip_fraction"] == 0.0
    loss.backward()
    # the ratio is not detached: the gradient is the importance-weighted REINFORCE one, -ratio * A / 3
    assert new.grad is not None
    torch.testing.assert_close(
        new.grad, torch.tensor([[-1.1 / 3, -1.5 / 3], [0.5 / 3, 0.0]], dtype=torch.float64)
    )


def test_grpo_clip_without_clipping_is_reinforce() -> None:
    new, old, adv, mask = batch()
    clipped, _ = policy_loss(new, old, adv, mask, loss="grpo_clip", clip_eps=100.0)
    plain, _ = policy_loss(new, old, adv, mask, loss="reinforce", clip_eps=0.2)
    assert float(clipped) == pytest.approx(float(plain))


def test_kl_penalty_k3_by_hand() -> None:
    new, old, adv, mask = batch()
    ref = torch.full_like(old, LN(0.5))
    loss, stats = policy_loss(
        new, old, adv, mask, loss="grpo_clip", clip_eps=0.2, ref_logprobs=ref, kl_coef=0.1
    )
    # k3 = exp(ref - new) - (ref - new) - 1 with ref - new = ln(0.5/0.55), ln(0.5/0.75), ln(0.5/0.25):
    # 10/11 - ln(10/11) - 1, 2/3 - ln(2/3) - 1, 2 - ln 2 - 1
    kl = (10 / 11 - LN(10 / 11) - 1 + 2 / 3 - LN(2 / 3) - 1 + 2 - LN(2) - 1) / 3
    assert stats["kl_ref"] == pytest.approx(kl)
    assert float(loss) == pytest.approx(-1.5 / 3 + 0.1 * kl)


@pytest.mark.parametrize("kind", ["grpo_clip", "reinforce"])
def test_zero_advantages_give_zero_loss_and_gradient(kind: str) -> None:
    new, old, _, mask = batch()
    loss, stats = policy_loss(new, old, torch.zeros(2, dtype=torch.float64), mask, loss=kind, clip_eps=0.2)
    loss.backward()
    assert float(loss) == 0.0
    assert new.grad is not None
    assert torch.equal(new.grad, torch.zeros_like(new))
    assert all(math.isfinite(v) for v in stats.values())


def test_no_completion_tokens_gives_zero_not_nan() -> None:
    new, old, adv, _ = batch()
    loss, stats = policy_loss(new, old, adv, torch.zeros(2, 2), loss="grpo_clip", clip_eps=0.2)
    assert float(loss) == 0.0
    assert all(math.isfinite(v) for v in stats.values())


def test_bad_input_is_refused() -> None:
    new, old, adv, mask = batch()
    with pytest.raises(ConfigError, match="choose one of grpo_clip, reinforce"):
        policy_loss(new, old, adv, mask, loss="ppo", clip_eps=0.2)
    with pytest.raises(ValueError, match="old_logprobs has shape"):
        policy_loss(new, old[:, :1], adv, mask, loss="reinforce", clip_eps=0.2)
    with pytest.raises(ValueError, match="advantages has shape"):
        policy_loss(new, old, adv[:1], mask, loss="reinforce", clip_eps=0.2)
    with pytest.raises(ValueError, match="needs ref_logprobs"):
        policy_loss(new, old, adv, mask, loss="reinforce", clip_eps=0.2, kl_coef=0.1)
