"""An in-memory twin of ``Policy`` for the RL loop's tests: a categorical distribution over a fixed
list of completions whose logits move with the advantages (an exact policy gradient of the mean of
advantage x log-prob), with byte tokens and log-probs that sum to the completion's log-prob.

Used as ``model.policy.backend=fakes.policy:FakePolicy`` (with tests/ on PYTHONPATH). Optional
``model.policy.texts`` replaces the completions. ``FAKE_POLICY_LOG`` names a file that gets one line
per event (``sample <seed>``, ``update <step> start``, ``update <step> done``), ``FAKE_POLICY_FAIL_UPDATE=1``
and ``FAKE_POLICY_FAIL_SAMPLE=1`` make every update or sampling call raise, and the crash points ``fake_mid_sample`` and ``fake_mid_update`` kill the
process inside a sampling call and an update.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

from omegaconf import DictConfig

from hpc_executor.crashpoints import crash_point
from hpc_executor.rl.policy import Policy, PolicyVersion, Sample, TrainingExample, TrainSettings
from hpc_executor.scheduling import Scheduler

LOGITS_FILE = "logits.json"


def idea(title: str, description: str) -> str:
    return f"<idea>\n<title>{title}</title>\n<description>{description}</description>\n</idea>"


# Ideas of the quick environment (tests/envs/quick/catalog.yaml) as a sampler might write them.
HIGHER_LR = idea("Raise the learning rate (lr=0.4)", "Larger steps. (recipe: higher_lr lr=0.4)")
MOMENTUM = idea("Add heavy-ball momentum (beta=0.5)", "Momentum. (recipe: momentum beta=0.5)")
CRASH = idea("Use an undefined schedule", "Calls a function that does not exist. (recipe: crash)")
NO_IDEA = "<think>Hmm, the loss is a quadratic.</think>\nI am not sure what would help here."
TITLE_ONLY = idea("raise the learnig rate", "Take larger steps.")  # no recipe, a typo: matched by title
TEXTS = [HIGHER_LR, MOMENTUM, CRASH, NO_IDEA, TITLE_ONLY]


class FakePolicy(Policy):
    label = "fake categorical policy (tests)"

    def __init__(self, policy_cfg: DictConfig, train: TrainSettings, work_dir: Path,
                 scheduler: Scheduler | None) -> None:  # fmt: skip
        self.texts = list(policy_cfg.get("texts") or TEXTS)
        self.lr = train.learning_rate
        self.work_dir = work_dir
        self.logits = [0.0] * len(self.texts)
        self.log = os.environ.get("FAKE_POLICY_LOG")

    def probs(self, temperature: float = 1.0) -> list[float]:
        top = max(self.logits)
        weights = [math.exp((x - top) / temperature) for x in self.logits]
        return [w / sum(weights) for w in weights]

    def sample(self, prompt: str, n: int, *, temperature: float, max_tokens: int, seed: int) -> list[Sample]:
        self._note(f"sample {seed}")
        if os.environ.get("FAKE_POLICY_FAIL_SAMPLE"):
            raise ConnectionError("the policy's server went away (the fake policy's failure)")
        probs = self.probs(temperature)
        picks = random.Random(seed).choices(range(len(self.texts)), weights=probs, k=n)
        crash_point("fake_mid_sample")
        prompt_tokens = list(prompt.encode()[-16:])
        out = []
        for k in picks:
            tokens = list(self.texts[k].encode())[:max_tokens]
            out.append(Sample(prompt_tokens, tokens, [math.log(probs[k]) / len(tokens)] * len(tokens),
                              bytes(tokens).decode(errors="replace")))  # fmt: skip
        return out

    def train_step(self, examples: list[TrainingExample], *, step: int, out_dir: Path) -> PolicyVersion:
        self._note(f"update {step} start")
        if os.environ.get("FAKE_POLICY_FAIL_UPDATE"):
            raise RuntimeError("CUDA out of memory (the fake policy's failure)")
        probs = self.probs()
        grad = [0.0] * len(self.texts)
        for ex in examples:
            k = self.texts.index(bytes(ex.tokens).decode())
            for j in range(len(grad)):
                grad[j] += ex.advantage * ((j == k) - probs[j]) / len(examples)
        self.logits = [x + self.lr * g for x, g in zip(self.logits, grad, strict=True)]
        crash_point("fake_mid_update")
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / LOGITS_FILE).write_text(json.dumps(self.logits))
        self._note(f"update {step} done")
        return PolicyVersion(step, str(out_dir))

    def use(self, version: PolicyVersion) -> None:
        if version.path is None:
            self.logits = [0.0] * len(self.texts)
        else:
            self.logits = json.loads((Path(version.path) / LOGITS_FILE).read_text())

    def _note(self, line: str) -> None:
        if self.log:
            with open(self.log, "a") as f:
                f.write(line + "\n")
