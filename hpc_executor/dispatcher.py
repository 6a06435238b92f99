"""The trial dispatcher: patches in, results out.

It creates a trial for a patch (its directory, then its ledger row), submits pending trials as far
as the scheduler's capacity allows (the intent recorded first, so that a killed driver's
submission is adopted instead of made twice), follows the jobs' states, settles jobs that ended,
vanished or were preempted without a result, and ingests the results. It knows trials, jobs and
the ledger; of the search it knows only a trial's label (the epoch it is analysed under).

Two clocks drive it: result files of open trials are looked for at every ``poll`` (a stat per open
trial), while the scheduler is asked (one query for all jobs) every ``poll_interval_s``, backing off
to ``poll_interval_max_s`` while nothing changes. ``poll`` is one step; ``run_until_done`` polls
until no trial is open, for the barrier loop; a steady loop polls itself between its other work.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from hpc_executor import trial_dir
from hpc_executor.cancel import CANCELLED_META
from hpc_executor.claim import claim_holder, release_claim
from hpc_executor.crashpoints import crash_point
from hpc_executor.errors import RunCancelled
from hpc_executor.ledger import Ledger
from hpc_executor.sandbox import tail
from hpc_executor.scheduling import JobState, Scheduler, SchedulerQueryError, Shape
from hpc_executor.storage import mentions_full_disk
from hpc_executor.types import Patch, PatchStatus, Result, Status, Trial, TrialState, array_index

log = logging.getLogger(__name__)

MAX_SUBMISSIONS = 2  # a trial whose job vanished or was preempted runs again, once
MAY_COME_BACK = (JobState.PREEMPTED, JobState.NODE_FAIL, JobState.UNKNOWN)
# how a job that ended without a result is recorded; every other end state is a crash
_ENDED_AS = {JobState.CANCELLED: Status.CANCELLED, JobState.TIMEOUT: Status.TIMEOUT}

SpecMaker = Callable[[str, Path, str, Patch, int], trial_dir.TrialSpec]
"""(trial id, trial directory, idea id, patch, seed) -> the spec the worker runs."""


class Dispatcher:
    """Creates, submits, follows and settles the trials of one run.

    ``timing`` is the scheduler config (``result_poll_s``, ``poll_interval_s``,
    ``poll_interval_max_s``, ``result_grace_s``, ``vanished_grace_s``); ``hold`` says whether new
    submissions wait (the GPU budget is spent); ``note`` tells the user something happened;
    ``clock`` and ``sleep`` are the monotonic time and the wait between polls (tests own them)."""

    def __init__(
        self,
        ledger: Ledger,
        scheduler: Scheduler,
        shape: Shape,
        run_dir: Path,
        timing: DictConfig,
        make_spec: SpecMaker,
        *,
        hold: Callable[[], bool] = lambda: False,
        note: Callable[[str], None] = log.info,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.ledger = ledger
        self.scheduler = scheduler
        self.shape = shape
        self.run_dir = run_dir
        self.timing = timing
        self.make_spec = make_spec
        self.hold = hold
        self.note = note
        self.clock = clock
        self.sleep = sleep
        self._waiting_since: dict[str, float] = {}  # trial -> when its job was first seen ended
        self._query_interval = float(timing.poll_interval_s)
        self._next_query = 0.0
        self._open: list[Trial] = []  # as the last poll left them

    # -- creating trials -----------------------------------------------------------------------
    def trial_dir(self, trial_id: str) -> Path:
        return self.run_dir / "trials" / trial_id

    def create(
        self, trial_id: str, idea_id: str, label: int, patch: Patch, seed: int, purpose: str | None = None
    ) -> bool:
        """A trial of ``patch`` under ``label``, pending; a patch that did not apply gets its result at
        once. A trial that exists already is left as it is (a resumed run creates each once); returns
        whether it was created."""
        if self.ledger.trial_exists(trial_id):
            return False
        tdir = self.trial_dir(trial_id)
        if patch.status != PatchStatus.APPLIED:
            self.ledger.add_trial(trial_id, idea_id, label, str(tdir), purpose=purpose, seed=seed)
            self.ledger.record_results([Result(trial_id, Status(patch.status), reason=patch.reason)])
            return True
        trial_dir.write_trial(self.make_spec(trial_id, tdir, idea_id, patch, seed), patch.diff or "")
        self.ledger.add_trial(trial_id, idea_id, label, str(tdir), purpose=purpose, seed=seed)
        return True

    # -- what is in flight ---------------------------------------------------------------------
    def open_trials(self) -> list[Trial]:
        """The open trials as the last poll saw them."""
        return list(self._open)

    def count(self, *states: TrialState) -> int:
        """How many open trials are in these states (all open ones when none are named)."""
        return sum(1 for t in self._open if not states or t.state in states)

    def free_slots(self, limit: int | None = None) -> int | None:
        """How many more trials could be in flight now: the scheduler's capacity (or ``limit``, the
        smaller of the two) minus the open trials; None when neither caps it."""
        capacity = self.scheduler.capacity(self.shape)
        caps = [c for c in (capacity, limit) if c is not None]
        return max(0, min(caps) - len(self._open)) if caps else None

    def done(self) -> bool:
        """No trial is open, or those left wait for a larger GPU budget."""
        return not self._open or (self.hold() and all(t.state == TrialState.PENDING for t in self._open))

    # -- the loop ------------------------------------------------------------------------------
    def run_until_done(
        self, on_change: Callable[[], None] | None = None, on_poll: Callable[[], None] | None = None
    ) -> None:
        """Poll until ``done``: ``on_change`` after a poll that changed something and once at the
        end, ``on_poll`` after every poll. Raises RunCancelled when the run is cancelled."""
        while True:
            changed = self.poll()
            if self.done():
                if on_change:
                    on_change()
                return
            if changed and on_change:
                on_change()
            if on_poll:
                on_poll()
            self.sleep(float(self.timing.result_poll_s))

    def poll(self) -> int:
        """One step: adopt a killed driver's submissions, ingest results, ask the scheduler when its
        clock says so, submit within capacity. Returns how many trials changed."""
        if reason := self.ledger.get_meta(CANCELLED_META):
            raise RunCancelled(f"run {self.run_dir} was cancelled: {reason}")
        adopted = self._adopt_submissions()  # first: a result must not be ingested before its job
        changed = (adopted or 0) + self.ledger.poll()
        self._open = self.ledger.open_trials()
        if self.done():
            return changed
        now = self.clock()
        if now >= self._next_query:
            asked = self._check_jobs([t for t in self._open if t.state != TrialState.PENDING])
            t = self.timing
            self._query_interval = (
                float(t.poll_interval_s) if asked else min(self._query_interval * 1.5, t.poll_interval_max_s)
            )
            self._next_query = now + self._query_interval
            changed += asked
        if adopted is not None:  # else the scheduler cannot say what a killed driver submitted
            changed += self._dispatch()
        if changed:  # a prompt scheduler query after something happened
            self._query_interval = float(self.timing.poll_interval_s)
            self._next_query = min(self._next_query, self.clock() + self._query_interval)
            self._open = self.ledger.open_trials()
        return changed

    def _dispatch(self) -> int:
        """Submit pending trials, as one array, as far as the scheduler's capacity allows. A trial
        settled by this poll's job check counts until the next poll: at worst one poll later."""
        pending = sorted(
            (t for t in self._open if t.state == TrialState.PENDING), key=lambda t: (t.epoch, t.trial_id)
        )
        capacity = self.scheduler.capacity(self.shape)
        room = len(pending) if capacity is None else max(0, capacity - (len(self._open) - len(pending)))
        batch = pending[:room] if pending and not self.hold() else []
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
        pending = {t.trial_id for t in self.ledger.open_trials() if t.state == TrialState.PENDING}
        dirs = {token: [str(self.trial_dir(tid)) for tid in tids] for token, (tids, _) in intents.items()}
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
                self.note(f"adopted {len(jobs)} of {len(tids)} trials a killed driver had submitted "
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
        changed = 0
        now = self.clock()
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
            if (not state.finished and state is not JobState.UNKNOWN) or trial_dir.has_result(tdir):
                self._waiting_since.pop(tid, None)
                continue  # alive, or done and the next poll ingests its result
            # a preempted or node-failed job is usually requeued by Slurm itself: give it the time
            # to come back (its state then turns pending and this clock restarts) before acting
            grace = self.timing.vanished_grace_s if state in MAY_COME_BACK else self.timing.result_grace_s
            if now - self._waiting_since.setdefault(tid, now) >= grace:
                del self._waiting_since[tid]
                self._settle(t, state)
                changed += 1
        return changed

    def _follow(self, trial: Trial, state: JobState) -> int:
        """Keep the trial's state, job state, node and GPUs in the ledger current."""
        fields: dict[str, Any] = {}
        new_state = trial.state
        tdir = Path(trial.trial_dir)
        where = trial_dir.started_where(tdir) if trial.state == TrialState.QUEUED else None
        if where is not None and state is not JobState.PENDING:
            new_state = TrialState.RUNNING
            fields = {"node": where.get("host"), "gpus": where.get("cuda_visible_devices"),
                      "started_at": where.get("started_at")}  # fmt: skip
        elif trial.state == TrialState.RUNNING and state is JobState.PENDING:
            new_state = TrialState.QUEUED  # requeued or preempted: Slurm runs it again
            trial_dir.forget_start(tdir)
            fields = {"started_at": None}  # its next start is read from its next started file
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
            self.note(f"trial {tid}: job {job} {why} without a result; submitting it again")
            self.scheduler.cancel([job])  # should it come back after all, it must not run twice
            release_claim(Path(trial.trial_dir))  # the new job's to take
            self.ledger.set_trial_state(tid, TrialState.PENDING, note=f"job {job} {why}; resubmitted")
            return
        status = _ENDED_AS.get(state, Status.CRASHED)
        reason = f"job {job} ended ({state.value}) without writing a result"
        job_log = self._job_log_tail(job)
        if status is Status.CRASHED and mentions_full_disk(job_log):
            status = Status.DISK_FULL  # the worker's own files (its claim, its result) did not fit
            reason += ": the disk is full; it runs again when the run is resumed"
        log_path = trial_dir.train_log(Path(trial.trial_dir))
        self.ledger.record_results([Result(
            tid, status, log_path=str(log_path), log_tail=tail(log_path) or job_log, reason=reason,
        )])  # fmt: skip

    def _job_log_tail(self, job_id: str) -> str:
        log_path = self.scheduler.job_log(job_id)
        return tail(log_path) if log_path else ""

    def retry_disk_full(self) -> int:
        """Trials that stopped on a full disk were not their idea's fault: they run again. Their files
        go first, so that a driver killed in between finds the same trials to reopen. Returns how many."""
        trials = self.ledger.ended_with(Status.DISK_FULL.value)
        for trial in trials:
            trial_dir.clear_outcome(Path(trial.trial_dir))
        self.ledger.reopen_trials([t.trial_id for t in trials], note="the disk was full; run again")
        return len(trials)


def _job_of(trial: Trial) -> str:
    """The job id of a trial past pending (the ledger records it with the submission)."""
    assert trial.job_id is not None, f"trial {trial.trial_id} is {trial.state} but has no job id"
    return trial.job_id
