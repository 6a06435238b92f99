"""An in-memory twin of a scheduler, and a clock the test owns.

``MemoryScheduler`` implements ``hpc_executor.scheduling.Scheduler`` with dicts: submissions get Slurm
style array ids (``100_0``, ``100_1``, ...) and the test moves each job through its life by hand
(``start``, ``finish``, ``end``, ``requeue``, ``vanish``), doing what the worker would do in the trial
directory (the claim, the start, the result) with the same functions the worker uses. ``tick`` plays
the cluster on its own: queued jobs start when a slot is free, and a running job finishes after the
number of ticks ``durations`` gives its trial.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from hpc_executor import trial_dir
from hpc_executor.claim import claim_trial
from hpc_executor.scheduling import JobState, Scheduler, SchedulerQueryError, Shape
from hpc_executor.types import Result, Status


@dataclass
class FakeJob:
    trial_dir: str | None  # None for a function call (a model server)
    token: str | None
    index: int
    state: JobState = JobState.PENDING
    ticks: int = 0  # ticks spent running


class FakeClock:
    """Monotonic seconds that move only when the code under test sleeps; ``on_sleep`` runs then."""

    def __init__(self) -> None:
        self.now = 0.0
        self.on_sleep: Callable[[], None] | None = None

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        if self.on_sleep:
            self.on_sleep()


class MemoryScheduler(Scheduler):
    def __init__(self, folder: Path, capacity: int | None = None) -> None:
        super().__init__(OmegaConf.create({"name": "memory"}), folder)
        self._capacity = capacity
        self.jobs: dict[str, FakeJob] = {}
        self.submits: list[list[str]] = []  # the trial directories of each submit call
        self.cancelled: list[str] = []
        self.queries_fail = False  # states, find_submitted and find_call raise SchedulerQueryError
        self.durations: dict[str, int] = {}  # trial directory name -> ticks it runs (default 1)
        self.max_running = 0  # the most jobs seen running at once
        self._next_array = 100

    # -- the Scheduler interface -----------------------------------------------------------------
    def capacity(self, shape: Shape) -> int | None:
        return self._capacity

    def dry_run(self, shape: Shape, n_trials: int) -> str:
        return f"{n_trials} trials of {shape} in memory (a test double: nothing runs)"

    def submit(
        self, trial_dirs: list[str], shape: Shape, token: str | None = None
    ) -> list[tuple[str, int | None]]:
        array, self._next_array = self._next_array, self._next_array + 1
        self.submits.append(list(trial_dirs))
        ids: list[tuple[str, int | None]] = []
        for index, tdir in enumerate(trial_dirs):
            job_id = f"{array}_{index}"
            self.jobs[job_id] = FakeJob(tdir, token, index)
            ids.append((job_id, index))
        return ids

    def find_submitted(
        self, submissions: dict[str, list[str]], since: float
    ) -> dict[str, tuple[str, int | None]]:
        if self.queries_fail:
            raise SchedulerQueryError("the fake scheduler is down")
        return {
            submissions[job.token][job.index]: (job_id, job.index)
            for job_id, job in self.jobs.items()
            if job.token in submissions
        }

    def submit_call(self, fn: Callable[..., Any], args: tuple[Any, ...], shape: Shape, job_name: str,
                    token: str) -> str:  # fmt: skip
        job_id = str(self._next_array)
        self._next_array += 1
        self.jobs[job_id] = FakeJob(None, token, 0, JobState.RUNNING)
        return job_id

    def find_call(self, token: str, since: float) -> str | None:
        if self.queries_fail:
            raise SchedulerQueryError("the fake scheduler is down")
        return next((j for j, job in self.jobs.items() if job.trial_dir is None and job.token == token), None)

    def states(self, job_ids: list[str]) -> dict[str, JobState]:
        if self.queries_fail:
            raise SchedulerQueryError("the fake scheduler is down")
        return {j: self.jobs[j].state for j in job_ids if j in self.jobs}  # others: unknown

    def cancel(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            self.cancelled.append(job_id)
            job = self.jobs.get(job_id)
            if job is not None and not job.state.finished:
                job.state = JobState.CANCELLED

    # -- the test's hands: what the worker and the cluster would do --------------------------------
    def job_for(self, trial_id: str) -> str:
        """The newest job submitted for this trial."""
        return [j for j, job in self.jobs.items() if job.trial_dir and Path(job.trial_dir).name == trial_id][
            -1
        ]

    def start(self, job_id: str) -> bool:
        """The job starts its trial as the worker does: claims it, then writes its start."""
        job = self.jobs[job_id]
        assert job.trial_dir is not None
        job.state = JobState.RUNNING
        if not claim_trial(Path(job.trial_dir), job_id):
            job.state = JobState.COMPLETED  # a second launch exits at once, touching nothing
            return False
        trial_dir.write_started(Path(job.trial_dir), {"host": "node1", "cuda_visible_devices": "0"})
        return True

    def finish(self, job_id: str, status: Status = Status.OK, reward: float | None = 1.0) -> None:
        """The worker writes its result and the job completes."""
        job = self.jobs[job_id]
        assert job.trial_dir is not None
        tdir = Path(job.trial_dir)
        result = Result(tdir.name, status, reward=reward if status is Status.OK else None,
                        provenance={"job_id": job_id})  # fmt: skip
        trial_dir.write_atomic(trial_dir.result_path(tdir), result.to_json())
        job.state = JobState.COMPLETED

    def end(self, job_id: str, state: JobState, log: str = "") -> None:
        """The job ends in ``state`` without a result; ``log`` is its stderr."""
        self.jobs[job_id].state = state
        if log:
            (self.folder / job_id).mkdir(parents=True, exist_ok=True)  # where submitit keeps a job's logs
            (self.folder / job_id / f"{job_id}_0_log.err").write_text(log)

    def requeue(self, job_id: str) -> None:
        self.jobs[job_id].state = JobState.PENDING

    def vanish(self, job_id: str) -> None:
        del self.jobs[job_id]

    def tick(self) -> None:
        """One step of the cluster: running jobs advance (and finish after their duration), then
        queued jobs start while the capacity allows."""
        for job_id, job in list(self.jobs.items()):
            if job.state is JobState.RUNNING and job.trial_dir:
                job.ticks += 1
                if job.ticks >= self.durations.get(Path(job.trial_dir).name, 1):
                    self.finish(job_id)
        for job_id, job in list(self.jobs.items()):
            running = sum(1 for j in self.jobs.values() if j.state is JobState.RUNNING)
            if job.state is JobState.PENDING and (self._capacity is None or running < self._capacity):
                self.start(job_id)
        self.max_running = max(
            self.max_running, sum(1 for j in self.jobs.values() if j.state is JobState.RUNNING)
        )
