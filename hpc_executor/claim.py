"""A trial directory belongs to one job: the first to claim it runs the trial, any other exits.

Two launches of one trial (a driver killed while it submitted, then resumed) would otherwise share
the directory and delete each other's workspace. The claim is ``claim.json``, created atomically
with ``link(2)`` (which fails if the name exists, on NFS too, unlike a plain ``open``), naming the
job that holds it. A Slurm requeue of the same job (same job id, same array task) holds the claim
already and runs again; the driver follows whichever job the claim names.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import submitit

from hpc_executor.trial_dir import CLAIM_FILE


def current_job_id() -> str:
    """This job's id as the scheduler (and the ledger) spells it: ``123_4`` for a Slurm array task,
    the controller's pid for a local job; ``host:pid`` when run by hand, outside any job."""
    try:
        return str(submitit.JobEnvironment().job_id)
    except RuntimeError:  # not a submitit job
        return f"{socket.gethostname()}:{os.getpid()}"


def claim_trial(trial_dir: Path, job_id: str) -> bool:
    """Claim the trial for ``job_id``; False when another job holds it (then touch nothing)."""
    claim = trial_dir / CLAIM_FILE
    tmp = trial_dir / f".{CLAIM_FILE}.{socket.gethostname()}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"job_id": job_id, "host": socket.gethostname(), "pid": os.getpid()}, f)
        f.flush()
        os.fsync(f.fileno())
    try:
        os.link(tmp, claim)
        return True
    except FileExistsError:
        return claim_holder(trial_dir) == job_id
    finally:
        tmp.unlink(missing_ok=True)


def claim_holder(trial_dir: Path) -> str | None:
    """The job that claimed the trial, or None when no job has (yet)."""
    try:
        return str(json.loads((trial_dir / CLAIM_FILE).read_text())["job_id"])
    except (OSError, ValueError, KeyError, TypeError):  # absent (written whole by link(2), never torn)
        return None


def release_claim(trial_dir: Path) -> None:
    """Free the trial for a new submission (its old job was cancelled or is gone)."""
    (trial_dir / CLAIM_FILE).unlink(missing_ok=True)
