"""hpc-executor: execution-grounded automated AI research on a Slurm cluster."""

from hpc_executor.types import Idea, Patch, Result, Status, Trial

__all__ = ["Idea", "Patch", "Result", "Status", "Trial"]
__version__ = "0.1.0"
