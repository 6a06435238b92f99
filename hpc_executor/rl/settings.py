"""strategy=rl's settings: what cannot work (found by preflight, before any work), and the values
the policy backend trains with."""

from __future__ import annotations

from omegaconf import DictConfig

from hpc_executor.rl.advantages import KINDS
from hpc_executor.rl.backends import policy_problem
from hpc_executor.rl.policy import TrainSettings

LOSSES = ("grpo_clip", "reinforce")
# Counts are bounded in config_checks.LOWER_BOUNDS; these must be positive (or, kl_coef, not negative).
POSITIVE = ("temperature", "learning_rate", "clip_eps")


def problems(cfg: DictConfig) -> list[str]:
    """One line per strategy=rl setting that cannot work, and the policy backend's problem, if any."""
    s = cfg.strategy
    found = []
    if s.loss not in LOSSES:
        found.append(f"strategy.loss={s.loss!r} is unknown; choose one of {', '.join(LOSSES)}")
    if s.advantage not in KINDS:
        found.append(f"strategy.advantage={s.advantage!r} is unknown; choose one of {', '.join(KINDS)}")
    found += [f"strategy.{key}={s[key]} must be above 0" for key in POSITIVE if not s[key] > 0]
    if s.kl_coef < 0:
        found.append(f"strategy.kl_coef={s.kl_coef} must be 0 (no KL penalty) or above")
    if (problem := policy_problem(cfg.model.policy)) is not None:
        found.append(problem)
    return found


def train_settings(cfg: DictConfig) -> TrainSettings:
    s = cfg.strategy
    return TrainSettings(loss=s.loss, learning_rate=s.learning_rate, clip_eps=s.clip_eps, kl_coef=s.kl_coef,
                         lora_rank=s.lora_rank, updates_per_step=s.updates_per_step, temperature=s.temperature,
                         seed=cfg.seed)  # fmt: skip
