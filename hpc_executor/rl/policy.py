"""The interface every RL policy backend implements (a tiny CPU model, vLLM + LoRA, Tinker).

The RL loop only ever talks to a ``Policy``: it samples a group of completions for one prompt,
records them (token ids and sampling log-probs included), and hands the rewarded samples back as
``TrainingExample``s for one optimiser step, which yields the next ``PolicyVersion``. A version is
everything needed to sample from it and to train it further (adapter weights and optimiser state),
so a resumed driver can ``use`` the last finished one and go on from there.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Sample:
    """One completion drawn from the policy for one prompt."""

    prompt_tokens: list[int]
    tokens: list[int]  # the completion's token ids, as sampled
    logprobs: list[float]  # the sampler's log-probability of each completion token
    text: str  # the decoded completion (thinking included, where the model thinks)


@dataclass(frozen=True)
class TrainingExample:
    """A recorded sample and the advantage its reward earned."""

    prompt_tokens: list[int]
    tokens: list[int]
    logprobs: list[float]  # sampling log-probs: the importance-sampling denominator
    advantage: float


@dataclass(frozen=True)
class TrainSettings:
    """How a backend takes its optimiser step (strategy=rl's values)."""

    loss: str = "grpo_clip"  # "grpo_clip" or "reinforce" (both importance-sampled over the recorded tokens)
    learning_rate: float = 4e-5
    clip_eps: float = 0.2  # GRPO-clip's ratio clip
    kl_coef: float = 0.0  # a KL penalty towards the base model (0: none, as in the paper)
    lora_rank: int = 32
    # Optimiser steps per RL step, each over all the step's samples (PPO's epochs per batch): after
    # the first, the policy is off the samples' version, which the importance ratio and the clip
    # account for. 1 (the paper's): one step per group.
    updates_per_step: int = 1
    seed: int = 0
    # The sampling temperature: recorded log-probs are the tempered sampler's, so the update computes
    # the trained policy's log-probs at the same temperature, or the importance ratios are off.
    temperature: float = 1.0


@dataclass(frozen=True)
class PolicyVersion:
    """Policy weights after ``step`` optimiser steps (0: the base model, no adapter)."""

    step: int
    path: str | None  # an adapter directory under the run directory, or a Tinker weights URI


class Policy(abc.ABC):
    """An open model the RL loop samples from and trains."""

    label: str  # what the ledger and the plan call it

    @abc.abstractmethod
    def sample(self, prompt: str, n: int, *, temperature: float, max_tokens: int, seed: int) -> list[Sample]:
        """``n`` independent completions of ``prompt`` from the current version."""

    @abc.abstractmethod
    def train_step(self, examples: list[TrainingExample], *, step: int, out_dir: Path) -> PolicyVersion:
        """One optimiser step from the current version on ``examples``; writes version ``step`` (weights
        and optimiser state) under ``out_dir``, makes it current and returns it. Running it again for the
        same step and examples after a crash gives the same version."""

    @abc.abstractmethod
    def use(self, version: PolicyVersion) -> None:
        """Sample from, and train on from, ``version`` (a resumed run's last finished step)."""

    def suspend(self) -> None:
        """The loop is about to execute trials (hours): release the GPUs the policy holds while
        it waits (a served model), unless its config keeps them; the next ``sample`` or
        ``train_step`` takes them again. A no-op by default."""
        return None

    def close(self) -> None:
        """Release what the backend holds (a served model, a client); a no-op by default."""
        return None
