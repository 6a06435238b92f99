"""Trials as processes on this machine, through submitit's LocalExecutor.

A local job's id is the pid of its submitit controller, which runs the job's function in a task
process and writes its logs and result pickle into ``<folder>/<job id>/``. States come from the
process table and files in that folder, so that a new scheduler on the same folder (a restarted
driver, ``hpc_executor.cancel``) reads what the one that submitted reads:

* RUNNING while the controller (a submitit process started for this folder) is alive;
* CANCELLED when ``cancel`` stopped it: a ``cancelled`` marker, written before the signal, says so,
  as Slurm's record of an ``scancel`` does;
* COMPLETED when its function returned (submitit's result pickle says "success");
* FAILED when it raised, exited non-zero or was killed from outside (SIGKILL, the OOM killer), as
  seen by the scheduler that started it, which records the end of its child in an ``ended`` file
  (a controller always exits 0, and only its parent can see that it exited);
* UNKNOWN when the folder holds no such job, or when the job ended without a result while no
  scheduler that could see it end was alive (the driver and its jobs killed together, a reboot):
  as for a job sacct has no record of, the driver then runs the trial again, once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import submitit
from omegaconf import DictConfig
from submitit.core.utils import JobPaths, pickle_load

from hpc_executor.config import LocalSchedulerConfig
from hpc_executor.scheduling.base import JobState, Scheduler, Shape
from hpc_executor.trial_dir import write_atomic
from hpc_executor.worker import run_trial

log = logging.getLogger(__name__)

SUBMISSION_ENV = "HPCX_SUBMISSION"  # "<token>:<index>" in a local job's environment
CANCELLED_MARKER = "cancelled"  # in a job's folder: cancel() stopped it
ENDED_RECORD = "ended"  # in a job's folder: the scheduler that started it saw it end
CALL_ENV = "HPCX_CALL"  # the token of a submit_call job, in its environment
CALL_MARKER = "call_token"  # in a job's folder: the token of the call it runs, written as it starts


class LocalScheduler(Scheduler):
    """No queue of its own (every job starts at once), so ``capacity`` caps what the driver hands
    it by the machine's cores and GPUs."""

    config_class = LocalSchedulerConfig

    def __init__(self, cfg: DictConfig, folder: Path) -> None:
        super().__init__(cfg, folder)
        self._jobs: dict[str, submitit.Job[Any]] = {}  # our children: polling them reaps them

    def capacity(self, shape: Shape) -> int:
        if self.cfg.max_parallel:
            return int(self.cfg.max_parallel)
        by_cpu = max(1, (os.cpu_count() or 1) // max(1, shape.cpus))
        if shape.gpus:
            return max(1, min(by_cpu, len(local_gpu_ids()) // shape.gpus))
        return by_cpu

    def submit(
        self, trial_dirs: list[str], shape: Shape, token: str | None = None
    ) -> list[tuple[str, int | None]]:
        executor = self._executor(shape)
        jobs = []
        with _outliving_the_terminal():
            for index, (trial_dir, gpus) in enumerate(
                zip(trial_dirs, _free_gpus(shape, len(trial_dirs)), strict=True)
            ):
                executor.update_parameters(visible_gpus=gpus)  # one process each, as map_array does
                with _environ(SUBMISSION_ENV, f"{token}:{index}" if token else None):
                    jobs.append(executor.submit(run_trial, trial_dir))
        for job in jobs:
            self._adopt(job)
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

    def submit_call(self, fn: Callable[..., Any], args: tuple[Any, ...], shape: Shape, job_name: str,
                    token: str) -> str:  # fmt: skip
        executor = self._executor(shape)
        executor.update_parameters(visible_gpus=_free_gpus(shape, 1)[0])
        with _outliving_the_terminal(), _environ(CALL_ENV, token):
            job = executor.submit(_call_marked, token, fn, *args)
        self._adopt(job)
        return job.job_id

    def find_call(self, token: str, since: float) -> str | None:
        """A live call carries its token in its environment; one that ended is found by the marker
        its task wrote in the job's folder when it started. Not found: a call that ended before its
        task wrote the marker (it ran none of the function, and holds nothing)."""
        for pid, environ in _submitit_processes():
            if environ.get(CALL_ENV) == token:
                return environ.get("SUBMITIT_LOCAL_JOB_ID", str(pid))  # a task names its controller
        for marker in self.folder.glob(f"*/{CALL_MARKER}"):
            with contextlib.suppress(OSError):  # a folder being removed
                if marker.read_text() == token and marker.stat().st_mtime >= since - 60:
                    return marker.parent.name
        return None

    def _executor(self, shape: Shape) -> submitit.LocalExecutor:
        executor = submitit.LocalExecutor(folder=self.folder / "%j")
        executor.update_parameters(timeout_min=math.ceil(shape.time_limit_s / 60), gpus_per_node=shape.gpus)
        return executor

    def _adopt(self, job: submitit.Job[Any]) -> None:
        # pids are reused (pid_max is often 32768): what an earlier job of the same id left in its
        # folder must not speak for this one. The job cannot have ended yet (it is still starting
        # Python), let alone written a result.
        job_dir = self.folder / job.job_id
        for leftover in (
            job_dir / CANCELLED_MARKER,
            job_dir / ENDED_RECORD,
            job_dir / CALL_MARKER,
            JobPaths(job_dir, job.job_id, 0).result_pickle,
        ):
            leftover.unlink(missing_ok=True)
        self._jobs[job.job_id] = job

    def states(self, job_ids: list[str]) -> dict[str, JobState]:
        return {job_id: self._state(job_id) for job_id in job_ids}

    def _state(self, job_id: str) -> JobState:
        job_dir = self.folder / job_id
        if self._alive(job_id):
            return JobState.RUNNING
        if not job_id.isdigit() or not job_dir.is_dir():
            return JobState.UNKNOWN
        if (job_dir / CANCELLED_MARKER).exists():
            return JobState.CANCELLED
        result = JobPaths(job_dir, job_id, 0).result_pickle
        try:
            outcome = pickle_load(result)[0] if result.exists() else None
        except Exception:  # a pickle cut short by a kill: the job did not end normally
            outcome = None
        if outcome == "success":
            return JobState.COMPLETED
        if outcome == "error" or (job_dir / ENDED_RECORD).exists():
            return JobState.FAILED
        return JobState.UNKNOWN

    def _alive(self, job_id: str) -> bool:
        job = self._jobs.get(job_id)
        if job is None:
            return job_id.isdigit() and self._is_our_job(int(job_id))
        state = job.state  # our child: polling reaps it, so its pid stays ours until now
        if state == "RUNNING":
            return True
        with contextlib.suppress(OSError):  # a full disk: the job reads UNKNOWN later, and runs again
            (self.folder / job_id / ENDED_RECORD).write_text(f"{state}\n")
        del self._jobs[job_id]
        return False

    def _is_our_job(self, pid: int) -> bool:
        """A live submitit process started for this folder (a pid alone may have been reused)."""
        cmdline = _submitit_cmdline(pid)
        return cmdline is not None and os.fsencode(self.folder.absolute() / "%j") in cmdline

    def cancel(self, job_ids: list[str]) -> None:
        """SIGTERM to each live job (its controller forwards it to the task: the worker kills its
        trial's process group on the way out), then SIGKILL, after ``kill_wait_s``, to the tasks of
        jobs still running, as Slurm does after its KillWait. Returns once every job has ended."""
        live = [j for j in job_ids if self._alive(j)]
        for job_id in live:
            (self.folder / job_id / CANCELLED_MARKER).touch()  # first: a cancelled job never reads FAILED
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(job_id), signal.SIGTERM)
        deadline = time.monotonic() + float(self.cfg.kill_wait_s)
        while (live := [j for j in live if self._alive(j)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        if live:
            log.warning(
                "local jobs %s ignored SIGTERM for %ss; killing them", ", ".join(live), self.cfg.kill_wait_s
            )
            for pid, environ in _submitit_processes():
                if environ.get("SUBMITIT_LOCAL_JOB_ID") in live:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)  # the task; its controller then ends by itself
            deadline = time.monotonic() + 10
            while any(self._alive(j) for j in live) and time.monotonic() < deadline:
                time.sleep(0.1)

    def dry_run(self, shape: Shape, n_trials: int) -> str:
        why = "scheduler.max_parallel" if self.cfg.max_parallel else _capacity_reason(shape)
        controller = shlex.join([sys.executable, "-m", "submitit.local._local", str(self.folder / "%j")])
        return "\n".join([
            f"scheduler=local: {n_trials} trials as processes on this machine, at most "
            f"{self.capacity(shape)} at a time ({why}).",
            f"Each trial: {shape.cpus} CPUs, {shape.gpus} GPUs, a time limit of {math.ceil(shape.time_limit_s / 60)} "
            "min (the worker's own limits come first); hpc_executor.worker.run_trial under",
            f"  {controller}",
            f"Cancel: SIGTERM, then SIGKILL after scheduler.kill_wait_s={self.cfg.kill_wait_s}s.",
        ])  # fmt: skip


def _call_marked(token: str, fn: Callable[..., Any], *args: Any) -> Any:
    """In the job: leave the call's token in the job's folder, where ``find_call`` finds it after the
    job (and its environment) is gone, then run the call."""
    write_atomic(submitit.JobEnvironment().paths.folder / CALL_MARKER, token)
    return fn(*args)


def _capacity_reason(shape: Shape) -> str:
    cpus = f"{os.cpu_count() or 1} CPUs / {max(1, shape.cpus)} per trial"
    return f"{cpus}; {len(local_gpu_ids())} GPUs / {shape.gpus} per trial" if shape.gpus else cpus


def _free_gpus(shape: Shape, n_jobs: int) -> list[tuple[int, ...]]:
    """GPUs of their own for ``n_jobs`` jobs of this shape: this machine's GPUs that no live local job
    (of any run) holds, in order. submitit would give every job the first ``shape.gpus``; a job for
    which too few are free (or whose GPUs are named by UUID) gets those, with a warning."""
    if not shape.gpus:
        return [()] * n_jobs
    held = {
        device
        for _, environ in _submitit_processes()
        if environ.get("SUBMITIT_EXECUTOR") == "local"
        for device in environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    }
    free = [int(d) for d in local_gpu_ids() if d.isdigit() and d not in held]
    assigned: list[tuple[int, ...]] = []
    for _ in range(n_jobs):
        mine, free = tuple(free[: shape.gpus]), free[shape.gpus :]
        if len(mine) < shape.gpus:
            log.warning("no %d free GPUs for a local job; it shares the first %d", shape.gpus, shape.gpus)
            mine = ()
        assigned.append(mine)
    return assigned


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
        if not entry.name.isdigit() or _submitit_cmdline(int(entry.name)) is None:
            continue
        try:
            raw = (entry / "environ").read_bytes()
        except OSError:
            continue
        pairs = (item.partition(b"=") for item in raw.split(b"\0") if item)
        yield int(entry.name), {k.decode(errors="replace"): v.decode(errors="replace") for k, _, v in pairs}


def _submitit_cmdline(pid: int) -> bytes | None:
    """The command line of a live (not zombie) submitit process, else None."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    zombie = any(line.startswith("State:") and "Z" in line.split()[1] for line in status.splitlines())
    return None if zombie or b"submitit" not in cmdline else cmdline


def local_gpu_ids() -> list[str]:
    """This machine's GPUs as CUDA_VISIBLE_DEVICES names them: the driver's own CUDA_VISIBLE_DEVICES
    where set, else one index per GPU nvidia-smi lists."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [str(i) for i in range(len(out.stdout.strip().splitlines()))] if out.returncode == 0 else []
