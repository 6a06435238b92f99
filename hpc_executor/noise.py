"""Noise calibration: the unmodified baseline run on several seeds, and the bar an idea must clear.

A search's headline number is only worth what its noise allows. With ``noise.baseline_repeats=N``
the baseline runs N times in epoch 0 (its search trial on the run's seed, N-1 repeats on seeds
seed+1 ... seed+N-1), and, with ``noise.repeat_every=E``, N times more every E epochs (on seeds not
used before), so drift of the machine shows. An idea *beats the baseline* only above
``mean + k * std`` of those runs (``noise.k``, default 2): that decides what exploit prompts show
and what the tables and the report call a winner. With N=1 the std is 0 and the bar is the one
measured baseline, as before.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING

from omegaconf import DictConfig

from hpc_executor.errors import ConfigError
from hpc_executor.ids import BASELINE_IDEA, baseline_repeat_id

if TYPE_CHECKING:
    from hpc_executor.ledger import Ledger

REPEAT = "baseline_repeat"  # trials.purpose of a baseline repeat


def check(cfg: DictConfig) -> None:
    if cfg.baseline_repeats < 1 or cfg.repeat_every < 0 or cfg.k < 0:
        raise ConfigError(
            "noise.baseline_repeats must be >= 1, noise.repeat_every >= 0 (0: epoch 0 only) and noise.k >= 0; "
            f"got {cfg.baseline_repeats}, {cfg.repeat_every}, {cfg.k}"
        )


def repeats_for(cfg: DictConfig, seed: int, epoch: int) -> list[tuple[str, int]]:
    """(trial id, seed) of the baseline repeats that ``epoch`` runs."""
    n = int(cfg.baseline_repeats)
    if epoch == 0:
        return [(baseline_repeat_id(0, i), seed + i) for i in range(1, n)]
    if cfg.repeat_every and epoch % cfg.repeat_every == 0:
        return [(baseline_repeat_id(epoch, i), seed + epoch * n + i) for i in range(n)]
    return []


@dataclass(frozen=True)
class BaselineNoise:
    mean: float
    std: float  # sample std over the baseline's runs; 0 with one run
    n: int  # runs with a reward (0: none yet, mean is the environment's recorded value)
    k: float

    @property
    def bar(self) -> float:
        """What an idea's reward must exceed to beat the baseline."""
        return self.mean + self.k * self.std

    def beats(self, reward: float | None) -> bool:
        return reward is not None and reward > self.bar

    def describe(self) -> str:
        if self.n == 0:
            return f"baseline {self.mean:.4f} (recorded, not measured yet)"
        if self.n == 1:
            return f"baseline {self.mean:.4f} (1 run)"
        return (f"baseline {self.mean:.4f} ± {self.std:.4f} over {self.n} seeds; an idea beats it above "
                f"{self.bar:.4f} (mean + {self.k:g}·std)")  # fmt: skip


def baseline_rewards(ledger: Ledger) -> list[float]:
    """Rewards of the baseline's ok runs: its search trial and every repeat."""
    rows = ledger.db.execute(
        "SELECT r.reward FROM trials t JOIN results r USING (trial_id)"
        " WHERE t.idea_id = ? AND r.status = 'ok' ORDER BY t.created_at, t.trial_id",
        (BASELINE_IDEA,),
    )
    return [float(reward) for (reward,) in rows]


def measure(ledger: Ledger, k: float, recorded: float) -> BaselineNoise:
    """The baseline's mean and std so far (the recorded value while none is measured)."""
    rewards = baseline_rewards(ledger)
    if not rewards:
        return BaselineNoise(recorded, 0.0, 0, k)
    std = statistics.stdev(rewards) if len(rewards) > 1 else 0.0
    return BaselineNoise(statistics.fmean(rewards), std, len(rewards), k)
