"""Advantages of one group's rewards, against values worked out by hand."""

from __future__ import annotations

import math

import pytest

from hpc_executor.errors import ConfigError
from hpc_executor.rl.advantages import KINDS, STD_EPS, advantages, expected_max


def test_grpo_centres_and_divides_by_the_population_std() -> None:
    # rewards 1, 0, 0, 1: mean 0.5, population std sqrt(4 * 0.25 / 4) = 0.5
    got = advantages([1.0, 0.0, 0.0, 1.0], "grpo")
    want = [0.5 / (0.5 + STD_EPS), -0.5 / (0.5 + STD_EPS), -0.5 / (0.5 + STD_EPS), 0.5 / (0.5 + STD_EPS)]
    assert got == pytest.approx(want, rel=1e-12)


def test_reinforce_subtracts_the_group_mean_only() -> None:
    # rewards 3, 1, 2: mean 2
    assert advantages([3.0, 1.0, 2.0], "reinforce") == pytest.approx([1.0, -1.0, 0.0])


def test_expected_max_of_k_draws() -> None:
    # sorted 0, 1, 2, 3 and k = 2: the i-th smallest is the max of a pair in C(i, 1) of C(4, 2) = 6 pairs:
    # (0*0 + 1*1 + 2*2 + 3*3) / 6 = 14 / 6
    assert expected_max([0.0, 1.0, 2.0, 3.0], 2) == pytest.approx(14 / 6)


def test_max_at_k_credits_what_each_sample_adds_to_the_expected_max() -> None:
    # E[max@2] of {0,1,2,3} = 14/6 = 7/3. Without 0: {1,2,3} -> (0*1 + 1*2 + 2*3)/3 = 8/3, credit -1/3;
    # without 1: {0,2,3} -> (0 + 2 + 6)/3 = 8/3, credit -1/3; without 2: {0,1,3} -> (0 + 1 + 6)/3 = 7/3,
    # credit 0; without 3: {0,1,2} -> (0 + 1 + 4)/3 = 5/3, credit 2/3.
    assert advantages([0.0, 1.0, 2.0, 3.0], "max_at_k", k=2) == pytest.approx([-1 / 3, -1 / 3, 0.0, 2 / 3])


def test_max_at_k_shrinks_k_to_the_group() -> None:
    # k = 4 on 3 samples falls back to k = 2: E[max@2] of {0,0,1} = (0*0 + 1*0 + 2*1)/3 = 2/3;
    # without a 0: {0,1} -> 1, credit -1/3; without the 1: {0,0} -> 0, credit 2/3
    assert advantages([0.0, 0.0, 1.0], "max_at_k", k=4) == pytest.approx([-1 / 3, -1 / 3, 2 / 3])


@pytest.mark.parametrize("kind", KINDS)
def test_all_equal_rewards_give_exact_zeros(kind: str) -> None:
    for rewards in ([0.0] * 5, [0.7] * 3, [1.0]):
        got = advantages(rewards, kind)
        assert got == [0.0] * len(rewards)
        assert all(math.isfinite(a) for a in got)
    assert advantages([], kind) == []


def test_bad_input_is_refused_with_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="choose one of grpo, reinforce, max_at_k"):
        advantages([1.0, 0.0], "ppo")
    with pytest.raises(ValueError, match="finite"):
        advantages([1.0, float("nan")], "grpo")
