"""The scheduler interface every backend implements, and its vocabulary.

A scheduler only launches jobs and reports their states; results travel through files in the
trial directories (see ``worker``), so a driver that restarts needs nothing from the scheduler but
job ids, which the ledger keeps. Every backend passes one contract test suite
(``tests/scheduling_contract.py``): the same job ends in the same ``JobState`` on each.
"""

from __future__ import annotations

import abc
import dataclasses
import enum
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from hpc_executor.config import SchedulerConfig
from hpc_executor.crashpoints import crash_point
from hpc_executor.errors import ConfigError, HpcExecutorError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shape:
    """What one trial asks for; trials of one shape go out as one array."""

    gpus: int
    cpus: int
    mem_gb: int
    time_limit_s: int  # the worker's own limits plus a margin: the scheduler's kill is a backstop


class JobState(str, enum.Enum):
    """A job's state, the same on every backend: a job whose function returned is COMPLETED, one
    that raised, exited non-zero or was killed from outside (SIGKILL, say) is FAILED, and one
    stopped through ``Scheduler.cancel`` is CANCELLED (on Slurm, ``scancel`` by anyone)."""

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
    """One backend. ``cfg`` is checked against the backend's ``config_class`` (an unknown key is a
    ConfigError that lists the valid ones); ``folder`` holds the jobs' submitit files and logs, and
    is all a new instance needs to follow the jobs an earlier one submitted."""

    config_class: ClassVar[type[SchedulerConfig]] = SchedulerConfig

    def __init__(self, cfg: DictConfig, folder: Path) -> None:
        self.cfg = typed_config(cfg, self.config_class)
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
    def submit_call(self, fn: Callable[..., Any], args: tuple[Any, ...], shape: Shape, job_name: str,
                    token: str) -> str:  # fmt: skip
        """Run one function call as a job of this shape (a model server, say); returns its job id.
        The job carries ``token`` (recorded before) so that ``find_call`` finds it should the caller
        die before it records the id."""

    @abc.abstractmethod
    def find_call(self, token: str, since: float) -> str | None:
        """The id of the job that ``submit_call`` launched with ``token`` (not before ``since``, a
        time.time()), queued, running or ended; None when there is none. Raises SchedulerQueryError."""

    @abc.abstractmethod
    def states(self, job_ids: list[str]) -> dict[str, JobState]:
        """Current state of each job, in one query; raises SchedulerQueryError when it cannot ask."""

    @abc.abstractmethod
    def cancel(self, job_ids: list[str]) -> None:
        """Stop these jobs; each that was still queued or running ends CANCELLED. Ended or unknown
        jobs are left as they are."""

    @abc.abstractmethod
    def dry_run(self, shape: Shape, n_trials: int) -> str:
        """What submitting ``n_trials`` trials of this shape would do, without doing it."""

    def job_log(self, job_id: str) -> Path | None:
        """The job's stderr as submitit wrote it, in the job's own folder (``<folder>/<job id>/``)."""
        logs = sorted((self.folder / job_id).glob("*.err"), key=lambda p: p.stat().st_mtime)
        return logs[-1] if logs else None


# Keeps a call's {token, since, job_id} where a later driver reads it (the ledger, a state file).
CallRecord = Callable[[dict[str, Any]], None]


def submit_recorded_call(scheduler: Scheduler, fn: Callable[..., Any], args: tuple[Any, ...], shape: Shape,
                         job_name: str, record: CallRecord, crash_prefix: str) -> str:  # fmt: skip
    """``scheduler.submit_call`` with its intent recorded first: ``record`` gets the job's token
    (job_id None: a job with this token may exist) before the submission and its id at once after,
    so that ``recorded_call`` finds the job whichever line a killed driver stopped at. The crash
    points ``<crash_prefix>_before_submit`` and ``_after_submit`` open the two windows for tests."""
    token, since = uuid.uuid4().hex[:12], time.time()
    record({"token": token, "since": since, "job_id": None})
    crash_point(f"{crash_prefix}_before_submit")
    job_id = scheduler.submit_call(fn, args, shape, job_name, token=token)
    crash_point(f"{crash_prefix}_after_submit")
    record({"token": token, "since": since, "job_id": job_id})
    return job_id


def recorded_call(
    scheduler: Scheduler, saved: dict[str, Any], sleep: Callable[[float], None], poll_s: float
) -> str | None:
    """The job a ``submit_recorded_call`` record names: its id, or, when the driver was killed before
    it recorded the id, the job found by the record's token (None: it was never submitted). While
    the scheduler cannot answer, it is asked again every ``poll_s``: until it does, nobody can tell
    whether the job exists, and submitting it again may run it twice."""
    if saved.get("job_id"):
        return str(saved["job_id"])
    token, since = saved.get("token"), saved.get("since")
    if not (token and since):
        return None
    while True:
        try:
            return scheduler.find_call(str(token), float(since))
        except SchedulerQueryError as exc:
            log.warning("cannot look for the job submitted with token %s: %s; asking again", token, exc)
            sleep(poll_s)


def typed_config(cfg: DictConfig, schema: type[SchedulerConfig]) -> DictConfig:
    """``cfg`` as an instance of ``schema``: as it is when Hydra typed it already (interpolations
    keep pointing into the whole config), else merged over the schema's defaults."""
    unknown = sorted(str(key) for key in cfg if key not in {f.name for f in dataclasses.fields(schema)})
    if unknown:
        valid = ", ".join(f.name for f in dataclasses.fields(schema))
        raise ConfigError(
            f"scheduler={cfg.get('name')} has no key {', '.join(unknown)} ({schema.__name__}); "
            f"its keys are: {valid}"
        )
    if isinstance(cfg, DictConfig) and issubclass(OmegaConf.get_type(cfg) or dict, schema):
        return cfg
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"scheduler={cfg.get('name')}: {exc}") from None
    assert isinstance(merged, DictConfig)
    return merged


def recorded_config(cfg: Any) -> DictConfig:
    """A scheduler config a run recorded, with only its backend's keys: runs recorded before each
    backend had its own schema hold every backend's keys (at their defaults), which the backend's
    schema would refuse."""
    from hpc_executor.config import LocalSchedulerConfig, SlurmSchedulerConfig

    data = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    assert isinstance(data, dict)
    schema = {"local": LocalSchedulerConfig, "slurm": SlurmSchedulerConfig}.get(str(data.get("name")))
    if schema is None:
        return OmegaConf.create(data)
    keys = {f.name for f in dataclasses.fields(schema)}
    return OmegaConf.create({k: v for k, v in data.items() if k in keys})


def make_scheduler(cfg: DictConfig, folder: Path) -> Scheduler:
    """The backend ``cfg.name`` names, configured by ``cfg``. Backends are imported here, when
    asked for, so that this module imports none of them (they import it)."""
    name = cfg.get("name")
    if name == "local":
        from hpc_executor.scheduling.local import LocalScheduler

        return LocalScheduler(cfg, folder)
    if name == "slurm":
        from hpc_executor.scheduling.slurm import SlurmScheduler

        return SlurmScheduler(cfg, folder)
    raise ConfigError(f"scheduler.name={name!r} is unknown; choose scheduler=local or scheduler=slurm")
