"""Where trials run: one interface (``base``), two backends (``local``, ``slurm``)."""

from hpc_executor.scheduling.base import (
    JobState,
    Scheduler,
    SchedulerQueryError,
    Shape,
    find_call_when_answered,
    make_scheduler,
    recorded_config,
)
from hpc_executor.scheduling.local import LocalScheduler
from hpc_executor.scheduling.slurm import SlurmScheduler, parse_sacct, sbatch_script

__all__ = [
    "JobState",
    "LocalScheduler",
    "Scheduler",
    "SchedulerQueryError",
    "Shape",
    "SlurmScheduler",
    "find_call_when_answered",
    "make_scheduler",
    "parse_sacct",
    "recorded_config",
    "sbatch_script",
]
