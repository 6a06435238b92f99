"""Named points where a test kills the driver: ``HPCX_CRASH_AT=<name>`` makes the process SIGKILL
itself on reaching that point, so that each window of crash consistency is tested exactly where it
opens (see tests/test_at_most_once.py). Unset, a crash point does nothing."""

from __future__ import annotations

import os
import signal

CRASH_ENV = "HPCX_CRASH_AT"


def crash_point(name: str) -> None:
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
