"""The search driver: ``python -m hpc_executor.search +env=tiny +model=offline`` (see ``cli``).

Per epoch: ask the ideator for the epoch's empty idea slots, implement every idea that has no
patch yet, create a trial for every patch that has none, and let the dispatcher run them until none
is open. Every step is recorded before the next starts, so running the same command again continues
where a killed driver stopped: nothing is asked, implemented or run twice.
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any, cast

from omegaconf import DictConfig, OmegaConf

from hpc_executor import confirm, diversity, gpu_hours, ids, noise, report
from hpc_executor.budget import CostMeter
from hpc_executor.cancel import CANCELLED_META
from hpc_executor.cli import main, preflight, trial_shape
from hpc_executor.dispatcher import Dispatcher
from hpc_executor.environment import Environment
from hpc_executor.errors import HpcExecutorError, PreflightError
from hpc_executor.gpu_hours import GpuBudget
from hpc_executor.ideation import Ideation
from hpc_executor.ideator import Ideator
from hpc_executor.implementer import Call, Implementer
from hpc_executor.ledger import Ledger
from hpc_executor.llm import LLM, make_llm, spec_from_config
from hpc_executor.progress import Progress
from hpc_executor.sandbox import drop_secrets_from_environ, resolve_sandbox
from hpc_executor.scheduling import make_scheduler, recorded_config
from hpc_executor.servers import ROLES, Servers
from hpc_executor.steady import SteadyLoop
from hpc_executor.strategies import make_strategy
from hpc_executor.trial_dir import TrialSpec
from hpc_executor.types import CallPurpose, Idea, Patch, PatchStatus

log = logging.getLogger("hpc_executor.search")

NOT_STARTED_URL = "http://model-server-not-started.invalid/v1"


class Search:
    """The wiring of a run (models, ideation, implementer, dispatcher, servers) and its loop."""

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
        self.strategy = make_strategy(cfg.strategy, cfg.seed)
        self.scheduler = make_scheduler(cfg.scheduler, run_dir / "submitit")
        self.servers = Servers(cfg.model, self.scheduler, run_dir, self._llm)
        self.ideator = Ideator(self.ideator_llm, self.env, cfg.model.ideator.thinking_budget,
                               cfg.model.ideator.thinking_budget_search)  # fmt: skip
        self.meter = CostMeter(cfg.budget_usd)  # the spend of earlier sessions is added in open()
        self.budget_noted = False
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
        self._snapshot_due, self._unpublished = 0.0, False  # when the ledger's snapshot may next be renewed

    # -- set-up --------------------------------------------------------------------------------
    def _make_llm(self, role: str) -> LLM:
        spec = spec_from_config(self.cfg.model[role])
        if self.cfg.model[role].serve.enabled:
            spec.base_url = NOT_STARTED_URL  # until start_servers() points the client at the server
        return make_llm(spec)

    def _llm(self, role: str) -> LLM:
        return self.ideator_llm if role == "ideator" else self.implementer_llm

    def open(self) -> None:
        """Prepare the data, and open (or create) the run's ledger, checking it is this run's."""
        self.env.prepare()
        self.ledger = Ledger(self.run_dir, create=True)
        self._check_same_run()
        self.meter.add(self.ledger.spent_usd())
        self.ledger.set_meta(CANCELLED_META, None)  # running a cancelled run again resumes it
        self.progress = Progress(self.cfg.strategy.epochs, self.baseline_reward())
        self.dispatcher = Dispatcher(
            self.ledger, self.scheduler, self.shape, self.run_dir, self.cfg.scheduler, self._trial_spec,
            hold=lambda: self.gpu_budget.exhausted(self.ledger), note=self.progress.note,
        )  # fmt: skip
        self.ideation = Ideation(
            self.ledger, self.ideator, self.strategy, self.meter, self.novelty, seed=self.cfg.seed,
            baseline_bar=lambda: self.baseline_noise().bar, record_call=self._record_call,
            note=self.progress.note, budget_note=self.budget_note,
        )  # fmt: skip
        if n := self.dispatcher.retry_disk_full():
            self.progress.note(f"{n} trials that stopped on a full disk run again")

    def start_servers(self) -> None:
        self.servers.start(self.ledger)

    def stop_servers(self, *, between_epochs: bool = False) -> None:
        self.servers.stop(self.ledger, keep_alive=between_epochs)

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
            self.ledger.add_idea(Idea(ids.BASELINE_IDEA, 0, "Unmodified baseline", "The baseline as shipped.",
                                      kind="baseline"), slot=-1)  # fmt: skip
            self.ledger.add_patch(Patch(ids.BASELINE_IDEA, "", PatchStatus.APPLIED))
        try:
            steady = self.cfg.strategy.schedule == "steady"
            if SteadyLoop(self).run() if steady else self._barrier_loop():  # complete: confirm its winners
                self.confirm()
        except BaseException:
            self._publish_snapshot(force=True)  # what a stopped or failed run recorded, for readers elsewhere
            raise
        finally:
            self.stop_servers()
        self.finish()

    def _barrier_loop(self) -> bool:
        """Epoch by epoch, each waiting for the last trial of the one before; False when a budget
        stopped the search early."""
        s = self.cfg.strategy
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
            if self._budget_stop(f"after epoch {epoch + 1} of {s.epochs}", more=epoch + 1 < s.epochs):
                return False
        return True

    def _budget_stop(self, when: str, more: bool) -> bool:
        """Whether a budget stops the search now (and the note that says so); ``more``: work other
        than the confirmation is left, which only the LLM budget can stop."""
        if more and self.meter.exhausted():
            self.progress.note(f"stopping {when}: the LLM budget is spent ({self.meter.describe()}); "
                               "raise budget_usd to go on")  # fmt: skip
            return True
        if self.gpu_budget.exhausted(self.ledger):
            self.progress.note(f"stopping {when}: the GPU budget is spent "
                               f"({self.gpu_budget.describe(self.ledger)}); raise budget_gpu_hours to go on")  # fmt: skip
            return True
        return False

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
        """Fill the epoch's empty idea slots (see ``Ideation.round``)."""
        self.ideation.round(epoch)
        self._show(epoch)

    def implement(self, epoch: int) -> None:
        todo = [i for i in self.ledger.ideas(epoch) if self.ledger.patch_for(i.idea_id) is None]
        if not todo:
            return
        unimplemented = []
        for idea, patch, calls in self.implementer.implement_all(todo):
            if patch is None:
                unimplemented.append(idea.idea_id)
                continue
            self.record_patch(epoch, patch, calls)
            self._show(epoch)
        if unimplemented:
            self.budget_note(f"epoch {epoch + 1}: {len(unimplemented)} ideas left unimplemented")

    def record_patch(self, epoch: int, patch: Patch, calls: list[Call]) -> None:
        with self.ledger.transaction():  # the calls and their patch land together, or not at all
            for c in calls:
                self._record_call("implementer", epoch, c, patch.idea_id)
            self.ledger.add_patch(patch)

    def budget_note(self, what: str) -> None:
        if not self.budget_noted:
            self.budget_noted = True
            self.progress.note(f"LLM budget reached ({self.meter.describe()}): no new calls; {what}. Trials "
                               "already created run to the end. Raise budget_usd and run the same command "
                               "to go on.")  # fmt: skip

    def create_trials(self, epoch: int) -> None:
        """A trial for every idea of the epoch that has a patch and no trial yet."""
        if self.gpu_budget.exhausted(self.ledger):  # the ideas stay without trials until the budget is raised
            return
        for idea in self.ledger.ideas(epoch):
            patch = self.ledger.patch_for(idea.idea_id)
            if patch is not None and not self.ledger.has_trial(idea.idea_id):
                self.dispatcher.create(
                    ids.search_trial_id(idea.idea_id), idea.idea_id, epoch, patch, self.cfg.seed
                )

    def create_baseline_repeats(self, epoch: int) -> None:
        """The epoch's runs of the unmodified baseline on further seeds (noise.baseline_repeats)."""
        if not self.cfg.run_baseline:
            return
        for trial_id, seed in noise.repeats_for(self.cfg.noise, self.cfg.seed, epoch):
            self.create_extra_trial(ids.BASELINE_IDEA, epoch, trial_id, noise.REPEAT, seed)

    def create_extra_trial(self, idea_id: str, epoch: int, trial_id: str, purpose: str, seed: int) -> None:
        """One more seed of an implemented idea (a baseline repeat, a confirmation), run like any
        trial; a trial that exists already is left as it is, so a resumed run creates each once."""
        patch = self.ledger.patch_for(idea_id)
        if patch is None or patch.status != PatchStatus.APPLIED:
            raise HpcExecutorError(f"idea {idea_id} has no applied diff to run again")
        if not self.gpu_budget.exhausted(self.ledger):
            self.dispatcher.create(trial_id, idea_id, epoch, patch, seed, purpose=purpose)

    def _trial_spec(self, trial_id: str, trial_dir: Path, idea_id: str, patch: Patch, seed: int) -> TrialSpec:
        """What the worker needs to run a trial, with the provenance its result carries."""
        return TrialSpec(
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
        )  # fmt: skip

    def execute(self, epoch: int) -> None:
        """Run the dispatcher until no trial of the run is open (or those left wait for a larger GPU
        budget); the progress line shows ``epoch``."""
        self.dispatcher.run_until_done(on_change=lambda: self._show(epoch), on_poll=self._publish_snapshot)

    # -- bookkeeping ---------------------------------------------------------------------------
    def _record_call(self, role: str, epoch: int, call: Call, idea_id: str | None) -> None:
        """One LLM call in the ledger; ``idea_id``: the idea an implementer call was for."""
        r, q = call.response, call.request
        llm = self._llm(role)
        self.ledger.add_llm_call(
            call.call_id, role=role, purpose=q.purpose, provider=llm.spec.provider, model=r.model or llm.spec.model,
            epoch=epoch, idea_id=idea_id, input_tokens=r.input_tokens, output_tokens=r.output_tokens,
            cost_usd=r.cost_usd, latency_s=r.latency_s, attempts=r.attempts, error=r.error, prompt=q.user_text,
            response=r.text, outcome=call.outcome, cache_write_tokens=r.cache_write_tokens,
            cache_read_tokens=r.cache_read_tokens, cache_saved_usd=r.cache_saved_usd,
        )  # fmt: skip
        if r.error:
            log.warning("%s call %s failed after %d attempts: %s", role, call.call_id, r.attempts, r.error)
        if role == "implementer" and q.purpose == CallPurpose.REVISE:
            error = " | ".join(q.context["error"].splitlines())
            log.info("%s: asked for a revision after: %s", call.call_id, error[:300])

    def _show(self, epoch: int) -> None:
        if epoch == 0:  # the measured baseline replaces the recorded one as soon as it is in
            self.progress.baseline = self.baseline_reward()
        self.progress.epoch_line(epoch, **self.ledger.epoch_progress(epoch))
        self.snapshot_after(1)

    def snapshot_after(self, changes: int) -> None:
        """After ``changes`` (0: none), the snapshot is renewed once it is due."""
        self._unpublished = self._unpublished or changes > 0
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


if __name__ == "__main__":
    main()
