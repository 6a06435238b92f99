"""Advantages from one group's rewards (all samples of one RL step share the prompt).

``grpo``: the reward minus the group mean, divided by the group's standard deviation (the paper's
GRPO). ``reinforce``: minus the group mean only (REINFORCE with a group baseline). ``max_at_k``:
aimed at the best of k samples rather than the mean: each sample is credited with how much it
raises the expected maximum of k samples drawn from the group (see ``max_at_k``).
A group whose rewards are all equal teaches nothing: every advantage is exactly 0, never NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from hpc_executor.errors import ConfigError

KINDS = ("grpo", "reinforce", "max_at_k")
STD_EPS = 1e-6  # keeps a near-constant group from blowing its advantages up


def advantages(rewards: Sequence[float], kind: str, *, k: int = 4) -> list[float]:
    """One advantage per reward, for the loss of one policy step."""
    if kind not in KINDS:
        raise ConfigError(f"unknown advantage kind {kind!r}; choose one of {', '.join(KINDS)}")
    if any(not math.isfinite(r) for r in rewards):
        raise ValueError(f"rewards must be finite numbers, got {list(rewards)}")
    n = len(rewards)
    if n == 0 or max(rewards) == min(rewards):
        return [0.0] * n
    mean = sum(rewards) / n
    if kind == "reinforce":
        return [r - mean for r in rewards]
    if kind == "grpo":
        std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / n)
        return [(r - mean) / (std + STD_EPS) for r in rewards]
    return max_at_k(rewards, k)


def expected_max(sorted_rewards: Sequence[float], k: int) -> float:
    """E[max of k draws without replacement] from ``sorted_rewards`` (ascending): the i-th smallest
    (0-based) is the maximum with probability C(i, k-1) / C(n, k)."""
    n = len(sorted_rewards)
    k = min(k, n)
    total = math.comb(n, k)
    return sum(math.comb(i, k - 1) * r for i, r in enumerate(sorted_rewards)) / total


def max_at_k(rewards: Sequence[float], k: int) -> list[float]:
    """Leave-one-out credit for the expected max of k: E[max@k of the group] minus E[max@k of the
    group without this sample]. Only samples that could be the best of k earn positive credit; the
    rest get a small negative one, so the policy is pushed towards its best ideas, not its typical
    ones. Groups smaller than k + 1 fall back to k = n - 1."""
    n = len(rewards)
    if n < 2:
        return [0.0] * n
    k = max(1, min(k, n - 1))
    ordered = sorted(rewards)
    full = expected_max(ordered, k)
    out = []
    for r in rewards:
        rest = list(ordered)
        rest.remove(r)
        out.append(full - expected_max(rest, k))
    return out
