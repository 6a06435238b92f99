"""Reward shaping (strategy=rl's mitigations) against values computed by hand."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from omegaconf import OmegaConf

from hpc_executor import diversity
from hpc_executor.errors import ConfigError
from hpc_executor.rl.advantages import advantages
from hpc_executor.rl.shaping import describe, mitigations, shape_rewards

# one step: two executed ideas, an executed idea that scored 0, a failed idea, a sample with no idea
TEXTS = ["a b c d", "a b x y", "p q r s", "a b c d", ""]
REWARDS = [1.0, 0.5, 0.0, 0.0, 0.0]
EXECUTED = [True, True, True, False, False]
THINKING = [1000, 5000, 2000, 9000, 0]
PREVIOUS = ["a b c d", "a x"]
EARLIER = ["p q r s t", *PREVIOUS]


def only(name: str, **values: float) -> dict[str, dict[str, object]]:
    return {name: {"enabled": True, **values}}


def shaped(cfg: Any, executed: list[bool] | None = EXECUTED) -> list[float]:
    return shape_rewards(REWARDS, TEXTS, THINKING, PREVIOUS, EARLIER, cfg, executed=executed)


def test_nearest_jaccard_is_the_max_over_lower_cased_word_sets() -> None:
    # "a b x y" is 2/6 like "a b c d" and 2/4 like "a x": the max is 1/2 (the mean would be 5/12)
    assert diversity.nearest_jaccard(["a b x y", "A, B; c-d!"], PREVIOUS) == [0.5, 1.0]
    assert math.isnan(diversity.nearest_jaccard(["a b"], [])[0])


def test_off_by_default_and_failed_samples_are_never_shaped() -> None:
    assert shaped(None) == REWARDS
    everything = {
        name: {"enabled": True}
        for name in ("length_reward", "jaccard_penalty", "novelty_bonus", "fitness_sharing")
    }
    assert shaped(everything)[3:] == [0.0, 0.0], "a failed idea and a sample with no idea keep their 0"


def test_length_reward_grows_with_thinking_up_to_the_cap() -> None:
    # 1000 chars x 0.0001 = 0.1; 5000 chars would be 0.5, capped at 0.3; 2000 chars = 0.2
    assert shaped(only("length_reward")) == pytest.approx([1.1, 0.8, 0.2, 0.0, 0.0])
    assert shaped(only("length_reward", cap=0.15)) == pytest.approx([1.1, 0.65, 0.15, 0.0, 0.0])


def test_jaccard_penalty_is_coef_times_the_max_similarity_to_the_previous_step() -> None:
    # similarities 1, 1/2 (max of 1/3 and 1/2) and 0, times 0.5
    assert shaped(only("jaccard_penalty", coef=0.5)) == pytest.approx([0.5, 0.25, 0.0, 0.0, 0.0])


def test_novelty_bonus_is_coef_times_the_distance_to_the_nearest_earlier_idea() -> None:
    # nearest earlier similarities 1, 1/2, 4/5 ("p q r s" in "p q r s t"): bonuses 0, 0.25, 0.1
    assert shaped(only("novelty_bonus", coef=0.5)) == pytest.approx([1.0, 0.75, 0.1, 0.0, 0.0])


def test_fitness_sharing_divides_by_the_near_duplicates_in_the_step() -> None:
    # "a b c d" has a copy in the step (the failed sample 3 counts: it took a sample of the group);
    # "a b x y" (2/6 like it) and "p q r s" are alone; the sample with no idea is in no group
    assert shaped(only("fitness_sharing")) == pytest.approx([0.5, 0.5, 0.0, 0.0, 0.0])
    assert shaped(only("fitness_sharing", exponent=0.5)) == pytest.approx(
        [1 / math.sqrt(2), 0.5, 0.0, 0.0, 0.0]
    )
    assert shaped(only("fitness_sharing", exponent=0)) == REWARDS


def test_fitness_sharing_makes_a_rare_working_idea_worth_more_than_a_common_one() -> None:
    texts = ["raise the lr", "raise the lr", "raise the lr", "add momentum", "a crash"]
    executed = [True, True, True, True, False]
    rewards = [1.0, 1.0, 1.0, 1.0, 0.0]
    plain = advantages(rewards, "grpo")
    assert plain[0] == pytest.approx(plain[3]), (
        "without it, copies of an easy idea earn as much as a rare one"
    )
    shared = advantages(shape_rewards(rewards, texts, [0] * 5, [], [], only("fitness_sharing"), executed=executed),
                        "grpo")  # fmt: skip
    assert shared[3] > shared[0] > shared[4]  # rare and working > common and working > failed


def test_mitigations_add_up() -> None:
    cfg = OmegaConf.create({"length_reward": {"enabled": True, "cap": 0.3, "per_char": 0.0001},
                            "jaccard_penalty": {"enabled": True, "coef": 0.5},
                            "novelty_bonus": {"enabled": True, "coef": 0.5}})  # fmt: skip
    assert shaped(cfg) == pytest.approx([1.1 - 0.5, 0.8 - 0.25 + 0.25, 0.2 + 0.1, 0.0, 0.0])


def test_without_executed_flags_a_zero_reward_counts_as_failed() -> None:
    assert shaped(only("length_reward"), executed=None) == pytest.approx([1.1, 0.8, 0.0, 0.0, 0.0])


def test_the_first_step_has_nothing_to_be_similar_to_or_novel_against() -> None:
    cfg = {**only("jaccard_penalty"), **only("novelty_bonus")}
    assert shape_rewards(REWARDS, TEXTS, THINKING, [], [], cfg, executed=EXECUTED) == REWARDS


def test_a_step_where_every_idea_failed_stays_all_zero_and_teaches_nothing() -> None:
    cfg = {
        name: {"enabled": True}
        for name in ("length_reward", "jaccard_penalty", "novelty_bonus", "fitness_sharing")
    }
    rewards = shape_rewards([0.0] * 3, ["a", "b", ""], [10, 5000, 0], ["a"], ["a"], cfg, executed=[False] * 3)
    assert rewards == [0.0, 0.0, 0.0]
    assert advantages(rewards, "grpo") == [0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (only("length_reward", cap=-0.3), r"length_reward\.cap must be a number >= 0"),
        (only("jaccard_penalty", coef=-1), r"jaccard_penalty\.coef must be a number >= 0"),
        (only("novelty_bonus", coef=float("nan")), r"novelty_bonus\.coef must be a number >= 0"),
        (only("fitness_sharing", exponent=-1), r"fitness_sharing\.exponent must be a number >= 0"),
        ({"length_reward": {"enabled": "yes"}}, r"length_reward\.enabled must be true or false"),
        ({"length_reward": {"capp": 0.3}}, r"unknown key\(s\) capp; valid keys: enabled, cap, per_char"),
        ({"entropy_bonus": {}}, r"unknown mitigation\(s\) entropy_bonus: .* length_reward, jaccard_penalty"),
        ({"novelty_bonus": 0.5}, r"novelty_bonus must be a mapping"),
    ],
)
def test_bad_values_say_what_to_fix(cfg: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        mitigations(cfg)


def test_lengths_must_match() -> None:
    with pytest.raises(ValueError, match="2 rewards, 1 texts"):
        shape_rewards([1.0, 0.0], ["a"], [1, 2], [], [], None)


def test_describe_names_each_enabled_mitigation_and_whose_it_is() -> None:
    assert describe(None) == "reward shaping: none"
    assert describe({**only("length_reward"), **only("novelty_bonus", coef=0.2)}) == (
        "reward shaping: length reward +min(0.3, 0.0001/char of thinking) (paper); "
        "novelty bonus +0.2 x distance to all earlier ideas (ours) (executed ideas only)"
    )
    assert "Jaccard penalty -0.5 x similarity to the previous step's ideas (paper)" in describe(
        only("jaccard_penalty")
    )
    assert describe(only("fitness_sharing")) == (
        "reward shaping: fitness sharing: reward / near-duplicates in the step ^ 1 (ours) (executed ideas only)"
    )


def test_the_indexed_jaccard_matrix_matches_comparing_sets_pair_by_pair() -> None:
    rng = random.Random(0)
    texts = [" ".join(rng.choices("abcdefghij", k=rng.randint(0, 6))) for _ in range(40)]
    sets = [diversity.tokens(t) for t in texts]
    matrix = diversity.jaccard_matrix(sets[:15], sets)
    assert matrix.tolist() == [[diversity.jaccard(a, b) for b in texts] for a in texts[:15]]
    assert diversity.nearest_jaccard(texts[:15], texts[15:]) == [
        max(diversity.jaccard(a, b) for b in texts[15:]) for a in texts[:15]
    ]
