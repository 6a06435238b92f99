"""Applying a diff under a wall-time limit.

Diffs are applied outside the sandbox, as trusted code (the implementer's check and the worker), to
text an LLM wrote. The parser is meant to be linear, but the next regression (or a git that hangs)
must not stall a driver or a node: the apply runs in a forked child that is killed at the limit,
and the diff is then rejected with a reason that says so.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
from multiprocessing.connection import Connection
from pathlib import Path

from hpc_executor.errors import PatchFailed, PatchRejected
from hpc_executor.patching import WorkspacePolicy, apply_diff

APPLY_LIMIT_S = 60.0  # a diff of thousands of lines applies in well under a second


def apply_diff_in_time(
    text: str, workspace: Path, policy: WorkspacePolicy, limit_s: float = APPLY_LIMIT_S
) -> str:
    """``apply_diff`` that gives up after ``limit_s`` seconds (``PatchRejected``: never applied)."""
    # fork: the child starts at once with this process's modules, and nothing of it is shared back
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_apply_and_send, args=(send, text, workspace, policy), daemon=True)
    child.start()
    send.close()
    try:
        if not receive.poll(limit_s):
            raise PatchRejected(
                f"applying the diff took longer than {limit_s:.0f}s and was stopped (a pathological diff, or "
                "a hung git); it was not applied. Send a smaller, plain unified diff."
            )
        ok, value = receive.recv()
    except EOFError:
        raise PatchFailed(f"applying the diff died without an answer (exit code {child.exitcode})") from None
    finally:
        if child.is_alive() and child.pid:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)  # git too, if it is running
        child.join()
        receive.close()
    if ok:
        return str(value)
    raise value


def _apply_and_send(send: Connection, text: str, workspace: Path, policy: WorkspacePolicy) -> None:
    os.setpgid(0, 0)  # a group of its own, so that a kill at the limit takes git with it
    try:
        send.send((True, apply_diff(text, workspace, policy)))
    except Exception as exc:  # PatchRejected, PatchFailed, NotADiff and bugs alike: raised in the caller
        send.send((False, exc))
