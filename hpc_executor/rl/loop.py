"""strategy=rl: RL on the ideator from execution reward (the paper's section 5).

Per step: one epoch-0 style prompt (one idea asked for), ``group_size`` samples from the current
policy version, each parsed into at most one idea; the ideas go through the search's own
implement / create_trials / execute (the step is their epoch), each sample is rewarded (no idea or
a failed trial: 0; else the environment's reward, optionally relative to the measured baseline),
the rewards are shaped, turned into advantages, and the policy takes one step; the next step
samples from the version it wrote.

Crash consistency (the driver may be killed anywhere): a step's samples and their ideas are
recorded in one transaction, so a step is sampled once or not at all; implementing and running go
through the search's ledger-backed methods, which never do anything twice; the update is recorded
as intended before it starts, and the version it wrote carries a marker file, so a resumed driver
adopts a finished version and retries an unfinished one. An update whose rewards were all equal
(zero advantages, nothing to learn) is skipped: the next step samples from the same version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from omegaconf import DictConfig, OmegaConf

from hpc_executor import diversity, ids
from hpc_executor.crashpoints import crash_point
from hpc_executor.errors import ConfigError, HpcExecutorError
from hpc_executor.idea_parsing import parse_ideas
from hpc_executor.rl import records, shaping
from hpc_executor.rl.advantages import advantages
from hpc_executor.rl.backends import make_policy
from hpc_executor.rl.metrics import progress_line, step_metrics, step_table
from hpc_executor.rl.policy import PolicyVersion, Sample, TrainingExample
from hpc_executor.rl.settings import train_settings
from hpc_executor.rl.shaping import shape_rewards
from hpc_executor.types import Idea, Patch, PatchStatus

if TYPE_CHECKING:
    from hpc_executor.search import Search

log = logging.getLogger("hpc_executor.search")
VERSION_MARKER = "version.json"  # written once an update finished: the version is complete
BASE = PolicyVersion(0, None)
IDEA_KIND = "rl"
TINY_MODEL = "tiny"  # policy.model: the tiny causal LM the code builds


class RLLoop:
    """Drives a search's steps; the search supplies the ledger, the implementer and the dispatcher."""

    def __init__(self, search: Search) -> None:
        self.search = search
        self.cfg = search.cfg.strategy
        self.work_dir = search.run_dir / "policy"
        self.current = BASE  # the version the policy holds

    def run(self) -> None:
        search = self.search
        search.open()
        shaping.mitigations(self.cfg.mitigations)  # a bad mitigation setting stops the run before any work
        request = search.ideator.request("ideate", 1, [], seed=f"{search.cfg.seed}-rl")
        self.prompt = f"{request.system}\n\n{request.user_text}"  # the same for every step
        section = policy_section(search.cfg.model.policy, search.env.catalog_path(), self.prompt)
        self.policy = make_policy(section, train_settings(search.cfg), self.work_dir, search.scheduler)
        log.info("run %s: env %s, strategy rl (%d steps x %d samples), policy %s, implementer %s, scheduler %s",
                 search.run_dir, search.env.name, self.cfg.steps, self.cfg.group_size, self.policy.label,
                 search.implementer_llm.label, search.cfg.scheduler.name)  # fmt: skip
        if search.cfg.run_baseline:  # the measured reference, run with step 0's ideas
            search.ledger.add_idea(Idea(ids.BASELINE_IDEA, 0, "Unmodified baseline", "The baseline as shipped.",
                                        kind="baseline"), slot=-1)  # fmt: skip
            search.ledger.add_patch(Patch(ids.BASELINE_IDEA, "", PatchStatus.APPLIED))
        try:
            version = BASE
            for step in range(self.cfg.steps):
                version = self.step(step, version)
            search.confirm()
        except BaseException:  # Ctrl-C: the command line asks whether to cancel what runs
            search._publish_snapshot(force=True)
            raise
        finally:
            search.stop_servers()
            self.policy.close()
        search.finish()
        search.progress.console.print(step_table(step_metrics(search.ledger.rl_samples_frame())))

    def step(self, step: int, version: PolicyVersion) -> PolicyVersion:
        """Take step ``step`` from where the ledger says it is; returns the version the next step samples."""
        row = records.steps(self.search.ledger).get(step)
        if row is None:
            self.sample(step, version)
            row = records.steps(self.search.ledger)[step]
        if row.state == records.SAMPLED:
            self.execute(step)
            self.reward(step)
        if row.state == records.UPDATED:
            assert row.produced is not None
            return row.produced
        return self.update(step, records.steps(self.search.ledger)[step])

    # -- sampling -----------------------------------------------------------------------------
    def sample(self, step: int, version: PolicyVersion) -> None:
        search, n = self.search, self.cfg.group_size
        self._use(version)
        prompt = self.prompt
        try:
            samples = self.policy.sample(prompt, n, temperature=self.cfg.temperature,
                                         max_tokens=self.cfg.max_tokens, seed=sample_seed(search.cfg.seed, step))  # fmt: skip
        except Exception as exc:
            log.debug("sampling failed", exc_info=True)
            raise HpcExecutorError(
                f"RL step {step + 1}: sampling from the policy ({self.policy.label}) failed: {type(exc).__name__}: "
                f"{exc}. Fix what it names and run the same command again: the step is sampled anew"
            ) from exc
        if len(samples) != n or len({tuple(s.prompt_tokens) for s in samples}) > 1:
            raise HpcExecutorError(
                f"RL step {step + 1}: the policy ({self.policy.label}) returned {len(samples)} samples of "
                f"{n} asked for, or samples of different prompts: a bug of its backend"
            )
        parsed = [parse_sample(s, idea_id_of(step, i)) for i, s in enumerate(samples)]
        with search.ledger.transaction():  # the samples and their ideas land together, or not at all
            records.insert_step(search.ledger, step, version, prompt, samples[0].prompt_tokens, parsed)
            for i, p in enumerate(parsed):
                if p.idea is not None and p.idea_id is not None:
                    search.ledger.add_idea(Idea(p.idea_id, step, *p.idea, kind=IDEA_KIND), slot=i)
        crash_point("rl_after_sample")
        none = [p.no_idea_reason for p in parsed if p.idea is None]
        if none:
            search.progress.note(f"RL step {step + 1}: {len(none)} of {n} samples gave no idea (reward 0): "
                                 + "; ".join(sorted(set(r or "" for r in none))))  # fmt: skip

    # -- execution and reward -----------------------------------------------------------------
    def execute(self, step: int) -> None:
        search = self.search
        if any(search.ledger.patch_for(i.idea_id) is None for i in search.ledger.ideas(step)):
            search.start_servers()
        search.implement(step)
        search.stop_servers(between_epochs=step + 1 < self.cfg.steps)
        self.policy.suspend()  # a served policy frees its GPUs while the trials run
        search.create_trials(step)
        search.create_baseline_repeats(step)
        search.execute(step)

    def reward(self, step: int) -> None:
        """Reward the step's samples, shape the rewards and compute the advantages (one transaction)."""
        ledger = self.search.ledger
        outcomes = {r["idea_id"]: r for r in ledger.outcomes(until_epoch=step) if r["epoch"] == step}
        samples = records.step_samples(ledger, step)
        waiting = [s["idea_id"] for s in samples if s["idea_id"] and outcomes[s["idea_id"]]["status"] is None]
        if waiting:  # only a spent budget leaves ideas without a result after execute
            raise HpcExecutorError(
                f"RL step {step + 1}: {len(waiting)} of its ideas have no result yet (LLM budget "
                f"{self.search.meter.describe()}; GPU budget {self.search.gpu_budget.describe(ledger)}): raise "
                "budget_usd or budget_gpu_hours and run the same command again to finish the step"
            )
        baseline = self.search.baseline_reward() if self.cfg.reward_relative_to_baseline else None
        if baseline is not None and baseline <= 0:
            raise ConfigError(f"strategy.reward_relative_to_baseline=true, but the baseline's reward is {baseline}; "
                              "set it to false for this environment")  # fmt: skip
        rewards = [reward_of(outcomes.get(s["idea_id"]), baseline) for s in samples]
        frame = ledger.rl_samples_frame()
        texts = idea_texts(frame[frame.step == step].sort_values("sample_index"))
        earlier = frame[(frame.step < step) & frame.idea_id.notna()]
        previous, older = idea_texts(earlier[earlier.step == step - 1]), idea_texts(earlier)
        executed = [bool(s["idea_id"]) and outcomes[s["idea_id"]]["status"] == "ok" for s in samples]
        shaped = shape_rewards(rewards, texts, [s["thinking_chars"] for s in samples], previous, older,
                               self.cfg.mitigations, executed=executed)  # fmt: skip
        advs = advantages(shaped, self.cfg.advantage, k=self.cfg.max_at_k)
        with ledger.transaction():
            records.set_rewards(ledger, step, rewards, shaped, advs)
            metrics = step_metrics(ledger.rl_samples_frame()).set_index("step").loc[step].to_dict()
            records.set_executed(ledger, step, metrics)
        crash_point("rl_after_reward")
        self.search.progress.note(progress_line({"step": step, "steps": self.cfg.steps, **metrics}))

    # -- the update ---------------------------------------------------------------------------
    def update(self, step: int, row: records.StepRow) -> PolicyVersion:
        """One policy step on the step's samples, or the version a killed driver's update finished."""
        ledger = self.search.ledger
        samples = records.step_samples(ledger, step)
        if all(s["advantage"] == 0 for s in samples):
            records.record_update(ledger, step, row.drawn_by, note="skipped: every sample earned the same "
                                  "reward, so every advantage is 0 and there is nothing to learn")  # fmt: skip
            self.search.progress.note(f"RL step {step + 1}: every reward equal; no update, the next step samples "
                                      f"from the same version (v{row.drawn_by.step})")  # fmt: skip
            return row.drawn_by
        target = row.drawn_by.step + 1
        out_dir = self.work_dir / f"v{target:04d}"
        version = read_marker(out_dir)
        if version is None:
            records.intend_update(ledger, step, PolicyVersion(target, str(out_dir)))
            crash_point("rl_before_update")
            version = self._train(step, row.drawn_by, target, out_dir, samples)
            write_marker(out_dir, version)
            crash_point("rl_after_update")
        else:
            self.search.progress.note(f"RL step {step + 1}: adopted version v{version.step} that a killed driver's "
                                      "update had finished")  # fmt: skip
            self._use(version)
        records.record_update(ledger, step, version)
        return version

    def _train(self, step: int, start: PolicyVersion, target: int, out_dir: Path,
               samples: list[dict[str, Any]]) -> PolicyVersion:  # fmt: skip
        self._use(start)
        examples = [
            TrainingExample(s["prompt_tokens"], s["tokens"], s["logprobs"], s["advantage"]) for s in samples
        ]
        try:
            version = self.policy.train_step(examples, step=target, out_dir=out_dir)
        except Exception as exc:
            log.debug("the update failed", exc_info=True)
            records.record_update_error(self.search.ledger, step, f"{type(exc).__name__}: {exc}")
            raise HpcExecutorError(
                f"RL step {step + 1}: the policy update ({self.policy.label}) failed: {type(exc).__name__}: {exc}. "
                f"Fix what it names (memory, the adapter, the update job's log under {out_dir}) and run the same "
                "command again: the update is retried, and nothing sampled or run is lost"
            ) from exc
        self.current = version
        return version

    def _use(self, version: PolicyVersion) -> None:
        if version == self.current:
            return
        try:
            self.policy.use(version)
        except Exception as exc:
            log.debug("loading a version failed", exc_info=True)
            raise HpcExecutorError(
                f"the policy ({self.policy.label}) could not load version v{version.step} ({version.path}): "
                f"{type(exc).__name__}: {exc}. Fix what it names (the adapter's files, the backend's access to "
                "them) and run the same command again; the ledger keeps every step done"
            ) from exc
        self.current = version


def policy_section(policy: DictConfig, catalog: Path | None, prompt: str) -> DictConfig:
    """The model group's policy section for the backend. The tiny model, built in code, is warmed up
    on the environment's idea catalog as answers to the RL prompt (``catalog``, ``warm_prompt``),
    unless the section names its own."""
    section = OmegaConf.create(OmegaConf.to_container(policy, resolve=True))
    assert isinstance(section, DictConfig)
    if section.get("model") == TINY_MODEL:
        if catalog is not None and not section.get("catalog"):
            section.catalog = str(catalog)
        if not section.get("warm_prompt"):
            section.warm_prompt = prompt
    return section


# -- samples --------------------------------------------------------------------------------------
def idea_id_of(step: int, index: int) -> str:
    """The idea id of a step's sample: its epoch's slot, as the search names them."""
    return ids.idea_id(step, index)


def sample_seed(seed: int, step: int) -> int:
    """The step's sampling seed: the same for a step sampled again after a crash."""
    return int.from_bytes(hashlib.sha256(f"{seed}-rl-{step}".encode()).digest()[:4], "big")


def split_thinking(text: str) -> tuple[str, str]:
    """(thinking, answer) of a completion: thinking is what precedes ``</think>`` (a chat template may
    have opened the tag in the prompt), or all of an unclosed ``<think>``."""
    head, sep, tail = text.partition("</think>")
    if sep:
        return head.replace("<think>", "", 1).strip(), tail.strip()
    if text.lstrip().startswith("<think>"):
        return text.lstrip()[len("<think>") :].strip(), ""
    return "", text.strip()


def parse_sample(sample: Sample, idea_id: str) -> records.ParsedSample:
    """At most one idea from a sample (the first, should it hold more), or why it holds none."""
    thinking, answer = split_thinking(sample.text)
    ideas = parse_ideas(answer)
    reason = None
    if not ideas:
        reason = (
            "the answer holds no idea (no <idea> block, JSON, list or headings)"
            if answer
            else "the sample ended inside its thinking, before any answer"
            if thinking
            else "the sample is empty"
        )
    return records.ParsedSample(sample, len(thinking), len(answer), ideas[0] if ideas else None, reason,
                                idea_id if ideas else None)  # fmt: skip


def reward_of(outcome: dict[str, Any] | None, baseline: float | None) -> float:
    """0 for a sample without an idea or a trial that failed; else the trial's reward (over the baseline's)."""
    if outcome is None or outcome["status"] != "ok" or outcome["reward"] is None:
        return 0.0
    return float(outcome["reward"]) / baseline if baseline else float(outcome["reward"])


# -- the policy version's marker -----------------------------------------------------------------
def read_marker(out_dir: Path) -> PolicyVersion | None:
    path = out_dir / VERSION_MARKER
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    return PolicyVersion(int(data["step"]), data["path"])


def write_marker(out_dir: Path, version: PolicyVersion) -> None:
    """Written last, atomically: its presence says the version is complete."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{VERSION_MARKER}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"step": version.step, "path": version.path}))
    os.replace(tmp, out_dir / VERSION_MARKER)


def idea_texts(samples: pd.DataFrame) -> list[str]:
    """What the mitigations compare: each sample's idea as the diversity module writes it ("" for none)."""
    return [
        diversity.idea_text(t, d or "") if i is not None else ""
        for i, t, d in zip(samples.idea_id, samples.title, samples.description, strict=True)
    ]
