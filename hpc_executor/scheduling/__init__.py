"""Where trials run: one interface (``base``), two backends (``local``, ``slurm``)."""

from hpc_executor.scheduling.base import (
    CallRecord,
    JobState,
    Scheduler,
    SchedulerQueryError,
    Shape,
    make_scheduler,
    recorded_call,
    recorded_config,
    submit_recorded_call,
)
from hpc_executor.scheduling.local import LocalScheduler
from hpc_executor.scheduling.slurm import SlurmScheduler, parse_sacct, sbatch_script

__all__ = [
    "CallRecord",
    "JobState",
    "LocalScheduler",
    "Scheduler",
    "SchedulerQueryError",
    "Shape",
    "SlurmScheduler",
    "make_scheduler",
    "parse_sacct",
    "recorded_call",
    "recorded_config",
    "sbatch_script",
    "submit_recorded_call",
]
