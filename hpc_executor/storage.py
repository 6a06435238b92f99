"""A full or read-only disk: told as what it is and what to do, never as a traceback, and never
charged to an idea. The ledger commits every step in a transaction, so a write the disk refused is
simply not recorded, and the same command, run again once there is space, goes on from there."""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

from hpc_executor.sandbox import tail

_FULL = {errno.ENOSPC, errno.EDQUOT}
_NOT_WRITABLE = {errno.EROFS, errno.EACCES, errno.EPERM}
# what a training script prints when the disk filled under it (Python, SQLite, PyTorch's writer)
_FULL_IN_LOG = (
    "No space left on device",
    "Disk quota exceeded",
    "database or disk is full",
    "file write failed",
)
_LOW_SPACE_BYTES = 64 * 2**20  # "full": less free than this, or than 1% of the disk


def storage_problem(exc: BaseException) -> str | None:
    """What the disk did, when a full or read-only disk is why ``exc`` was raised; else None."""
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc)
        if "disk is full" in text:
            return "the disk is full"
        if "readonly database" in text or "unable to open database file" in text:
            return "it is read-only (or not writable by this user)"
    if isinstance(exc, OSError) and exc.errno in _FULL:
        return "the disk is full (or the quota is reached)"
    if isinstance(exc, OSError) and exc.errno in _NOT_WRITABLE:
        return "it is read-only (or not writable by this user)"
    return None


def storage_message(run_dir: Path, problem: str) -> str:
    return (
        f"the run directory {run_dir} cannot be written: {problem}. Nothing recorded is lost: the ledger "
        "keeps every step that finished. Free some space (or raise the quota, or make the directory "
        "writable), then run the same command again: it goes on where it stopped."
    )


def check_writable(run_dir: Path) -> None:
    """Raise the OSError a full or read-only disk gives, before anything is started there."""
    run_dir.mkdir(parents=True, exist_ok=True)
    probe = run_dir / f".write-probe.{os.getpid()}"
    try:
        with open(probe, "wb") as f:  # some bytes: an empty file fits on a full disk
            f.write(b"\0" * 65536)
            f.flush()
            os.fsync(f.fileno())
    finally:
        probe.unlink(missing_ok=True)


def mentions_full_disk(log_tail: str) -> bool:
    return any(sign in log_tail for sign in _FULL_IN_LOG)


def ran_out_of_space(log_path: Path, directory: Path) -> bool:
    """Whether a process that failed did so because the disk of ``directory`` filled: its log says
    so, or hardly any space is left there."""
    if mentions_full_disk(tail(log_path)):
        return True
    try:
        stat = os.statvfs(directory)
    except OSError:
        return False
    low = min(_LOW_SPACE_BYTES, stat.f_blocks * stat.f_frsize // 100)  # 1% of a small disk
    return stat.f_bavail * stat.f_frsize < low
