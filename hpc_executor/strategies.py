"""Search strategies: which ideas to ask for in each epoch, and what each prompt shows.

A strategy plans an epoch as a list of slots (``batch_size`` of them), each with a purpose, and
builds the list of earlier ideas each ideator call is shown. Slots are fixed per epoch, so a
resumed run asks only for the slots that are still empty and gives them the same purpose.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig

from hpc_executor.errors import ConfigError


@dataclass(frozen=True)
class Slot:
    index: int
    purpose: str  # "ideate", "exploit" or "explore"


class Strategy:
    def __init__(self, cfg: DictConfig, seed: int) -> None:
        self.cfg = cfg
        self.seed = seed
        if cfg.batch_size < 1 or cfg.call_size < 1 or cfg.epochs < 1:
            raise ConfigError("strategy.epochs, strategy.batch_size and strategy.call_size must be >= 1")

    def plan(self, epoch: int) -> list[Slot]:
        return [Slot(i, "ideate") for i in range(self.cfg.batch_size)]

    def exploit_count(self, epoch: int) -> int:
        """Slots of this epoch that refine earlier winners."""
        return 0

    def shown(
        self, purpose: str, epoch: int, history: list[dict[str, Any]], baseline: float
    ) -> list[dict[str, Any]]:
        """The earlier ideas a call is shown. ``history``: one dict per idea of earlier epochs
        (and, for ``ideate``, of this epoch so far) with title, description, status, reward.
        ``baseline``: the reward an idea must exceed to beat the baseline (its mean + k·std, see
        ``noise``); exploit calls are shown only those ideas."""
        ideas = [h for h in history if h["kind"] != "baseline"]
        if purpose == "exploit":
            winners = [h for h in ideas if h.get("status") == "ok" and (h.get("reward") or 0) > baseline]
            return sorted(winners, key=lambda h: -h["reward"])[: self.cfg.max_shown]
        if purpose == "explore":
            past = [h for h in ideas if h["epoch"] < epoch]
            rng = random.Random(f"{self.seed}-explore-{epoch}")
            return rng.sample(past, min(len(past), self.cfg.max_shown))
        return ideas[-self.cfg.max_shown :]  # ideate: the ideas so far, to avoid duplicates


class Evolution(Strategy):
    """Epoch 0 samples; epoch e >= 1 gives an exploit share of min(start + step*floor(e/2), max) of
    the batch, rounded down to a multiple of the call size, and explores with the rest."""

    def exploit_count(self, epoch: int) -> int:
        if epoch == 0:
            return 0
        share = min(self.cfg.exploit_start + self.cfg.exploit_step * (epoch // 2), self.cfg.exploit_max)
        raw = math.floor(round(share * self.cfg.batch_size, 9))
        return (raw // self.cfg.call_size) * self.cfg.call_size

    def plan(self, epoch: int) -> list[Slot]:
        if epoch == 0:
            return super().plan(epoch)
        n = self.exploit_count(epoch)
        return [Slot(i, "exploit" if i < n else "explore") for i in range(self.cfg.batch_size)]


class BestOfN(Strategy):
    """The same number of samples as evolution, all drawn like epoch 0, with no reward feedback."""


class RLGroups(Strategy):
    """strategy=rl (hpc_executor/rl/loop.py): each step's ideas are one group sampled from the policy.
    Steps and groups count the run, so ``epochs`` and ``batch_size`` are set to ``steps`` and
    ``group_size`` here, whatever an environment preset chose for evolution."""

    def __init__(self, cfg: DictConfig, seed: int) -> None:
        cfg.epochs, cfg.batch_size = cfg.steps, cfg.group_size
        super().__init__(cfg, seed)


STRATEGIES = {"evolution": Evolution, "best_of_n": BestOfN, "rl": RLGroups}


def make_strategy(cfg: DictConfig, seed: int) -> Strategy:
    if cfg.name not in STRATEGIES:
        raise ConfigError(f"strategy={cfg.name!r} is unknown; choose one of {', '.join(STRATEGIES)}")
    return STRATEGIES[cfg.name](cfg, seed)
