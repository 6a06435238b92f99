"""The search driver: ``python -m hpc_executor.search +env=tiny +model=offline``.

Per epoch: ask the ideator for the epoch's empty idea slots, implement every idea that has no
patch yet, create and dispatch a trial for every patch that has none, and poll the ledger until
the epoch's trials are done. Every step is recorded before the next starts, so running the same
command again continues where a killed driver stopped: nothing is asked, implemented or run twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, cast

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from hpc_executor import confirm, diversity, gpu_hours, noise, report
from hpc_executor.budget import CostMeter, usd
from hpc_executor.cancel import CANCELLED_META, cancel_run
from hpc_executor.claim import CLAIM_FILE, claim_holder, release_claim
from hpc_executor.config import register_configs
from hpc_executor.config_checks import bound_problems, command_line_problems, run_name_problem
from hpc_executor.crashpoints import crash_point
from hpc_executor.environment import REPO_ROOT, Environment
from hpc_executor.errors import HpcExecutorError, PreflightError, RunCancelled
from hpc_executor.gpu_hours import GpuBudget
from hpc_executor.ideator import Ideator, Proposal
from hpc_executor.implementer import Call, Implementer
from hpc_executor.ledger import Ledger
from hpc_executor.llm import LLM, make_llm, spec_from_config
from hpc_executor.llm.credentials import policy_env_vars, required_env_vars
from hpc_executor.llm.retry import RetryingLLM
from hpc_executor.model_server import ModelServer
from hpc_executor.progress import Progress
from hpc_executor.rl import settings as rl_settings
from hpc_executor.sandbox import SandboxUnavailable, drop_secrets_from_environ, resolve_sandbox, tail
from hpc_executor.scheduling import JobState, SchedulerQueryError, Shape, make_scheduler, recorded_config
from hpc_executor.storage import check_writable, mentions_full_disk, storage_message, storage_problem
from hpc_executor.strategies import Slot, make_strategy
from hpc_executor.types import Idea, Patch, Result, Status, Trial, array_index
from hpc_executor.worker import DIFF_FILE, RESULT_FILE, STARTED_FILE, TRAIN_LOG, TrialSpec

log = logging.getLogger("hpc_executor.search")

CONF_DIR = REPO_ROOT / "conf"
IDEATION_ATTEMPTS = 3  # calls per group of empty slots before the epoch goes on without them
MAX_SUBMISSIONS = 2  # a trial whose job vanished or was preempted runs again, once
MAY_COME_BACK = (JobState.PREEMPTED, JobState.NODE_FAIL, JobState.UNKNOWN)
BASELINE_ID = "baseline"
ROLES = ("ideator", "implementer")
NOT_STARTED_URL = "http://model-server-not-started.invalid/v1"


class Search:
    def __init__(self, cfg: DictConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.env = Environment(cfg.env)
        preflight(cfg, self.env)
        self.sandbox = resolve_sandbox(cfg.sandbox, cfg.isolate_pids)  # probed by preflight: cached
        self.ideator_llm, self.implementer_llm = (self._make_llm(role) for role in ROLES)
        for role in ROLES:  # a wrong model name or key fails here, before any work is queued
            if not cfg.model[role].serve.enabled:
                self._llm(role).check_model()
        # The clients hold their keys now; nothing this process starts may inherit them.
        drop_secrets_from_environ()
        self._servers_by_key: dict[str, ModelServer] = {}  # by a hash of model and serve config
        self.strategy = make_strategy(cfg.strategy, cfg.seed)
        self.scheduler = make_scheduler(cfg.scheduler, run_dir / "submitit")
        self.ideator = Ideator(self.ideator_llm, self.env, cfg.model.ideator.thinking_budget,
                               cfg.model.ideator.thinking_budget_search)  # fmt: skip
        self.meter = CostMeter(cfg.budget_usd)  # the spend of earlier sessions is added in open()
        self._budget_noted = False
        self.gpu_budget = GpuBudget(cfg.budget_gpu_hours)
        noise.check(cfg.noise)
        self.novelty = (
            diversity.NoveltyFilter(cfg.novelty.method, cfg.novelty.threshold)
            if cfg.novelty.enabled
            else None
        )
        self.implementer = Implementer(self.implementer_llm, self.env, cfg.model.samples, cfg.model.revisions,
                                       cfg.model.implementer.thinking_budget, self.meter)  # fmt: skip
        self.shape = trial_shape(cfg)
        self._waiting_since: dict[str, float] = {}  # trial -> when its job was first seen ended
        self._snapshot_due, self._unpublished = 0.0, False  # when the ledger's snapshot may next be renewed

    # -- set-up --------------------------------------------------------------------------------
    def _make_llm(self, role: str) -> LLM:
        spec = spec_from_config(self.cfg.model[role])
        if self.cfg.model[role].serve.enabled:
            spec.base_url = NOT_STARTED_URL  # until start_servers() points the client at the server
        return make_llm(spec)

    def _llm(self, role: str) -> LLM:
        return self.ideator_llm if role == "ideator" else self.implementer_llm

    def start_servers(self) -> None:
        """Serve the open models that roles asked to have served (one server per distinct model and
        serve config), or adopt the ones an earlier driver of this run left running; servers that
        are up already stay as they are."""
        for role in ROLES:
            cfg = self.cfg.model[role]
            if not cfg.serve.enabled:
                continue
            key = hashlib.sha256(f"{cfg.model}|{OmegaConf.to_yaml(cfg.serve)}".encode()).hexdigest()[:12]
            server = self._servers_by_key.get(key)
            if server is None:
                server = ModelServer(
                    cfg.model, cfg.serve, self.scheduler, self.run_dir / "model_servers" / key
                )
                meta = f"model_server_job:{key}"
                job_id = self.ledger.get_meta(meta)
                if not (job_id and server.adopt(job_id)):
                    server.start()
                self.ledger.set_meta(meta, server.job_id)
                self._servers_by_key[key] = server
            llm = self._llm(role)
            assert isinstance(llm, RetryingLLM) and server.url  # serve.enabled is for openai_compatible
            llm.point_at(server.url)
            llm.check_model()

    def stop_servers(self, *, between_epochs: bool = False) -> None:
        """Cancel the run's model servers (a no-op when there are none, or they are stopped already);
        between epochs, those with ``serve.keep_alive`` stay up."""
        keep = {
            key for key, server in self._servers_by_key.items() if between_epochs and server.cfg.keep_alive
        }
        for key, server in list(self._servers_by_key.items()):
            if key not in keep:
                server.stop()
                self.ledger.set_meta(f"model_server_job:{key}", None)
                del self._servers_by_key[key]

    def open(self) -> None:
        """Prepare the data, and open (or create) the run's ledger, checking it is this run's."""
        self.env.prepare()
        self.ledger = Ledger(self.run_dir, create=True)
        self._check_same_run()
        self.meter.add(self.ledger.spent_usd())
        self.ledger.set_meta(CANCELLED_META, None)  # running a cancelled run again resumes it
        self.progress = Progress(self.cfg.strategy.epochs, self.baseline_reward())
        self._retry_disk_full()

    def _retry_disk_full(self) -> None:
        """Trials that stopped on a full disk were not their idea's fault: they run again. Their files
        go first, so that a driver killed in between finds the same trials to reopen."""
        trials = self.ledger.ended_with(Status.DISK_FULL.value)
        for trial in trials:
            for name in (RESULT_FILE, STARTED_FILE, CLAIM_FILE):
                (Path(trial.trial_dir) / name).unlink(missing_ok=True)
        self.ledger.reopen_trials([t.trial_id for t in trials], note="the disk was full; run again")
        if trials:
            self.progress.note(f"{len(trials)} trials that stopped on a full disk run again")

    def _check_same_run(self) -> None:
        identity = {"env": self.env.name, "baseline_hash": self.env.baseline_hash(),
                    "eval_data_hash": self.env.eval_data_hash(),
                    "strategy": self.cfg.strategy.name, "batch_size": str(self.cfg.strategy.batch_size)}  # fmt: skip
        for key, value in identity.items():
            recorded = self.ledger.get_meta(key)
            if recorded is None:
                self.ledger.set_meta(key, value)
            elif recorded != value and key == "eval_data_hash":
                raise PreflightError(
                    f"the evaluation data ({', '.join(self.cfg.env.eval_data)} in {self.env.data_dir}) is not what "
                    f"{self.run_dir} started with (hash {recorded} -> {value}): its rewards would not compare. "
                    "Prepare the original data again, or start a new run with run_name=<new name>."
                )
            elif recorded != value:
                raise PreflightError(
                    f"{self.run_dir} belongs to a run with {key}={recorded}, not {value}; resume it with its "
                    f"original settings, or start a new run with run_name=<new name>."
                )
        config = OmegaConf.to_yaml(self.cfg, resolve=True)
        self.ledger.set_meta("config", config)
        self.config_hash = hashlib.sha256(config.encode()).hexdigest()[:16]

    def baseline_reward(self) -> float:
        """The measured baseline (the mean of its seeds) when this run has one, else the recorded value."""
        return self.baseline_noise().mean

    def baseline_noise(self) -> noise.BaselineNoise:
        return noise.measure(self.ledger, self.cfg.noise.k, float(self.cfg.env.reward.baseline))

    def plan(self) -> str:
        """What this run will do, for check_only."""
        s, shape = self.cfg.strategy, self.shape
        lines = [
            f"run directory  {self.run_dir}"
            + (" (resumes it)" if (self.run_dir / "ledger.sqlite").exists() else ""),
            f"environment    {self.env.name} ({self.env.baseline_dir}), baseline hash {self.env.baseline_hash()}",
            f"ideator        {self.ideator_llm.label}",
            f"implementer    {self.implementer_llm.label}, {self.cfg.model.samples} samples x "
            f"{self.cfg.model.revisions} revisions",
            f"strategy       {s.name}: {s.epochs} epochs x {s.batch_size} ideas, calls of {s.call_size}; "
            f"exploit slots per epoch {[self.strategy.exploit_count(e) for e in range(s.epochs)]}",
            f"trials         {shape.gpus} GPUs, {shape.cpus} CPUs, {shape.mem_gb} GB each; budget "
            f"{self.cfg.env.budget_s}s, hard limit {self.cfg.env.hard_limit_s}s; scheduler {self.cfg.scheduler.name}",
            f"sandbox        {self.sandbox.describe()}",
            f"LLM budget     {usd(self.cfg.budget_usd) if self.cfg.budget_usd else 'none (budget_usd=...)'}; "
            f"up to {self.cfg.model.implementer.max_concurrency} implementer requests at once",
            "GPU budget     "
            + (
                f"{self.cfg.budget_gpu_hours:g} GPU-hours"
                if self.cfg.budget_gpu_hours
                else "none (budget_gpu_hours=...)"
            ),
            f"integrity      baseline on {self.cfg.noise.baseline_repeats} seeds (an idea beats it above mean + "
            f"{self.cfg.noise.k:g}·std); confirm the top {self.cfg.confirm.top_k} on {self.cfg.confirm.seeds} "
            f"fresh seeds; novelty filter {'on' if self.cfg.novelty.enabled else 'off'}",
            *(
                f"serves        {role}: {cfg.model} as a job ({cfg.serve.gpus} GPUs), started by the run"
                for role in ROLES
                if (cfg := self.cfg.model[role]).serve.enabled
            ),
            "check_only: preflight passed (keys, models, data, scheduler), nothing was run",
        ]
        return "\n".join(lines)

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> None:
        if self.cfg.strategy.name == "rl":  # RL steps on the policy instead of epochs of ideas
            from hpc_executor.rl.loop import RLLoop

            RLLoop(self).run()
            return
        self.open()
        s = self.cfg.strategy
        log.info(
            "run %s: env %s, strategy %s (%d epochs x %d ideas), ideator %s, implementer %s, scheduler %s",
            self.run_dir, self.env.name, s.name, s.epochs, s.batch_size, self.ideator_llm.label,
            self.implementer_llm.label, self.cfg.scheduler.name,
        )  # fmt: skip
        if self.sandbox.kind == "none":
            log.warning("sandbox %s; every trial's provenance says so", self.sandbox.describe())
        if self.cfg.run_baseline:
            self.ledger.add_idea(Idea(BASELINE_ID, 0, "Unmodified baseline", "The baseline as shipped.",
                                      kind="baseline"), slot=-1)  # fmt: skip
            self.ledger.add_patch(Patch(BASELINE_ID, "", "applied"))
        try:
            for epoch in range(s.epochs):
                if self._calls_left(epoch) and not self.meter.exhausted():
                    self.start_servers()
                self.ideate(epoch)
                self.implement(epoch)
                # the trials' turn: free the servers' GPUs, unless kept for the next epoch's calls
                self.stop_servers(between_epochs=epoch + 1 < s.epochs and not self.meter.exhausted())
                self.create_trials(epoch)
                self.create_baseline_repeats(epoch)
                self.execute(epoch)
                self.progress.baseline = self.baseline_reward()
                if self.meter.exhausted() and epoch + 1 < s.epochs:
                    self.progress.note(f"stopping after epoch {epoch + 1} of {s.epochs}: the LLM budget is spent "
                                       f"({self.meter.describe()}); raise budget_usd to go on")  # fmt: skip
                    break
                if self.gpu_budget.exhausted(self.ledger):
                    self.progress.note(f"stopping after epoch {epoch + 1} of {s.epochs}: the GPU budget is spent "
                                       f"({self.gpu_budget.describe(self.ledger)}); raise budget_gpu_hours to go on")  # fmt: skip
                    break
            else:  # the search is complete: its winners may be confirmed
                self.confirm()
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                self.interrupted()
            self._publish_snapshot(force=True)  # what a stopped or failed run recorded, for readers elsewhere
            raise
        finally:
            self.stop_servers()
        self.finish()

    def finish(self) -> None:
        """The end of a search (or of the confirm command): the snapshot with everything recorded,
        which the report reads, the end-of-run tables and the report."""
        self._publish_snapshot(force=True)
        self.progress.baseline_noise = self.baseline_noise()
        self.progress.final_table(self.ledger.outcomes(), self.run_dir)
        self.progress.gpu_table(gpu_hours.by_epoch(self.ledger), self.gpu_budget.describe(self.ledger))
        self.progress.usage_table(self.ledger.llm_usage(), self.meter)
        if not self.cfg.report.enabled:
            return
        try:
            path = report.write(self.run_dir, similarity=self.cfg.report.similarity)
        except (
            Exception
        ) as exc:  # the report only shows the ledger: a flaw in it must not fail a finished run
            log.exception("the run report could not be written")
            self.progress.note(f"the report could not be written ({type(exc).__name__}: {exc}); the ledger is "
                               f"complete: try again with python -m hpc_executor.report {self.run_dir}")  # fmt: skip
        else:
            self.progress.console.print(f"report: {path}")

    def confirm(self) -> None:
        """Run the top ideas again on fresh seeds (confirm.top_k, confirm.seeds), as trials of the
        last epoch, and record their confirmed reward."""
        top_k, seeds = self.cfg.confirm.top_k, self.cfg.confirm.seeds
        if top_k <= 0:
            return
        epoch = max(i.epoch for i in self.ledger.ideas())
        for row in confirm.candidates(self.ledger, top_k):
            for trial_id, seed in confirm.trials_for(row["idea_id"], self.cfg.seed, seeds):
                self.create_extra_trial(row["idea_id"], epoch, trial_id, confirm.CONFIRM, seed)
        self.progress.note(f"confirming the top {top_k} ideas on {seeds} fresh seeds each")
        self.execute(epoch)
        confirm.record(self.ledger, self.baseline_noise())

    def _calls_left(self, epoch: int) -> bool:
        """Whether this epoch still needs an LLM: empty idea slots, or ideas without a patch."""
        filled = self.ledger.slots_filled(epoch)
        if any(slot.index not in filled for slot in self.strategy.plan(epoch)):
            return True
        return any(self.ledger.patch_for(i.idea_id) is None for i in self.ledger.ideas(epoch))

    def ideate(self, epoch: int) -> None:
        """Fill the epoch's empty idea slots, in calls of ``call_size``. Epoch-0 style calls go one at a
        time, since each is shown the ideas so far; exploit and explore calls, which are shown only
        earlier epochs, go at once."""
        filled = self.ledger.slots_filled(epoch)
        empty = [slot for slot in self.strategy.plan(epoch) if slot.index not in filled]
        call = self.cfg.strategy.call_size
        groups = [empty[i : i + call] for i in range(0, len(empty), call)]
        groups = [[s for s in g if s.purpose == g[0].purpose] for g in groups]
        for group in (g for g in groups if g[0].purpose == "ideate"):
            self._fill(epoch, [group])
        self._fill(epoch, [g for g in groups if g[0].purpose != "ideate"])
        self._show(epoch)

    def _fill(self, epoch: int, groups: list[list[Slot]]) -> None:
        """One ideator call per group, all at once; slots a call left empty are asked for again, up
        to IDEATION_ATTEMPTS calls in all."""
        for attempt in range(IDEATION_ATTEMPTS):
            if not groups:
                return
            if self.meter.exhausted():
                self._budget_note(f"epoch {epoch + 1}: {sum(map(len, groups))} idea slots left empty")
                return
            remaining = []
            # exploit prompts show the ideas that beat the baseline by more than its noise
            history, baseline = self.ledger.outcomes(until_epoch=epoch), self.baseline_noise().bar
            with ThreadPoolExecutor(max_workers=len(groups), thread_name_prefix="ideate") as pool:
                futures = {}
                for group in groups:
                    purpose = group[0].purpose
                    shown = self.strategy.shown(purpose, epoch, history, baseline)
                    effective = "explore" if purpose == "exploit" and not shown else purpose
                    seed = f"{self.cfg.seed}-{epoch}-{group[0].index}-{attempt}"
                    future = pool.submit(self.ideator.propose, effective, len(group), shown, seed)
                    parents = [h["idea_id"] for h in shown] if effective == "exploit" else []
                    call_id = self.ledger.next_call_id(f"e{epoch}-{effective}-{group[0].index}-a")
                    futures[future] = (group, call_id, parents)
                for future in as_completed(futures):
                    group, call_id, parents = futures[future]
                    rest = self._record_ideas(epoch, group, call_id, parents, future.result())
                    if rest:
                        remaining.append(rest)
            groups = remaining
        if groups:
            self.progress.note(f"epoch {epoch + 1}: {sum(map(len, groups))} idea slots stay empty after "
                               f"{IDEATION_ATTEMPTS} calls; the epoch goes on without them")  # fmt: skip

    def _record_ideas(self, epoch: int, group: list[Slot], call_id: str, parents: list[str],
                      proposal: Proposal) -> list[Slot]:  # fmt: skip
        """Record the call and its ideas together; returns the slots it left empty."""
        self.meter.add(proposal.response.cost_usd)
        outcome = "error" if proposal.response.error else "ok" if proposal.ideas else "no_ideas"
        ideas, dropped = self._screen(epoch, group, proposal.ideas)
        with self.ledger.transaction():  # the call and its ideas land together, or not at all
            self._record_call("ideator", epoch, Call(call_id, proposal.request, proposal.response, outcome))
            if dropped and self.novelty:
                diversity.record_rejections(
                    self.ledger, call_id, epoch, proposal.ideas, dropped, self.novelty.method
                )
            for slot, (title, description) in zip(group, ideas, strict=False):
                idea = Idea(slot_idea_id(epoch, slot), epoch, title, description, proposal.request.purpose,
                            parents, call_id)  # fmt: skip
                self.ledger.add_idea(idea, slot.index)
        rest = group[len(ideas) :]
        if dropped:
            self.progress.note(f"epoch {epoch + 1}: the novelty filter dropped {len(dropped)} ideas of {call_id} as "
                               "too close to earlier ones: " + ", ".join(f"{proposal.ideas[p][0]!r} ~ {n} ({s:.2f})"
                                                                      for p, n, s in dropped))  # fmt: skip
        if rest and len(proposal.ideas) < len(group):
            self.progress.note(f"epoch {epoch + 1}: ideator call {call_id} gave {len(proposal.ideas)} of "
                               f"{len(group)} ideas ({proposal.problem or 'short answer'})")  # fmt: skip
        return rest

    def _screen(self, epoch: int, group: list[Slot], ideas: list[tuple[str, str]]
                ) -> tuple[list[tuple[str, str]], list[tuple[int, str, float]]]:  # fmt: skip
        """The ideas of a call the novelty filter keeps (all, when it is off), and those it drops."""
        if self.novelty is None or not ideas:
            return ideas, []
        earlier = [(i.idea_id, diversity.idea_text(i.title, i.description)) for i in self.ledger.ideas()
                   if i.kind != "baseline"]  # fmt: skip
        ids = [slot_idea_id(epoch, slot) for slot in group]
        kept, dropped = self.novelty.screen([diversity.idea_text(t, d) for t, d in ideas], ids, earlier)
        return [ideas[i] for i in kept], dropped

    def implement(self, epoch: int) -> None:
        todo = [i for i in self.ledger.ideas(epoch) if self.ledger.patch_for(i.idea_id) is None]
        if not todo:
            return
        unimplemented = []
        for idea, patch, calls in self.implementer.implement_all(todo):
            if patch is None:
                unimplemented.append(idea.idea_id)
                continue
            with self.ledger.transaction():
                for c in calls:
                    self._record_call("implementer", epoch, c)
                self.ledger.add_patch(patch)
            self._show(epoch)
        if unimplemented:
            self._budget_note(f"epoch {epoch + 1}: {len(unimplemented)} ideas left unimplemented")

    def _budget_note(self, what: str) -> None:
        if not self._budget_noted:
            self._budget_noted = True
            self.progress.note(f"LLM budget reached ({self.meter.describe()}): no new calls; {what}. Trials "
                               "already created run to the end. Raise budget_usd and run the same command "
                               "to go on.")  # fmt: skip

    def create_trials(self, epoch: int) -> None:
        if self.gpu_budget.exhausted(self.ledger):  # the ideas stay without trials until the budget is raised
            return
        for idea in self.ledger.ideas(epoch):
            patch = self.ledger.patch_for(idea.idea_id)
            if patch is None or self.ledger.has_trial(idea.idea_id):
                continue
            trial_id = f"{idea.idea_id}-t0"
            trial_dir = self.run_dir / "trials" / trial_id
            if patch.status != "applied":
                self.ledger.add_trial(trial_id, idea.idea_id, epoch, str(trial_dir))
                self.ledger.record_results([Result(trial_id, Status(patch.status), reason=patch.reason)])
                continue
            self._write_trial_dir(trial_dir, trial_id, idea.idea_id, patch, self.cfg.seed)
            self.ledger.add_trial(trial_id, idea.idea_id, epoch, str(trial_dir))

    def _write_trial_dir(self, trial_dir: Path, trial_id: str, idea_id: str, patch: Patch, seed: int) -> None:
        """The trial's directory (diff and spec), written before its ledger row exists."""
        trial_dir.mkdir(parents=True, exist_ok=True)
        for stale in (RESULT_FILE, STARTED_FILE, CLAIM_FILE):  # a directory left by a crash before add_trial
            (trial_dir / stale).unlink(missing_ok=True)
        (trial_dir / DIFF_FILE).write_text(patch.diff or "")
        TrialSpec(
            trial_id=trial_id,
            trial_dir=str(trial_dir),
            env=cast(dict[str, Any], OmegaConf.to_container(self.cfg.env, resolve=True))
            | {"dir": str(self.env.dir), "data_dir": str(self.env.data_dir)},
            seed=seed,
            keep_workspace=self.cfg.keep_workspaces,
            isolate_pids=self.cfg.isolate_pids,
            sandbox=self.cfg.sandbox,
            provenance={
                "idea_id": idea_id, "env": self.env.name, "baseline_hash": self.ledger.get_meta("baseline_hash"),
                "eval_data_hash": self.ledger.get_meta("eval_data_hash"),
                "diff_sha256": hashlib.sha256((patch.diff or "").encode()).hexdigest(),
                "ideator": self.ideator_llm.label, "implementer": self.implementer_llm.label,
                "seed": seed, "run_dir": str(self.run_dir), "config_sha256": self.config_hash,
                "gpus_per_trial": self.shape.gpus,
            },
        ).write()  # fmt: skip

    def create_baseline_repeats(self, epoch: int) -> None:
        """The epoch's runs of the unmodified baseline on further seeds (noise.baseline_repeats)."""
        if not self.cfg.run_baseline:
            return
        for trial_id, seed in noise.repeats_for(self.cfg.noise, self.cfg.seed, epoch):
            self.create_extra_trial(BASELINE_ID, epoch, trial_id, noise.REPEAT, seed)

    def create_extra_trial(self, idea_id: str, epoch: int, trial_id: str, purpose: str, seed: int) -> None:
        """One more seed of an implemented idea (a baseline repeat, a confirmation), run like any
        trial; a trial that exists already is left as it is, so a resumed run creates each once."""
        patch = self.ledger.patch_for(idea_id)
        if patch is None or patch.status != "applied":
            raise HpcExecutorError(f"idea {idea_id} has no applied diff to run again")
        trial_dir = self.run_dir / "trials" / trial_id
        if self.ledger.trial_exists(trial_id) or self.gpu_budget.exhausted(self.ledger):
            return
        self._write_trial_dir(trial_dir, trial_id, idea_id, patch, seed)
        self.ledger.add_trial(trial_id, idea_id, epoch, str(trial_dir), purpose=purpose, seed=seed)

    def execute(self, epoch: int) -> None:
        """Dispatch pending trials within capacity and poll until no trial is open.

        Two clocks: result files of open trials are looked for every ``result_poll_s`` (a stat per
        open trial, so a finished trial reaches the strategy within about that), while the
        scheduler is asked (one query for all jobs) every ``poll_interval_s``, backing off to
        ``poll_interval_max_s`` while nothing changes."""
        sched = self.cfg.scheduler
        query_interval, next_query = sched.poll_interval_s, 0.0
        while True:
            if self.ledger.get_meta(CANCELLED_META):
                raise RunCancelled(
                    f"run {self.run_dir} was cancelled: {self.ledger.get_meta(CANCELLED_META)}"
                )
            adopted = self._adopt_submissions()  # first: a result must not be ingested before its job
            changed = (adopted or 0) + self.ledger.poll()
            open_trials = self.ledger.open_trials()
            held = self.gpu_budget.exhausted(self.ledger)  # pending trials wait for a larger budget
            if not open_trials or (held and all(t.state == "pending" for t in open_trials)):
                self._show(epoch)
                return
            if time.monotonic() >= next_query:
                asked = self._check_jobs([t for t in open_trials if t.state != "pending"])
                query_interval = (
                    sched.poll_interval_s if asked else min(query_interval * 1.5, sched.poll_interval_max_s)
                )
                next_query = time.monotonic() + query_interval
                changed += asked
            if adopted is not None:  # else the scheduler cannot say what a killed driver submitted
                changed += self._dispatch(open_trials)
            if changed:  # the progress line and a prompt scheduler query only when something happened
                query_interval, next_query = (
                    sched.poll_interval_s,
                    min(next_query, time.monotonic() + query_interval),
                )
                self._show(epoch)
            self._publish_snapshot()  # a change the interval held back goes out once it is due
            time.sleep(sched.result_poll_s)

    def _dispatch(self, open_trials: list[Trial]) -> int:
        """Submit pending trials, as one array, as far as the scheduler's capacity allows. A trial
        settled by this poll's job check counts until the next poll: at worst one poll later."""
        pending = sorted(
            (t for t in open_trials if t.state == "pending"), key=lambda t: (t.epoch, t.trial_id)
        )
        capacity = self.scheduler.capacity(self.shape)
        room = len(pending) if capacity is None else max(0, capacity - (len(open_trials) - len(pending)))
        batch = [] if self.gpu_budget.exhausted(self.ledger) else pending[:room]
        if not batch:
            return 0
        # at most once: the intent is recorded first, and a driver killed after it is adopted from
        token = uuid.uuid4().hex[:12]
        self.ledger.intend_submission(token, [t.trial_id for t in batch])
        crash_point("before_submit")
        jobs = self.scheduler.submit([t.trial_dir for t in batch], self.shape, token=token)
        crash_point("after_submit")
        self.ledger.mark_submitted(
            ((t.trial_id, job, idx) for t, (job, idx) in zip(batch, jobs, strict=True)), token=token
        )
        crash_point("after_mark")
        return len(batch)

    def _adopt_submissions(self) -> int | None:
        """Submissions a killed driver had recorded as intended but not as made: adopt the jobs that
        reached the scheduler, or claimed their trial, instead of submitting them again; the other
        trials stay pending and go out anew. Returns how many were adopted, None while the scheduler
        cannot be asked (nothing is submitted meanwhile)."""
        intents = self.ledger.open_submissions()
        if not intents:
            return 0
        pending = {t.trial_id for t in self.ledger.open_trials() if t.state == "pending"}
        dirs = {
            token: [str(self.run_dir / "trials" / tid) for tid in tids]
            for token, (tids, _) in intents.items()
        }
        try:
            found = self.scheduler.find_submitted(dirs, since=min(since for _, since in intents.values()))
        except SchedulerQueryError as exc:
            log.warning("%s; trials a killed driver was submitting wait for the next poll", exc)
            return None
        adopted = 0
        for token, (tids, _) in intents.items():
            jobs = []
            for tid, tdir in zip(tids, dirs[token], strict=True):
                holder = claim_holder(Path(tdir))
                job = (holder, array_index(holder)) if holder else found.get(tdir)
                if tid in pending and job:
                    jobs.append((tid, *job))
            self.ledger.mark_submitted(jobs, token=token)
            if jobs:
                self.progress.note(f"adopted {len(jobs)} of {len(tids)} trials a killed driver had submitted "
                                   f"(jobs {', '.join(sorted({j for _, j, _ in jobs}))})")  # fmt: skip
            adopted += len(jobs)
        return adopted

    def _check_jobs(self, trials: list[Trial]) -> int:
        """Follow the jobs of submitted trials (one scheduler query): record their state, node and
        GPUs, and settle trials whose job ended, or vanished, without writing a result."""
        if not trials:
            return 0
        try:
            states = self.scheduler.states([_job_of(t) for t in trials])
        except SchedulerQueryError as exc:
            log.warning("%s; polling goes on", exc)
            return 0
        sched = self.cfg.scheduler
        changed = 0
        now = time.monotonic()
        for t in trials:
            tid, tdir = t.trial_id, Path(t.trial_dir)
            holder = claim_holder(tdir)
            if holder and holder != t.job_id:  # two launches raced for the trial: follow the one running it
                self.ledger.set_trial_state(tid, t.state, note=f"job {holder} claimed the trial, not {t.job_id}",
                                            job_id=holder, array_index=array_index(holder))  # fmt: skip
                changed += 1
                continue
            state = states.get(_job_of(t), JobState.UNKNOWN)
            changed += self._follow(t, state)
            if (not state.finished and state is not JobState.UNKNOWN) or (tdir / RESULT_FILE).exists():
                self._waiting_since.pop(tid, None)
                continue  # alive, or done and the next poll ingests its result
            # a preempted or node-failed job is usually requeued by Slurm itself: give it the time
            # to come back (its state then turns pending and this clock restarts) before acting
            grace = sched.vanished_grace_s if state in MAY_COME_BACK else sched.result_grace_s
            if now - self._waiting_since.setdefault(tid, now) >= grace:
                del self._waiting_since[tid]
                self._settle(t, state)
                changed += 1
        return changed

    def _follow(self, trial: Trial, state: JobState) -> int:
        """Keep the trial's state, job state, node and GPUs in the ledger current."""
        fields: dict[str, Any] = {}
        new_state = trial.state
        started = Path(trial.trial_dir) / STARTED_FILE
        if trial.state == "queued" and state is not JobState.PENDING and started.exists():
            where = json.loads(started.read_text())
            new_state = "running"
            fields = {"node": where.get("host"), "gpus": where.get("cuda_visible_devices"),
                      "started_at": where.get("started_at")}  # fmt: skip
        elif trial.state == "running" and state is JobState.PENDING:
            new_state = "queued"  # requeued or preempted: Slurm runs it again
            fields = {"started_at": None}  # its next start is read from its next started file
            started.unlink(missing_ok=True)
        if state.value != trial.job_state:
            fields["job_state"] = state.value
        if new_state == trial.state and not fields:
            return 0
        self.ledger.set_trial_state(trial.trial_id, new_state, **fields)
        return 1

    def _settle(self, trial: Trial, state: JobState) -> None:
        tid, job = trial.trial_id, _job_of(trial)
        if state in MAY_COME_BACK and trial.submissions < MAX_SUBMISSIONS:
            why = "vanished" if state is JobState.UNKNOWN else state.value
            self.progress.note(f"trial {tid}: job {job} {why} without a result; submitting it again")
            self.scheduler.cancel([job])  # should it come back after all, it must not run twice
            release_claim(Path(trial.trial_dir))  # the new job's to take
            self.ledger.set_trial_state(tid, "pending", note=f"job {job} {why}; resubmitted")
            return
        status = {JobState.CANCELLED: Status.CANCELLED, JobState.TIMEOUT: Status.TIMEOUT}.get(
            state, Status.CRASHED
        )
        reason = f"job {job} ended ({state.value}) without writing a result"
        job_log = self._job_log_tail(job) if job else ""
        if status is Status.CRASHED and mentions_full_disk(job_log):
            status = Status.DISK_FULL  # the worker's own files (its claim, its result) did not fit
            reason += ": the disk is full; it runs again when the run is resumed"
        log_path = Path(trial.trial_dir) / TRAIN_LOG
        self.ledger.record_results([Result(
            tid, status, log_path=str(log_path), log_tail=tail(log_path) or job_log, reason=reason,
        )])  # fmt: skip

    def _job_log_tail(self, job_id: str) -> str:
        log_path = self.scheduler.job_log(job_id)
        return tail(log_path) if log_path else ""

    def interrupted(self) -> None:
        """Ctrl-C: ask before cancelling what runs; without a terminal, leave it running."""
        running = [t for t in self.ledger.open_trials() if t.job_id]
        if not running:
            return
        answer = "n"
        if sys.stdin.isatty():
            answer = (
                input(f"\nCancel the {len(running)} trials still queued or running? [y/N] ").strip().lower()
            )
        if answer.startswith("y"):
            n = cancel_run(self.run_dir, reason="cancelled by the user (Ctrl-C)")
            log.info("cancelled %d trials; run the same command again to resume the search", n)
        else:
            log.info("left %d trials running; run the same command again to pick up their results, or cancel "
                     "them with: python -m hpc_executor.cancel %s", len(running), self.run_dir)  # fmt: skip

    # -- bookkeeping ---------------------------------------------------------------------------
    def _record_call(self, role: str, epoch: int, call: Call) -> None:
        r, q = call.response, call.request
        llm = self.ideator_llm if role == "ideator" else self.implementer_llm
        self.ledger.add_llm_call(
            call.call_id, role=role, purpose=q.purpose, provider=llm.spec.provider, model=r.model or llm.spec.model,
            epoch=epoch, input_tokens=r.input_tokens, output_tokens=r.output_tokens, cost_usd=r.cost_usd,
            latency_s=r.latency_s, attempts=r.attempts, error=r.error, prompt=q.user_text, response=r.text,
            outcome=call.outcome, cache_write_tokens=r.cache_write_tokens, cache_read_tokens=r.cache_read_tokens,
            cache_saved_usd=r.cache_saved_usd,
        )  # fmt: skip
        if r.error:
            log.warning("%s call %s failed after %d attempts: %s", role, call.call_id, r.attempts, r.error)
        if role == "implementer" and call.request.purpose == "revise":
            error = " | ".join(call.request.context["error"].splitlines())
            log.info("%s: asked for a revision after: %s", call.call_id, error[:300])

    def _show(self, epoch: int) -> None:
        if epoch == 0:  # the measured baseline replaces the recorded one as soon as it is in
            self.progress.baseline = self.baseline_reward()
        self.progress.epoch_line(epoch, **self.ledger.epoch_progress(epoch))
        self._unpublished = True  # something changed: the snapshot is renewed once it is due
        self._publish_snapshot()

    def _publish_snapshot(self, force: bool = False) -> None:
        """Renew the snapshot readers on other hosts read, after a change, at most every
        ``snapshot_interval_s``; a failure to write it is logged and the run goes on."""
        if not force and not (self._unpublished and time.monotonic() >= self._snapshot_due):
            return
        self._snapshot_due, self._unpublished = time.monotonic() + self.cfg.snapshot_interval_s, False
        try:
            self.ledger.publish_snapshot()
        except (sqlite3.Error, OSError) as exc:
            log.warning(
                "could not publish the ledger's snapshot for other hosts (%s); it stays as it was", exc
            )


def _job_of(trial: Trial) -> str:
    """The job id of a trial past pending (the ledger records it with the submission)."""
    assert trial.job_id is not None, f"trial {trial.trial_id} is {trial.state} but has no job id"
    return trial.job_id


def slot_idea_id(epoch: int, slot: Slot) -> str:
    """The id of the idea that fills a slot: one per slot, so a resumed run never asks for it twice."""
    return f"e{epoch}-{slot.index:03d}"


def search_for_run(run_dir: Path, overrides: dict[str, Any]) -> Search:
    """The driver of an existing run, from the config its ledger recorded, with ``overrides``
    (dotted keys): for commands that go on with a finished run (confirmation)."""
    from hpc_executor.config import SearchConfig

    try:
        ledger = Ledger(run_dir)
    except HpcExecutorError as exc:
        raise PreflightError(str(exc)) from None
    recorded = ledger.get_meta("config")
    ledger.close()
    if recorded is None:
        raise PreflightError(f"{run_dir} has no recorded config: it never started; run the search first")
    cfg = OmegaConf.merge(OmegaConf.structured(SearchConfig), OmegaConf.create(recorded))
    cfg.scheduler = recorded_config(cfg.scheduler)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    assert isinstance(cfg, DictConfig)
    return Search(cfg, run_dir)


def trial_shape(cfg: DictConfig) -> Shape:
    res = cfg.env.resources
    # the worker's own limits plus a minute to copy workspaces and write the result
    return Shape(res.gpus, res.cpus, res.mem_gb, cfg.env.hard_limit_s + cfg.env.eval_limit_s + 60)


def dry_run(cfg: DictConfig, run_dir: Path) -> str:
    """What an epoch of this run would submit, without submitting (or calling any model)."""
    scheduler = make_scheduler(cfg.scheduler, run_dir / "submitit")
    return scheduler.dry_run(trial_shape(cfg), cfg.strategy.batch_size)


def preflight(cfg: DictConfig, env: Environment) -> None:
    """Everything missing, at once, before any work starts."""
    problems = env.problems() + bound_problems(cfg)
    if (bad_name := run_name_problem(cfg.run_name)) is not None:
        problems.append(bad_name)
    needed: dict[str, list[str]] = {}
    for role in ("ideator", "implementer"):
        spec = spec_from_config(cfg.model[role])
        for var in required_env_vars(spec):
            needed.setdefault(var, []).append(f"{role} {spec.provider}:{spec.model}")
    if cfg.strategy.name == "rl":
        for var in policy_env_vars(cfg.model.get("policy")):
            needed.setdefault(var, []).append(
                f"RL policy {cfg.model.policy.get('backend')}:{cfg.model.policy.get('model')}"
            )
    for var, users in needed.items():
        if not os.environ.get(var):
            problems.append(f"{var} is not set (needed by the {' and the '.join(users)}); export it, "
                            "or try the pipeline with +model=offline")  # fmt: skip
    for role in ROLES:
        if cfg.model[role].serve.enabled and cfg.model[role].provider != "openai_compatible":
            problems.append(f"model.{role}.serve.enabled is true but its provider is {cfg.model[role].provider}: "
                            f"only provider openai_compatible can be served (e.g. model.{role}=qwen3_vllm)")  # fmt: skip
    if cfg.scheduler.name == "slurm" and not shutil.which("sbatch"):
        problems.append(
            "scheduler=slurm but sbatch is not on PATH; run on a Slurm login node or use scheduler=local"
        )
    try:
        resolve_sandbox(cfg.sandbox, cfg.isolate_pids)
    except SandboxUnavailable as exc:
        problems.append(str(exc))
    if cfg.strategy.name == "rl":
        problems += rl_settings.problems(cfg)
    if problems:
        raise PreflightError("cannot start:\n  - " + "\n  - ".join(problems))


# -- command line --------------------------------------------------------------------------------
def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def missing_groups(argv: list[str]) -> list[str]:
    """Groups the user must append (``+env=...``, ``+model=...``) that the command line lacks."""
    if any(
        a in ("-h", "--help", "--hydra-help", "--info", "-c", "--cfg", "--shell-completion") for a in argv
    ):
        return []
    return [g for g in ("env", "model") if not any(re.match(rf"^\+{{0,2}}{g}=", a) for a in argv)]


def role_shorthand(argv: list[str]) -> list[str]:
    """``model.ideator=NAME`` (or ``model.implementer=``) picks a role's model from conf/llm/; Hydra
    spells that ``llm@model.ideator=NAME``. Comma lists (sweeps) are rewritten alike; anything else,
    such as ``model.ideator.max_tokens=4000``, is left to Hydra."""
    names = set(choices("llm"))
    rewritten = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in ("model.ideator", "model.implementer") and set(value.split(",")) <= names:
            arg = f"llm@{key}={value}"
        rewritten.append(arg)
    return rewritten


def usage_message(missing: list[str]) -> str:
    lines = [f"hpc-executor: missing {' and '.join('+' + g for g in missing)}. A search needs an "
             "environment and a model, appended with '+':",
             "    python -m hpc_executor.search +env=tiny +model=offline",
             "Choices:"]  # fmt: skip
    for group in ("env", "model", "strategy", "scheduler"):
        prefix = "+" if group in ("env", "model") else ""
        lines.append(f"    {prefix}{group}=  {', '.join(choices(group))}")
    lines.append(f"    model.ideator= / model.implementer=  {', '.join(choices('llm'))}  (one role's model)")
    lines.append("'+model=offline' is a scripted stand-in (not an LLM) that needs no API key.")
    return "\n".join(lines)


@hydra.main(config_path="../conf", config_name="search", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # a line per LLM request drowns the progress lines
    # a full disk refuses the log file: no logging traceback may bury the message that says so
    logging.raiseExceptions = False
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        missing = [g for g in ("env", "model") if OmegaConf.is_missing(cfg, g)]
        if missing:
            raise PreflightError(usage_message(missing))
        if cfg.dry_run:
            print(dry_run(cfg, run_dir))
            _remove_if_untouched(run_dir)
            return
        search = Search(cfg, run_dir)
        if cfg.check_only:
            print(search.plan())
            _remove_if_untouched(run_dir)
            return
        search.run()
    except HpcExecutorError as exc:
        if run_name_problem(cfg.run_name) is None:  # a bad name may point anywhere: remove nothing there
            _remove_if_untouched(run_dir)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except (sqlite3.OperationalError, OSError) as exc:
        problem = storage_problem(exc)
        if problem is None:
            raise
        print(f"error: {storage_message(run_dir, problem)}", file=sys.stderr)
        sys.exit(2)


def _remove_if_untouched(run_dir: Path) -> None:
    """A run that stopped before its ledger existed leaves no directory behind."""
    if run_dir.is_dir() and not (run_dir / "ledger.sqlite").exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        with contextlib.suppress(OSError):  # outputs/ itself, if this run was its only content
            run_dir.parent.rmdir()


def main() -> None:
    register_configs()
    sys.argv[1:] = role_shorthand(sys.argv[1:])
    missing = missing_groups(sys.argv[1:])
    if missing:
        print(usage_message(missing), file=sys.stderr)
        sys.exit(2)
    # Hydra makes outputs/<run_name> and reads the search path before any code of ours runs.
    if problems := command_line_problems([a for a in sys.argv[1:] if not a.startswith("-")]):
        print("error: cannot start:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        sys.exit(2)
    unwritable = run_dir_problem(sys.argv[1:])
    if unwritable:
        print(f"error: {unwritable}", file=sys.stderr)
        sys.exit(2)
    _hydra_main()


def run_dir_problem(argv: list[str]) -> str | None:
    """Why the run directory cannot be written (a full or read-only disk), asked before Hydra writes
    its config and log there, which would fail with a traceback; None when it can, or for what this
    check cannot tell (a sweep, --help, overrides Hydra itself will reject)."""
    if any(a.startswith("-") for a in argv):
        return None
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            run_dir = Path(compose("search", overrides=argv, return_hydra_config=True).hydra.run.dir)
    except Exception:  # Hydra reports a bad command line itself, properly
        return None
    try:
        check_writable(run_dir)
    except OSError as exc:
        problem = storage_problem(exc)
        if problem is None:
            raise
        return storage_message(run_dir, problem)
    return None


if __name__ == "__main__":
    main()
