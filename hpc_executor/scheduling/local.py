"""Launching trials: one interface over submitit's local and Slurm executors.

The scheduler only launches jobs and reports their states; results travel through files in the
trial directories (see ``worker``), so a driver that restarts needs nothing from the scheduler but
job ids, which the ledger keeps.
"""

from __future__ import annotations

import abc
import contextlib
import enum
import logging
import math
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import submitit
from omegaconf import DictConfig

from hpc_executor.errors import ConfigError, HpcExecutorError
from hpc_executor.worker import run_trial

log = logging.getLogger(__name__)

SUBMISSION_ENV = "HPCX_SUBMISSION"  # "<token>:<index>" in a local job's environment


@dataclass(frozen=True)
class Shape:
    """What one trial asks for; trials of one shape go out as one array."""

    gpus: int
    cpus: int
    mem_gb: int
    time_limit_s: int  # the worker's own limits plus a margin: the scheduler's kill is a backstop


class JobState(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"  # ended normally: the result file should be there
    FAILED = "failed"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    PREEMPTED = "preempted"
    NODE_FAIL = "node_fail"
    OUT_OF_MEMORY = "out_of_memory"
    UNKNOWN = "unknown"  # the scheduler has no record (yet, or any more)

    @property
    def finished(self) -> bool:
        return self not in (JobState.PENDING, JobState.RUNNING, JobState.UNKNOWN)


class SchedulerQueryError(HpcExecutorError):
    """The scheduler could not be asked (sacct failed, say); the driver tries again at the next poll."""


class Scheduler(abc.ABC):
    def __init__(self, cfg: DictConfig, folder: Path) -> None:
        self.cfg = cfg
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    @abc.abstractmethod
    def capacity(self, shape: Shape) -> int | None:
        """How many trials of this shape may be in flight at once; None: let the cluster queue them."""

    @abc.abstractmethod
    def submit(
        self, trial_dirs: list[str], shape: Shape, token: str | None = None
    ) -> list[tuple[str, int | None]]:
        """Launch one job per trial directory, as one array; returns (job id, array index) per trial.
        The jobs carry ``token`` (recorded in the ledger before) so that ``find_submitted`` finds
        them should the driver die before it records their ids."""

    @abc.abstractmethod
    def find_submitted(
        self, submissions: dict[str, list[str]], since: float
    ) -> dict[str, tuple[str, int | None]]:
        """The jobs that ``submit`` calls with these tokens (token -> trial directories, in the order
        submitted, the first not before ``since``) launched, in one query: trial directory -> (job
        id, array index), for the directories whose job was found. Raises SchedulerQueryError."""

    @abc.abstractmethod
    def submit_call(self, fn: Callable[..., Any], args: tuple[Any, ...], shape: Shape, job_name: str) -> str:
        """Run one function call as a job of this shape (a model server, say); returns its job id."""

    @abc.abstractmethod
    def states(self, job_ids: list[str]) -> dict[str, JobState]:
        """Current state of each job, in one query; raises SchedulerQueryError when it cannot ask."""

    @abc.abstractmethod
    def cancel(self, job_ids: list[str]) -> None: ...

    def job_log(self, job_id: str) -> Path | None:
        """The job's stderr as submitit wrote it (the newest, for a job that ran more than once)."""
        logs = sorted(self.folder.glob(f"{job_id}*/*.err")) + sorted(self.folder.glob(f"{job_id}*.err"))
        return logs[-1] if logs else None


class LocalScheduler(Scheduler):
    """Trials as local processes through submitit's LocalExecutor. It has no queue of its own (every
    job starts at once), so ``capacity`` caps what the driver hands it by the machine's cores/GPUs."""

    def __init__(self, cfg: DictConfig, folder: Path) -> None:
        super().__init__(cfg, folder)
        self._jobs: dict[str, submitit.Job[Any]] = {}

    def capacity(self, shape: Shape) -> int:
        if self.cfg.max_parallel:
            return int(self.cfg.max_parallel)
        by_cpu = max(1, (os.cpu_count() or 1) // max(1, shape.cpus))
        if shape.gpus:
            return max(1, min(by_cpu, local_gpu_count() // shape.gpus))
        return by_cpu

    def submit(
        self, trial_dirs: list[str], shape: Shape, token: str | None = None
    ) -> list[tuple[str, int | None]]:
        executor = self._executor(shape)
        jobs = []
        with _outliving_the_terminal():
            for index, trial_dir in enumerate(trial_dirs):  # one process each, as map_array does
                with _environ(SUBMISSION_ENV, f"{token}:{index}" if token else None):
                    jobs.append(executor.submit(run_trial, trial_dir))
        for job in jobs:
            self._jobs[job.job_id] = job
        return [(job.job_id, None) for job in jobs]

    def find_submitted(
        self, submissions: dict[str, list[str]], since: float
    ) -> dict[str, tuple[str, int | None]]:
        """Live local jobs carry their token in their environment; one that ended already is found
        by its claim on the trial directory (see ``claim``), which the driver reads itself."""
        found: dict[str, tuple[str, int | None]] = {}
        for pid, environ in _submitit_processes():
            token, _, index = environ.get(SUBMISSION_ENV, "").partition(":")
            if token in submissions and index.isdigit() and int(index) < len(submissions[token]):
                job_id = environ.get("SUBMITIT_LOCAL_JOB_ID", str(pid))  # a task names its controller
                found[submissions[token][int(index)]] = (job_id, None)
        return found

    def submit_call(self, fn: Callable[..., Any], args: tuple[Any, ...], shape: Shape, job_name: str) -> str:
        with _outliving_the_terminal():
            job = self._executor(shape).submit(fn, *args)
        self._jobs[job.job_id] = job
        return job.job_id

    def _executor(self, shape: Shape) -> submitit.LocalExecutor:
        executor = submitit.LocalExecutor(folder=self.folder / "%j")
        executor.update_parameters(timeout_min=math.ceil(shape.time_limit_s / 60), gpus_per_node=shape.gpus)
        return executor

    def states(self, job_ids: list[str]) -> dict[str, JobState]:
        return {job_id: self._state(job_id) for job_id in job_ids}

    def _state(self, job_id: str) -> JobState:
        job = self._jobs.get(job_id)
        if job is not None:  # our child: poll() also reaps it
            info = job.state
            if info == "RUNNING":
                return JobState.RUNNING
            return JobState.COMPLETED if info == "FINISHED" else JobState.FAILED
        # a job started by an earlier driver: alive while its controller process is
        return JobState.RUNNING if _is_submitit_process(int(job_id)) else JobState.UNKNOWN

    def cancel(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            job = self._jobs.get(job_id)
            if job is not None:  # our child: its pid stays ours until we reap it, which .state does
                if job.state == "RUNNING":
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(job_id), signal.SIGTERM)
            # a pid outlives its process: only signal it while it is still a submitit job
            elif job_id.isdigit() and _is_submitit_process(int(job_id)):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(job_id), signal.SIGTERM)  # submitit's controller forwards it to the worker


@contextlib.contextmanager
def _outliving_the_terminal() -> Iterator[None]:
    """Local jobs share the driver's terminal. Started with SIGINT and SIGHUP ignored (inherited
    through exec), they outlive a Ctrl-C meant for the driver and a closed terminal, as Slurm jobs
    do. They are cancelled with SIGTERM."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _environ(name: str, value: str | None) -> Iterator[None]:
    """``name=value`` in the environment of what is started meanwhile (nothing when value is None)."""
    if value is None:
        yield
        return
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


def _submitit_processes() -> Iterator[tuple[int, dict[str, str]]]:
    """(pid, environment) of every live submitit process this user may read."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or not _is_submitit_process(int(entry.name)):
            continue
        try:
            raw = (entry / "environ").read_bytes()
        except OSError:
            continue
        pairs = (item.partition(b"=") for item in raw.split(b"\0") if item)
        yield int(entry.name), {k.decode(errors="replace"): v.decode(errors="replace") for k, _, v in pairs}


def _is_submitit_process(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    zombie = any(line.startswith("State:") and "Z" in line.split()[1] for line in status.splitlines())
    return not zombie and b"submitit" in cmdline


def local_gpu_count() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return 0
    return len(out.stdout.strip().splitlines()) if out.returncode == 0 else 0


def make_scheduler(cfg: DictConfig, folder: Path) -> Scheduler:
    if cfg.name == "local":
        return LocalScheduler(cfg, folder)
    if cfg.name == "slurm":
        from hpc_executor.slurm import SlurmScheduler

        return SlurmScheduler(cfg, folder)
    raise ConfigError(f"scheduler={cfg.name!r} is unknown; choose scheduler=local or scheduler=slurm")
