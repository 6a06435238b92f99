"""The trial dispatcher's rules against an in-memory scheduler and a clock the test owns: capacity,
at-most-once adoption after a crash in each window of a submission, vanished and preempted jobs
(resubmitted once), requeues, following the job that claimed a trial, the mapping of jobs that ended
without a result, a full disk, holds and cancellation. Each test runs in milliseconds."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path

import pytest
from fakes.memory_scheduler import FakeClock, MemoryScheduler
from omegaconf import OmegaConf

from hpc_executor import dispatcher as dispatcher_module
from hpc_executor import trial_dir
from hpc_executor.cancel import CANCELLED_META
from hpc_executor.claim import claim_holder, claim_trial
from hpc_executor.dispatcher import Dispatcher
from hpc_executor.errors import RunCancelled
from hpc_executor.ledger import Ledger
from hpc_executor.scheduling import JobState, Shape
from hpc_executor.types import Idea, Patch, PatchStatus, Status, TrialState

TIMING = {"result_poll_s": 0.5, "poll_interval_s": 1.0, "poll_interval_max_s": 4.0, "result_grace_s": 2.0,
          "vanished_grace_s": 10.0}  # fmt: skip
SLACK = (
    TIMING["poll_interval_max_s"] + 1
)  # a grace is counted from the scheduler query that first sees the end
SHAPE = Shape(gpus=1, cpus=1, mem_gb=1, time_limit_s=60)


class Killed(Exception):
    """The driver died at a crash point."""


@pytest.fixture
def world(tmp_path: Path):
    return World(tmp_path)


class World:
    """A run directory with a ledger, the fake scheduler and clock, and a dispatcher over them."""

    def __init__(self, tmp_path: Path, capacity: int | None = None) -> None:
        self.run_dir = tmp_path / "run"
        self.ledger = Ledger(self.run_dir, create=True)
        self.clock = FakeClock()
        self.scheduler = MemoryScheduler(self.run_dir / "submitit", capacity)
        self.held = False
        self.notes: list[str] = []
        self.dispatcher = self.new_dispatcher()

    def new_dispatcher(self) -> Dispatcher:
        """A fresh driver's dispatcher: what it knows comes from the ledger alone."""
        return Dispatcher(
            self.ledger, self.scheduler, SHAPE, self.run_dir, OmegaConf.create(TIMING),
            lambda tid, tdir, idea_id, patch, seed: trial_dir.TrialSpec(tid, str(tdir), {}, seed),
            hold=lambda: self.held, note=self.notes.append, clock=self.clock, sleep=self.clock.sleep,
        )  # fmt: skip

    def add(self, n: int, status: str = PatchStatus.APPLIED) -> list[str]:
        ids = []
        for i in range(n):
            idea_id = f"e0-{i:03d}"
            self.ledger.add_idea(Idea(idea_id, 0, f"idea {i}", "..."), slot=i)
            patch = Patch(idea_id, "" if status == PatchStatus.APPLIED else None, status, reason="no")
            assert self.dispatcher.create(f"{idea_id}-t0", idea_id, 0, patch, seed=0)
            ids.append(f"{idea_id}-t0")
        return ids

    def started(self) -> tuple[str, str]:
        """One trial, submitted and started by its job: (trial id, job id)."""
        (tid,) = self.add(1)
        self.dispatcher.poll()
        job = self.scheduler.job_for(tid)
        self.scheduler.start(job)
        return tid, job

    def state(self, trial_id: str) -> str:
        (state,) = self.ledger.db.execute(
            "SELECT state FROM trials WHERE trial_id = ?", (trial_id,)
        ).fetchone()
        return state

    def status(self, trial_id: str) -> str | None:
        row = self.ledger.db.execute("SELECT status FROM results WHERE trial_id = ?", (trial_id,)).fetchone()
        return row[0] if row else None

    def row(self, trial_id: str):
        return self.ledger.db.execute("SELECT * FROM trials WHERE trial_id = ?", (trial_id,)).fetchone()

    def wait(self, seconds: float) -> None:
        """Let ``seconds`` pass, polling as the driver would."""
        end = self.clock.now + seconds
        while self.clock.now < end:
            self.dispatcher.poll()
            self.clock.sleep(TIMING["result_poll_s"])
        self.dispatcher.poll()


def test_a_created_trial_has_its_spec_and_diff_and_a_failed_patch_its_result(world: World) -> None:
    (ok,) = world.add(1)
    assert trial_dir.read_diff(world.run_dir / "trials" / ok) == ""
    assert trial_dir.TrialSpec.read(world.run_dir / "trials" / ok).trial_id == ok
    assert not world.dispatcher.create(ok, "e0-000", 0, Patch("e0-000", "", "applied"), seed=0), (
        "created once"
    )
    world.ledger.add_idea(Idea("e0-009", 0, "t", "d"), slot=9)
    assert world.dispatcher.create(
        "e0-009-t0", "e0-009", 0, Patch("e0-009", None, "patch_rejected", "bad"), 0
    )
    assert world.status("e0-009-t0") == Status.PATCH_REJECTED and world.state("e0-009-t0") == TrialState.DONE


def test_submissions_stay_within_capacity_and_a_slot_is_refilled_as_soon_as_a_trial_ends(
    tmp_path: Path,
) -> None:
    world = World(tmp_path, capacity=2)
    trials = world.add(5)
    world.dispatcher.poll()
    assert [len(s) for s in world.scheduler.submits] == [2]
    assert world.dispatcher.count(TrialState.QUEUED) == 2 and world.dispatcher.count(TrialState.PENDING) == 3
    assert world.dispatcher.free_slots() == 0 and world.dispatcher.free_slots(limit=10) == 0
    first = world.scheduler.job_for(trials[0])
    world.scheduler.start(first)
    world.scheduler.finish(first)
    world.dispatcher.poll()  # the result is ingested and the freed slot goes out in the same poll
    assert [len(s) for s in world.scheduler.submits] == [2, 1]
    assert world.status(trials[0]) == Status.OK and world.dispatcher.count() == 4


def test_run_until_done_keeps_every_slot_busy_until_the_last_trial(tmp_path: Path) -> None:
    world = World(tmp_path, capacity=3)
    trials = world.add(7)
    world.scheduler.durations = {t: d for t, d in zip(trials, [1, 5, 2, 2, 1, 3, 1], strict=True)}
    in_flight: list[tuple[int, int]] = []  # after each poll: (queued or running, open)
    d = world.dispatcher
    world.clock.on_sleep = world.scheduler.tick
    d.run_until_done(
        on_poll=lambda: in_flight.append((d.count(TrialState.QUEUED, TrialState.RUNNING), d.count()))
    )
    assert all(world.status(t) == Status.OK for t in trials)
    assert world.scheduler.max_running == 3, "never more than the capacity"
    assert sum(len(s) for s in world.scheduler.submits) == 7, "each trial submitted once"
    # the poll that ingests a result submits the next pending trial: no slot waits for a later poll
    assert in_flight and all(busy == min(3, left) for busy, left in in_flight), in_flight


def test_no_capacity_means_everything_goes_out_at_once(world: World) -> None:
    world.add(4)
    world.dispatcher.poll()
    assert [len(s) for s in world.scheduler.submits] == [4]
    assert world.dispatcher.free_slots() is None and world.dispatcher.free_slots(limit=6) == 2


@pytest.mark.parametrize("window", ["before_submit", "after_submit", "after_mark"])
def test_a_driver_killed_in_any_window_adopts_instead_of_submitting_twice(world: World, monkeypatch,
                                                                           window: str) -> None:  # fmt: skip
    trials = world.add(2)

    def crash_at(name: str) -> None:
        if name == window:
            raise Killed(name)

    monkeypatch.setattr(dispatcher_module, "crash_point", crash_at)
    with pytest.raises(Killed):
        world.dispatcher.poll()
    monkeypatch.setattr(dispatcher_module, "crash_point", lambda name: None)
    world.dispatcher = world.new_dispatcher()  # the same command again
    world.clock.on_sleep = world.scheduler.tick
    world.dispatcher.run_until_done()
    ran = Counter(Path(job.trial_dir).name for job in world.scheduler.jobs.values() if job.trial_dir)
    assert ran == Counter(trials), f"each trial had one job: {ran}"
    for tid in trials:
        row = world.row(tid)
        assert world.status(tid) == Status.OK and row["submissions"] == 1
        assert row["job_id"] == claim_holder(world.run_dir / "trials" / tid)
    assert not world.ledger.open_submissions()
    if window == "after_submit":
        assert "adopted 2 of 2 trials" in world.notes[0]


def test_a_submission_the_scheduler_cannot_be_asked_about_waits(world: World, monkeypatch) -> None:
    world.add(1)
    monkeypatch.setattr(dispatcher_module, "crash_point",
                        lambda name: (_ for _ in ()).throw(Killed()) if name == "after_submit" else None)  # fmt: skip
    with pytest.raises(Killed):
        world.dispatcher.poll()
    monkeypatch.setattr(dispatcher_module, "crash_point", lambda name: None)
    world.dispatcher = world.new_dispatcher()
    world.scheduler.queries_fail = True
    world.dispatcher.poll()
    assert len(world.scheduler.submits) == 1, (
        "nothing goes out while the killed driver's jobs cannot be found"
    )
    world.scheduler.queries_fail = False
    world.dispatcher.poll()
    assert len(world.scheduler.submits) == 1 and world.state("e0-000-t0") == TrialState.QUEUED


def test_an_adopted_job_that_claimed_its_trial_is_found_by_its_claim(world: World, monkeypatch) -> None:
    (tid,) = world.add(1)
    monkeypatch.setattr(dispatcher_module, "crash_point",
                        lambda name: (_ for _ in ()).throw(Killed()) if name == "after_submit" else None)  # fmt: skip
    with pytest.raises(Killed):
        world.dispatcher.poll()
    monkeypatch.setattr(dispatcher_module, "crash_point", lambda name: None)
    job = world.scheduler.job_for(tid)
    world.scheduler.start(job)
    world.scheduler.jobs[job].token = "lost"  # the scheduler no longer knows the token, the claim does
    world.dispatcher = world.new_dispatcher()
    world.dispatcher.poll()
    assert world.row(tid)["job_id"] == job and len(world.scheduler.submits) == 1


def test_the_trial_follows_the_job_that_claimed_it(world: World) -> None:
    (tid,) = world.add(1)
    world.dispatcher.poll()
    loser = world.scheduler.job_for(tid)
    assert claim_trial(world.run_dir / "trials" / tid, "777_0"), "another launch got there first"
    world.wait(1.0)
    row = world.row(tid)
    assert row["job_id"] == "777_0" and row["array_index"] == 0 and f"not {loser}" in row["note"]


def test_a_started_job_makes_its_trial_running_with_its_node_and_gpus(world: World) -> None:
    (tid,) = world.add(1)
    world.dispatcher.poll()
    world.scheduler.start(world.scheduler.job_for(tid))
    world.wait(1.0)
    row = world.row(tid)
    assert (row["state"], row["node"], row["gpus"], row["job_state"]) == ("running", "node1", "0", "running")


def test_a_vanished_job_is_resubmitted_once_then_its_trial_crashes(world: World) -> None:
    tid, first = world.started()
    world.scheduler.vanish(first)
    world.wait(TIMING["vanished_grace_s"] - 2)
    assert world.state(tid) == TrialState.RUNNING, "a vanished job gets its grace"
    world.wait(2 + SLACK)
    assert len(world.scheduler.submits) == 2 and first in world.scheduler.cancelled
    assert claim_holder(world.run_dir / "trials" / tid) is None, "the claim is the new job's to take"
    second = world.scheduler.job_for(tid)
    assert second != first and world.row(tid)["submissions"] == 2 and "vanished" in world.row(tid)["note"]
    world.scheduler.vanish(second)
    world.wait(TIMING["vanished_grace_s"] + SLACK)
    assert world.status(tid) == Status.CRASHED and len(world.scheduler.submits) == 2


def test_a_preempted_job_that_slurm_requeues_is_followed_not_resubmitted(world: World) -> None:
    tid, job = world.started()
    world.wait(1.0)
    world.scheduler.end(job, JobState.PREEMPTED)
    world.wait(3.0)  # past the result grace, within the vanished grace
    assert world.state(tid) == TrialState.RUNNING and world.status(tid) is None
    world.scheduler.requeue(job)
    world.wait(1.0)
    assert world.state(tid) == TrialState.QUEUED
    assert trial_dir.started_where(world.run_dir / "trials" / tid) is None, "it writes its start anew"
    world.scheduler.start(job)  # the same job holds the claim and runs
    world.scheduler.finish(job)
    world.wait(1.0)
    assert world.status(tid) == Status.OK and len(world.scheduler.submits) == 1


def test_a_preempted_job_that_does_not_come_back_runs_again(world: World) -> None:
    tid, job = world.started()
    world.scheduler.end(job, JobState.PREEMPTED)
    world.wait(TIMING["vanished_grace_s"] + SLACK)
    assert len(world.scheduler.submits) == 2 and "preempted; resubmitted" in world.row(tid)["note"]


@pytest.mark.parametrize(
    ("state", "status"),
    [(JobState.TIMEOUT, Status.TIMEOUT), (JobState.CANCELLED, Status.CANCELLED), (JobState.FAILED, Status.CRASHED),
     (JobState.OUT_OF_MEMORY, Status.CRASHED), (JobState.COMPLETED, Status.CRASHED)],
)  # fmt: skip
def test_a_job_that_ends_without_a_result_is_recorded_by_its_end_state(world: World, state: JobState,
                                                                        status: Status) -> None:  # fmt: skip
    tid, job = world.started()
    world.scheduler.end(job, state, log="Traceback: boom")
    world.wait(TIMING["result_grace_s"] - 1)
    assert world.status(tid) is None, "a result may still be on its way"
    world.wait(1 + SLACK)
    reason = world.ledger.db.execute(
        "SELECT reason, log_tail FROM results WHERE trial_id = ?", (tid,)
    ).fetchone()
    assert world.status(tid) == status and f"({state.value}) without writing a result" in reason[0]
    assert "boom" in reason[1], "the job's log tail stands in for an empty train log"
    assert len(world.scheduler.submits) == 1


def test_a_job_that_ran_out_of_disk_is_recorded_disk_full_and_reopened(world: World) -> None:
    tid, job = world.started()
    world.scheduler.end(job, JobState.FAILED, log="OSError: [Errno 28] No space left on device")
    world.wait(TIMING["result_grace_s"] + SLACK)
    assert world.status(tid) == Status.DISK_FULL
    assert world.dispatcher.retry_disk_full() == 1
    assert world.state(tid) == TrialState.PENDING and world.status(tid) is None
    assert claim_holder(world.run_dir / "trials" / tid) is None
    world.dispatcher.poll()
    assert len(world.scheduler.submits) == 2


def test_a_hold_keeps_pending_trials_back_and_counts_as_done(world: World) -> None:
    world.add(2)
    world.held = True
    world.dispatcher.poll()
    assert world.scheduler.submits == [] and world.dispatcher.done()
    world.held = False
    assert not world.dispatcher.done()
    world.dispatcher.poll()
    assert len(world.scheduler.submits) == 1


def test_a_cancelled_run_stops_the_dispatcher(world: World) -> None:
    world.add(1)
    world.ledger.set_meta(CANCELLED_META, "cancelled by a test")
    with pytest.raises(RunCancelled, match="cancelled by a test"):
        world.dispatcher.poll()


def test_the_scheduler_is_asked_less_often_while_nothing_changes(world: World) -> None:
    (tid,) = world.add(1)
    asked: list[float] = []
    states = world.scheduler.states
    world.scheduler.states = lambda ids: asked.append(world.clock.now) or states(ids)  # type: ignore[method-assign]
    world.dispatcher.poll()
    world.scheduler.start(world.scheduler.job_for(tid))
    world.wait(20)
    gaps = [b - a for a, b in itertools.pairwise(asked)]
    assert gaps[0] <= 1.0 and max(gaps) == pytest.approx(TIMING["poll_interval_max_s"], abs=0.5), gaps
