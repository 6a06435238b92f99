"""How long a trial of the steady_mix environment holds its slot, and whether it crashes.

The duration is the environment's, drawn from a hash of the trial's id (the name of its trial
directory): the barrier and the steady driver of bench/steady_state.py create the same trial ids
for the same number of ideas, so both run exactly the same mix, whatever ideas they are shown.
The default mix: 30% crash within the first 5% of the budget; the rest run between 60% and 100%.
"""

from __future__ import annotations

import hashlib
import os
from typing import NamedTuple


class Plan(NamedTuple):
    crashes: bool
    seconds: float


def _uniform(trial_id: str, draw: str) -> float:
    digest = hashlib.sha256(f"{trial_id}:{draw}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def plan(trial_id: str, budget_s: float, environ: dict[str, str] | None = None) -> Plan:
    """The trial's fate under the mix set by STEADY_MIX_* (the environment's extra_env)."""
    env = os.environ if environ is None else environ
    crash_share = float(env.get("STEADY_MIX_CRASH_SHARE", "0.3"))
    crash_by = float(env.get("STEADY_MIX_CRASH_BY", "0.05"))
    low, high = float(env.get("STEADY_MIX_MIN", "0.6")), float(env.get("STEADY_MIX_MAX", "1.0"))
    where = _uniform(trial_id, "duration")
    if _uniform(trial_id, "crash") < crash_share:
        return Plan(True, where * crash_by * budget_s)
    return Plan(False, (low + (high - low) * where) * budget_s)
