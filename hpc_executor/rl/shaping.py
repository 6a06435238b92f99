"""Reward shaping against the collapse of RL on the ideator (strategy=rl's ``mitigations``).

The paper (DESIGN.md §2, §5) saw the ideas collapse onto two or three easy ones and the thinking
shorten, and tried two mitigations "without clear gains"; we add one aimed at the best idea rather
than the typical one. Each is a switch, all off by default:

- ``length_reward`` (the paper's): + min(cap, per_char × the sample's thinking characters), the cap
  0.3 as in the paper (with per_char 0.0001 it is reached at 3,000 characters).
- ``jaccard_penalty`` (the paper's): − coef × the idea's token-Jaccard similarity to the most similar
  idea of the previous step (the max, not the mean: a copy of any one earlier idea is a copy,
  however many other ideas that step had).
- ``novelty_bonus`` (ours): + coef × (1 − the idea's token-Jaccard similarity to the most similar idea
  of every earlier step), so an idea unlike anything tried so far earns up to coef. On the first step
  nothing came before and no one earns it (it would only be a bonus for executing).
- ``fitness_sharing`` (ours, evolutionary computation's niche sharing): the reward divided by
  (the number of the step's ideas in its near-duplicate group) ** exponent, before the additive terms.
  Twenty copies of one easy idea share its reward, so a rarer idea that executes earns more than
  each copy: at exponent 1 the policy's best response spreads its samples over the ideas that work
  in proportion to their rewards, instead of piling them onto one. Groups are the metrics' own
  (token Jaccard >= 0.6), so the quantity it acts on is the ``largest_group`` the table shows. It
  needs no earlier step, and no coefficient in the environment's reward units.

Token Jaccard is ``diversity.jaccard``'s: |A ∩ B| / |A ∪ B| of the lower-cased word sets of
``diversity.idea_text(title, description)``; it needs no model, is the same on every machine, and
is fast enough for every earlier idea of a long run (bench/rl_shaping.py: 128 samples against the
8,704 ideas of 68 earlier steps in under a second).

Only samples whose idea executed are shaped. A failed sample keeps the 0 every failed idea gets,
so no mitigation can make failing pay: not a long thought that fails, not a novel idea that does
not run, and not an answer with no idea at all (which would otherwise escape the Jaccard penalty
that a failed repeat pays). DESIGN.md records only that the paper tried "a length reward capped at
0.3", not whether failed ideas earned it; this is our reading, chosen to keep the paper's rule that
failed ideas are worth 0. A penalty larger than an executed idea's reward can still take it below
0: keep ``coef`` near the size of the environment's rewards.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from hpc_executor import diversity
from hpc_executor.errors import ConfigError


@dataclass(frozen=True)
class LengthReward:
    enabled: bool = False
    cap: float = 0.3  # the paper's cap
    per_char: float = 0.0001  # bonus per character of thinking, up to the cap

    def bonus(self, thinking_chars: int) -> float:
        return min(self.cap, self.per_char * thinking_chars)


@dataclass(frozen=True)
class JaccardPenalty:
    enabled: bool = False
    coef: float = 0.5  # times the similarity to the most similar idea of the previous step


@dataclass(frozen=True)
class NoveltyBonus:
    enabled: bool = False
    coef: float = 0.5  # times the distance to the most similar idea of every earlier step


@dataclass(frozen=True)
class FitnessSharing:
    enabled: bool = False
    exponent: float = 1.0  # the reward is divided by the idea's group size to this power


@dataclass(frozen=True)
class Mitigations:
    length_reward: LengthReward = LengthReward()
    jaccard_penalty: JaccardPenalty = JaccardPenalty()
    novelty_bonus: NoveltyBonus = NoveltyBonus()
    fitness_sharing: FitnessSharing = FitnessSharing()


Section = TypeVar("Section", LengthReward, JaccardPenalty, NoveltyBonus, FitnessSharing)


def mitigations(cfg: Mapping[str, Any] | None) -> Mitigations:
    """The validated ``mitigations`` section; a missing section or key takes its default."""
    plain = _plain(cfg, "mitigations")
    names = [f.name for f in fields(Mitigations)]
    unknown = sorted(set(plain) - set(names))
    if unknown:
        raise ConfigError(f"unknown mitigation(s) {', '.join(unknown)}: strategy.mitigations takes "
                          f"{', '.join(names)}")  # fmt: skip
    return Mitigations(
        length_reward=_section(plain, "length_reward", LengthReward),
        jaccard_penalty=_section(plain, "jaccard_penalty", JaccardPenalty),
        novelty_bonus=_section(plain, "novelty_bonus", NoveltyBonus),
        fitness_sharing=_section(plain, "fitness_sharing", FitnessSharing),
    )


def _plain(cfg: Any, where: str) -> dict[str, Any]:
    """A mapping (a DictConfig is one) as a dict; None as an empty one."""
    if cfg is None:
        return {}
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"strategy.{where} must be a mapping of keys to values, got {cfg!r}")
    return dict(cfg)


def _section(sections: Mapping[str, Any], name: str, kind: type[Section]) -> Section:
    where = f"mitigations.{name}"
    plain = _plain(sections.get(name), where)
    keys = [f.name for f in fields(kind)]
    unknown = sorted(set(plain) - set(keys))
    if unknown:
        raise ConfigError(
            f"strategy.{where}: unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(keys)}"
        )
    return kind(**{key: _value(f"strategy.{where}.{key}", key, value) for key, value in plain.items()})


def _value(where: str, key: str, value: Any) -> Any:
    if key == "enabled":
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{where} must be a number >= 0, got {value!r}")
    return float(value)


def shape_rewards(rewards: list[float], texts: list[str], thinking_chars: list[int],
                  previous_step_texts: list[str], earlier_texts: list[str], cfg: Mapping[str, Any] | None,
                  *, executed: Sequence[bool] | None = None) -> list[float]:  # fmt: skip
    """The rewards of one step's samples after the enabled mitigations.

    ``texts``: each sample's ``diversity.idea_text(title, description)`` ("" for a sample with no
    idea); ``previous_step_texts``: the previous step's ideas; ``earlier_texts``: every earlier
    step's ideas (the previous one included). ``executed``: which samples' ideas ran and were
    scored; without it, a sample is taken as executed when its reward is not 0 (the reward every
    failed idea gets). Failed samples keep their reward unchanged."""
    config = mitigations(cfg)
    n = len(rewards)
    ran = [r != 0.0 for r in rewards] if executed is None else list(executed)
    if not len(texts) == len(thinking_chars) == len(ran) == n:
        raise ValueError(f"one text, thinking length and executed flag per reward: got {n} rewards, "
                         f"{len(texts)} texts, {len(thinking_chars)} thinking lengths, {len(ran)} flags")  # fmt: skip
    shaped = [float(r) for r in rewards]
    scored = [i for i in range(n) if ran[i]]
    scored_texts = [texts[i] for i in scored]
    if config.fitness_sharing.enabled:
        for i, size in niche_sizes(texts).items():
            if ran[i]:
                shaped[i] /= size**config.fitness_sharing.exponent
    if config.length_reward.enabled:
        for i in scored:
            shaped[i] += config.length_reward.bonus(thinking_chars[i])
    if config.jaccard_penalty.enabled and previous_step_texts:
        similar = diversity.nearest_jaccard(scored_texts, previous_step_texts)
        for i, similarity in zip(scored, similar, strict=True):
            shaped[i] -= config.jaccard_penalty.coef * similarity
    if config.novelty_bonus.enabled and earlier_texts:
        similar = diversity.nearest_jaccard(scored_texts, earlier_texts)
        for i, similarity in zip(scored, similar, strict=True):
            shaped[i] += config.novelty_bonus.coef * (1.0 - similarity)
    return shaped


def niche_sizes(texts: list[str]) -> dict[int, int]:
    """For each sample with an idea (a non-empty text), how many of the step's ideas are in its group
    of near-duplicates (itself included)."""
    with_idea = [i for i, text in enumerate(texts) if text]
    matrix = diversity.similarities([texts[i] for i in with_idea], diversity.JACCARD)
    groups = diversity.clusters(matrix, diversity.NEAR_DUPLICATE[diversity.JACCARD])
    return {with_idea[member]: len(group) for group in groups for member in group}


def describe(cfg: Mapping[str, Any] | None) -> str:
    """One line for the plan: which mitigations shape the reward, with their numbers."""
    config = mitigations(cfg)
    length, penalty, novelty = config.length_reward, config.jaccard_penalty, config.novelty_bonus
    sharing = config.fitness_sharing
    parts = [
        *([f"length reward +min({length.cap:g}, {length.per_char:g}/char of thinking) (paper)"]
          if length.enabled else []),
        *([f"Jaccard penalty -{penalty.coef:g} x similarity to the previous step's ideas (paper)"]
          if penalty.enabled else []),
        *([f"novelty bonus +{novelty.coef:g} x distance to all earlier ideas (ours)"] if novelty.enabled else []),
        *([f"fitness sharing: reward / near-duplicates in the step ^ {sharing.exponent:g} (ours)"]
          if sharing.enabled else []),
    ]  # fmt: skip
    shaped = "; ".join(parts) + " (executed ideas only)" if parts else "none"
    return f"reward shaping: {shaped}"
