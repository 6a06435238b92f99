"""The small JSON files a policy backend keeps under its work directory to record what it started
(a job id, a checkpoint name) before and after starting it; written whole with ``write_atomic``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_state(path: Path) -> dict[str, Any]:
    """The record at ``path``; ``{}`` when there is none yet (or only a torn one from a crash)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
