"""Trials as Slurm array jobs, through submitit's SlurmExecutor.

* Packing: every trial of one resource shape goes out as one array (``--array=0-N%P``). A 1-GPU
  trial asks for one GPU, so Slurm packs eight to an 8-GPU node with distinct
  ``CUDA_VISIBLE_DEVICES``; an 8-GPU trial takes a whole node and the environment's run command
  (``torchrun --nproc_per_node={gpus}``) spreads it over the node's GPUs.
* States: one ``sacct`` call per poll for every live job, whatever their number, mapped to
  ``JobState`` by one table. A failing ``sacct`` raises ``SchedulerQueryError``; the driver logs it
  and polls again later, deciding nothing from a missing answer. A job killed from outside
  (SIGKILL) reads FAILED, one stopped by ``cancel`` (``scancel``) CANCELLED, as on the local backend.
* Re-attach: job ids live in the ledger, and ``states`` needs nothing else, so a restarted driver
  follows the jobs its predecessor submitted.
"""

from __future__ import annotations

import getpass
import logging
import math
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast

import submitit
from omegaconf import OmegaConf
from submitit.slurm.slurm import _make_sbatch_string

from hpc_executor.config import SlurmSchedulerConfig
from hpc_executor.errors import HpcExecutorError
from hpc_executor.scheduling.base import JobState, Scheduler, SchedulerQueryError, Shape
from hpc_executor.worker import run_trial

log = logging.getLogger(__name__)

# Slurm's job states (sacct's State column, first word) -> ours. REQUEUED and friends mean the job
# will run again: for the driver it is pending.
SLURM_STATES: dict[str, JobState] = {
    "PENDING": JobState.PENDING,
    "CONFIGURING": JobState.PENDING,
    "REQUEUED": JobState.PENDING,
    "REQUEUE_FED": JobState.PENDING,
    "REQUEUE_HOLD": JobState.PENDING,
    "RESIZING": JobState.PENDING,
    "SUSPENDED": JobState.PENDING,
    "RUNNING": JobState.RUNNING,
    "COMPLETING": JobState.RUNNING,
    "STAGE_OUT": JobState.RUNNING,
    "SIGNALING": JobState.RUNNING,
    "COMPLETED": JobState.COMPLETED,
    "FAILED": JobState.FAILED,
    "BOOT_FAIL": JobState.FAILED,
    "DEADLINE": JobState.TIMEOUT,
    "TIMEOUT": JobState.TIMEOUT,
    "CANCELLED": JobState.CANCELLED,
    "REVOKED": JobState.CANCELLED,
    "SPECIAL_EXIT": JobState.FAILED,
    "PREEMPTED": JobState.PREEMPTED,
    "NODE_FAIL": JobState.NODE_FAIL,
    "OUT_OF_MEMORY": JobState.OUT_OF_MEMORY,
}

SACCT_FIELDS = "JobID,State,NodeList"
# "123_4" (one task), "123_[5-9%8]" or "123_[5,7-9]" (tasks still pending), "123" (not an array)
_JOB_ID = re.compile(r"^(?P<job>\d+)(?:_(?:(?P<task>\d+)|\[(?P<range>[^\]]+)\]))?$")


def parse_sacct(text: str, fields: str = SACCT_FIELDS) -> dict[str, JobState]:
    """``sacct -X --parsable2 -o <fields>`` output -> {job id: state}; pending array ranges are
    expanded into one entry per task. A header line, if present, says where the columns are."""
    columns = fields.split(",")
    states: dict[str, JobState] = {}
    for line in text.splitlines():
        values = line.strip().split("|")
        if values[0] == "JobID":
            columns = values
            continue
        row = dict(zip(columns, values, strict=False))
        match = _JOB_ID.match(row.get("JobID", ""))
        if match is None or "State" not in row:  # job steps ("123.batch"), blank or foreign lines
            continue
        words = row["State"].split()
        state = SLURM_STATES.get(words[0].rstrip("+"), JobState.UNKNOWN) if words else JobState.UNKNOWN
        if match["range"]:
            for task in _expand_range(match["range"]):
                states[f"{match['job']}_{task}"] = state
        elif match["task"] is not None:
            states[f"{match['job']}_{match['task']}"] = state
        else:
            states[match["job"]] = state
    return states


def _expand_range(spec: str) -> Iterable[int]:
    for part in spec.split("%")[0].split(","):
        lo, _, hi = part.partition("-")
        yield from range(int(lo), int(hi or lo) + 1)


class SlurmScheduler(Scheduler):
    config_class = SlurmSchedulerConfig

    def capacity(self, shape: Shape) -> int | None:
        # Slurm queues (max_array_parallel caps an array's running tasks); max_parallel caps what
        # this run has in Slurm's queue at once, for a site that limits queued jobs per user
        return int(self.cfg.max_parallel) or None

    def sbatch_parameters(self, shape: Shape) -> dict[str, Any]:
        """submitit parameters for one trial of this shape on this site."""
        c = self.cfg
        cpus = shape.cpus
        mem_gb = shape.mem_gb
        if shape.gpus and c.cpus_per_gpu:
            cpus = max(cpus, c.cpus_per_gpu * shape.gpus)
        if shape.gpus and c.mem_gb_per_gpu:
            mem_gb = max(mem_gb, c.mem_gb_per_gpu * shape.gpus)
        if shape.gpus > c.gpus_per_node:
            raise HpcExecutorError(
                f"a trial asks for {shape.gpus} GPUs but nodes have scheduler.gpus_per_node={c.gpus_per_node}; "
                "multi-node trials are not supported"
            )
        time_min = c.time_limit_min or math.ceil(shape.time_limit_s / 60) + c.time_margin_min
        params: dict[str, Any] = {
            "job_name": c.job_name,
            "time": int(time_min),
            "nodes": 1,
            "ntasks_per_node": 1,
            "cpus_per_task": int(cpus),
            "mem": f"{int(mem_gb)}GB",
            "signal_delay_s": 30,
            "setup": list(c.setup),
            "additional_parameters": dict(
                cast(dict[str, Any], OmegaConf.to_container(c.additional_parameters))
            ),
        }
        if shape.gpus:
            params["gpus_per_node"] = shape.gpus
        if shape.gpus == c.gpus_per_node:
            params["exclusive"] = True  # a whole-node trial: nothing else shares its node
        for key in ("partition", "account", "qos", "constraint"):
            if c.get(key):
                params[key] = c[key]
        if c.max_array_parallel:
            params["array_parallelism"] = int(c.max_array_parallel)
        return params

    def submit(
        self, trial_dirs: list[str], shape: Shape, token: str | None = None
    ) -> list[tuple[str, int | None]]:
        executor = submitit.SlurmExecutor(folder=self.folder / "%j")
        params = self.sbatch_parameters(shape)
        if token:
            params["job_name"] = self.submission_name(token)
        executor.update_parameters(**params)
        jobs = executor.map_array(run_trial, trial_dirs)
        assignments = []
        for job in jobs:
            _, _, index = job.job_id.partition("_")
            assignments.append((job.job_id, int(index) if index else None))
        log.info(
            "submitted %d trials as Slurm job %s", len(jobs), jobs[0].job_id.split("_")[0] if jobs else "-"
        )
        return assignments

    def submission_name(self, token: str) -> str:
        """The job name an array submitted under ``token`` carries: how a later driver finds it."""
        return f"{self.cfg.job_name}-{token}"

    def find_submitted(
        self, submissions: dict[str, list[str]], since: float
    ) -> dict[str, tuple[str, int | None]]:
        """By job name: squeue for the jobs still queued or running (slurmctld knows them at once),
        sacct for those that ended already; each asked once for every token."""
        names = {self.submission_name(token): dirs for token, dirs in submissions.items()}
        start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(since - 60))
        queries = [
            ["squeue", "-h", "-r", "-o", "%i|%j", f"--name={','.join(names)}"],
            ["sacct", "-X", "--parsable2", "--noheader", "-o", "JobID,JobName", "-S", start,
             f"--name={','.join(names)}"],
        ]  # fmt: skip
        arrays: dict[str, str] = {}  # job name -> its array (or plain) job id
        for cmd in queries:
            for line in _ask(cmd).splitlines():
                job_id, _, name = line.strip().partition("|")
                if name in names and (match := _JOB_ID.match(job_id)):
                    arrays[name] = match["job"]
        found: dict[str, tuple[str, int | None]] = {}
        for name, array in arrays.items():
            dirs = names[name]
            if len(dirs) == 1:  # submitit sends a single trial as a plain job, not an array
                found[dirs[0]] = (array, None)
            else:
                found.update({d: (f"{array}_{i}", i) for i, d in enumerate(dirs)})
        return found

    def submit_call(self, fn: Callable[..., Any], args: tuple[Any, ...], shape: Shape, job_name: str,
                    token: str) -> str:  # fmt: skip
        executor = submitit.SlurmExecutor(folder=self.folder / "%j")
        name = f"{job_name}-{token}"  # readable, and found by its end
        params = self.sbatch_parameters(shape) | {"job_name": name}
        params.pop("array_parallelism", None)
        executor.update_parameters(**params)
        job = executor.submit(fn, *args)
        log.info("submitted %s as Slurm job %s", name, job.job_id)
        return job.job_id

    def find_call(self, token: str, since: float) -> str | None:
        """By the job name's end (the caller's name is not known here): squeue for this user's queued
        and running jobs, sacct for those that ended since ``since``."""
        start = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(since - 60))
        queries = [
            ["squeue", "-h", "-o", "%i|%j", "-u", getpass.getuser()],
            ["sacct", "-X", "--parsable2", "--noheader", "-o", "JobID,JobName", "-S", start],
        ]
        for cmd in queries:
            for line in _ask(cmd).splitlines():
                job_id, _, name = line.strip().partition("|")
                if name.endswith(f"-{token}") and (match := _JOB_ID.match(job_id)):
                    return match["job"]
        return None

    def states(self, job_ids: list[str]) -> dict[str, JobState]:
        if not job_ids:
            return {}
        parents = sorted({j.split("_")[0] for j in job_ids}, key=int)
        cmd = ["sacct", "-X", "--parsable2", "--noheader", "-o", SACCT_FIELDS, "-j", ",".join(parents)]
        known = parse_sacct(_ask(cmd))
        return {j: known.get(j, JobState.UNKNOWN) for j in job_ids}

    def cancel(self, job_ids: list[str]) -> None:
        if job_ids:
            subprocess.run(["scancel", *job_ids], capture_output=True, text=True, timeout=60)

    def dry_run(self, shape: Shape, n_trials: int) -> str:
        """The sbatch script an array of ``n_trials`` trials of this shape would be submitted with."""
        return sbatch_script(self.sbatch_parameters(shape), self.folder / "%j", n_trials)


def _ask(cmd: list[str]) -> str:
    """A Slurm query's output; SchedulerQueryError when it cannot be had."""
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SchedulerQueryError(f"{cmd[0]} failed: {exc}") from exc
    if proc.returncode != 0:
        raise SchedulerQueryError(f"{cmd[0]} exited {proc.returncode}: {proc.stderr.strip()[:300]}")
    return proc.stdout


def sbatch_script(params: dict[str, Any], folder: Path, n_trials: int, python: str = sys.executable) -> str:
    """submitit's own sbatch rendering (the text it submits), for dry runs and reference tests."""
    command = " ".join([shlex.quote(python), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    return _make_sbatch_string(
        command=command, folder=folder, map_count=n_trials if n_trials > 1 else None, **params
    )
