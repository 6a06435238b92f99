"""The contract every scheduler keeps, as Hydra's ``launcher_common_tests.py`` serves every launcher:
a backend's test class subclasses ``SchedulerContract`` and says how to make one of its schedulers
(tests/test_scheduling_contract.py does so for the local and the Slurm scheduler).

The same job ends in the same state on every backend: a function that returns is COMPLETED; one
that exits 1 is FAILED; one killed from outside with SIGKILL is FAILED; one stopped through
``cancel`` is CANCELLED, even when it ignores SIGTERM. A new scheduler on the same folder (a
restarted driver, ``hpc_executor.cancel``) knows all of it from the job ids alone.

The jobs are the tiny functions below, pickled by value so that a job needs no test module on its
path, plus, for arrays, real trial directories of the ``quick`` environment run by the worker.
"""

from __future__ import annotations

import abc
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import cloudpickle
import pytest
from test_slurm import make_trials, wait_for

from hpc_executor.scheduling import JobState, Scheduler, Shape
from hpc_executor.trial_dir import RESULT_FILE

cloudpickle.register_pickle_by_value(sys.modules[__name__])

SHAPE = Shape(gpus=0, cpus=1, mem_gb=1, time_limit_s=120)


# -- the jobs ---------------------------------------------------------------------------------------
def say(text: str) -> str:
    print(text, file=sys.stderr, flush=True)
    return text


def say_and_exit_1(text: str) -> None:
    print(text, file=sys.stderr, flush=True)
    sys.exit(1)


def sleep_after_writing_pid(pid_file: str) -> None:
    """Stands for a long trial. submitit's own handler ignores SIGTERM in the job, so only a
    scheduler that follows up with SIGKILL stops it."""
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(600)  # past SHAPE's time limit: a test that waits for its end fails first


class SchedulerContract(abc.ABC):
    array_indices: ClassVar[bool]  # whether submit gives array indices (0..N-1) or None per trial

    @abc.abstractmethod
    def new_scheduler(self, folder: Path, **cfg: Any) -> Scheduler:
        """A new scheduler of this backend on ``folder``, with ``cfg`` over its defaults."""

    # -- helpers ----------------------------------------------------------------------------------
    @pytest.fixture
    def scheduler(self, tmp_path: Path) -> Iterator[Scheduler]:
        """The scheduler a test submits with; a job a failing test left running is cancelled."""
        sched = self.new_scheduler(tmp_path / "submitit")
        self.submitted: list[str] = []
        yield sched
        live = [j for j, s in sched.states(self.submitted).items() if not s.finished]
        sched.cancel(live)

    def call(self, sched: Scheduler, fn: Any, *args: Any, token: str | None = None) -> str:
        token = token or uuid.uuid4().hex[:12]
        job_id = sched.submit_call(fn, args, SHAPE, job_name="hpcx-contract", token=token)
        self.submitted.append(job_id)
        return job_id

    def long_job(self, sched: Scheduler, tmp_path: Path, token: str | None = None) -> tuple[str, int]:
        """A running job of ``sleep_after_writing_pid``, and the pid of the process running the function."""
        pid_file = tmp_path / f"pid-{uuid.uuid4().hex[:6]}"
        job_id = self.call(sched, sleep_after_writing_pid, str(pid_file), token=token)
        wait_for(
            lambda: pid_file.exists() and pid_file.read_text(), timeout=120, what=f"job {job_id} to start"
        )
        # Slurm's accounting may still say pending for a moment after the job started
        wait_for(
            lambda: sched.states([job_id])[job_id] is JobState.RUNNING,
            timeout=60,
            what=f"job {job_id} running",
        )
        return job_id, int(pid_file.read_text())

    def final_state(self, sched: Scheduler, job_id: str, timeout: float = 120) -> JobState:
        """The state a job ended in, once the scheduler says it ended; a new scheduler on the same
        folder, knowing nothing but the id, must say the same."""
        wait_for(
            lambda: sched.states([job_id])[job_id].finished, timeout=timeout, what=f"job {job_id} to end"
        )
        state = sched.states([job_id])[job_id]
        assert self.new_scheduler(sched.folder).states([job_id]) == {job_id: state}, "re-attached: same state"
        return state

    # -- the contract -----------------------------------------------------------------------------
    def test_an_array_gives_one_job_per_trial_and_each_completes(
        self, scheduler: Scheduler, tmp_path: Path
    ) -> None:
        dirs = make_trials(tmp_path, 3)
        jobs = scheduler.submit(dirs, SHAPE)
        self.submitted += [j for j, _ in jobs]
        assert len(jobs) == 3 and len({j for j, _ in jobs}) == 3, jobs
        if self.array_indices:
            assert [i for _, i in jobs] == [0, 1, 2]
            assert len({j.rsplit("_", 1)[0] for j, _ in jobs}) == 1, "one array"
            assert all(j.endswith(f"_{i}") for j, i in jobs)
        else:
            assert all(i is None for _, i in jobs)
        assert [self.final_state(scheduler, j) for j, _ in jobs] == [JobState.COMPLETED] * 3
        assert all((Path(d) / RESULT_FILE).exists() for d in dirs)

    def test_a_job_that_returns_is_completed_and_its_log_is_found(self, scheduler: Scheduler) -> None:
        text = f"hello from the job {uuid.uuid4().hex}"
        job = self.call(scheduler, say, text)
        assert self.final_state(scheduler, job) is JobState.COMPLETED
        log = self.new_scheduler(scheduler.folder).job_log(job)
        assert log is not None and text in log.read_text()

    def test_a_job_that_exits_1_is_failed_and_its_log_is_found(self, scheduler: Scheduler) -> None:
        text = f"about to fail {uuid.uuid4().hex}"
        job = self.call(scheduler, say_and_exit_1, text)
        assert self.final_state(scheduler, job) is JobState.FAILED
        log = scheduler.job_log(job)
        assert log is not None and text in log.read_text()

    def test_a_job_killed_from_outside_is_failed(self, scheduler: Scheduler, tmp_path: Path) -> None:
        job, pid = self.long_job(scheduler, tmp_path)
        os.kill(pid, signal.SIGKILL)
        assert self.final_state(scheduler, job) is JobState.FAILED

    def test_a_cancelled_job_is_cancelled_though_it_ignores_sigterm(
        self, scheduler: Scheduler, tmp_path: Path
    ) -> None:
        job, pid = self.long_job(scheduler, tmp_path)
        scheduler.cancel([job])
        # long before the job's own end, or its time limit
        assert self.final_state(scheduler, job, timeout=60) is JobState.CANCELLED
        wait_for(lambda: not _alive(pid), timeout=30, what="the cancelled job's process to end")

    def test_a_new_scheduler_cancels_what_an_earlier_one_submitted(
        self, scheduler: Scheduler, tmp_path: Path
    ) -> None:
        job, _ = self.long_job(scheduler, tmp_path)
        self.new_scheduler(scheduler.folder).cancel([job])  # hpc_executor.cancel, or a restarted driver
        assert self.final_state(scheduler, job, timeout=60) is JobState.CANCELLED

    def test_cancelling_an_ended_job_leaves_its_state(self, scheduler: Scheduler) -> None:
        job = self.call(scheduler, say, "done")
        assert self.final_state(scheduler, job) is JobState.COMPLETED
        scheduler.cancel([job])
        assert self.final_state(scheduler, job) is JobState.COMPLETED

    def test_one_query_reattaches_to_every_job(self, scheduler: Scheduler, tmp_path: Path) -> None:
        done, failed = self.call(scheduler, say, "ok"), self.call(scheduler, say_and_exit_1, "no")
        running, _ = self.long_job(scheduler, tmp_path)
        for job in (done, failed):
            self.final_state(scheduler, job)
        again = self.new_scheduler(scheduler.folder)
        assert again.states([done, failed, running, "999999991"]) == {
            done: JobState.COMPLETED, failed: JobState.FAILED, running: JobState.RUNNING,
            "999999991": JobState.UNKNOWN,  # a job this scheduler never had
        }  # fmt: skip

    def test_jobs_are_found_by_their_token(self, scheduler: Scheduler, tmp_path: Path) -> None:
        """A driver killed between submitting and recording the job ids finds them by the token."""
        dirs = make_trials(tmp_path, 2, extra_env={"QUICK_SLEEP_S": "5"})
        token = uuid.uuid4().hex[:12]
        jobs = scheduler.submit(dirs, SHAPE, token=token)
        self.submitted += [j for j, _ in jobs]
        found = self.new_scheduler(scheduler.folder).find_submitted(
            {token: dirs, "never-used": ["/nowhere"]}, since=time.time() - 30
        )
        assert found == dict(zip(dirs, jobs, strict=True))
        wait_for(lambda: all((Path(d) / RESULT_FILE).exists() for d in dirs), what="the results")

    def test_a_call_is_found_by_its_token_while_it_runs_and_after_it_ended(
        self, scheduler: Scheduler, tmp_path: Path
    ) -> None:
        """A caller killed between submitting a call (a model server) and recording its id finds it by
        the token, whether the job still runs or ended since; a token never used finds nothing."""
        since = time.time()
        running_token, ended_token = uuid.uuid4().hex[:12], uuid.uuid4().hex[:12]
        running, _ = self.long_job(scheduler, tmp_path, token=running_token)
        ended = self.call(scheduler, say, "done", token=ended_token)
        self.final_state(scheduler, ended)
        again = self.new_scheduler(scheduler.folder)
        assert again.find_call(running_token, since) == running
        # Slurm's accounting lists an ended job by its time a few seconds after it reads it by its id
        wait_for(lambda: again.find_call(ended_token, since) == ended, timeout=60, what="the ended call")
        assert again.find_call(uuid.uuid4().hex[:12], since) is None

    def test_capacity_is_max_parallel_when_set(self, tmp_path: Path) -> None:
        assert self.new_scheduler(tmp_path, max_parallel=3).capacity(SHAPE) == 3

    def test_dry_run_describes_without_submitting(self, scheduler: Scheduler) -> None:
        text = scheduler.dry_run(SHAPE, 5)
        assert isinstance(text, str) and text.strip()
        assert not any(scheduler.folder.iterdir()), "nothing was submitted"


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return not any(line.startswith("State:") and "Z" in line.split()[1] for line in status.splitlines())
