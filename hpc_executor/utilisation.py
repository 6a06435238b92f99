"""GPU-slot utilisation of a run: what share of its slots' time trials held, from the first trial's start.

A slot is room for one trial of the run's resource shape (8 one-GPU trials on an 8-GPU node: 8
slots). A trial holds its slot from the moment its worker started (its started file) until it
ended (its result, or when the driver settled it), as the ledger records in ``trials.started_at`` /
``ended_at``. Over the window from the first start to the last end (or to now, while a trial
still runs), the busy share is busy slot-seconds / (slots x window); more trials at once than
slots (a wrong slot count, a requeue's overlap) count as full, never above it. Time before the
first start (the first ideas being written) is not counted: it is the same in every mode.

    from hpc_executor import analysis
    u = analysis.utilisation("outputs/tiny-offline-evolution-seed0")
    u.busy_share, u.idle_slot_s, u.completed_per_hour
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from omegaconf import OmegaConf

from hpc_executor.errors import ConfigError
from hpc_executor.ledger import load
from hpc_executor.scheduling import Shape, make_scheduler, recorded_config


@dataclass(frozen=True)
class Utilisation:
    """Slot time over a run's window; shares and rates are NaN while no trial has started."""

    slots: int
    trials_started: int  # trials that held a slot (ended or still running)
    trials_completed: int  # of those, the ones that ended (any status: a crash frees its slot too)
    running: int  # still running at the window's end
    first_start: float | None  # wall-clock epoch seconds
    window_end: float | None
    busy_slot_s: float

    @property
    def wall_s(self) -> float:
        if self.first_start is None or self.window_end is None:
            return 0.0
        return max(0.0, self.window_end - self.first_start)

    @property
    def capacity_slot_s(self) -> float:
        return self.slots * self.wall_s

    @property
    def idle_slot_s(self) -> float:
        return self.capacity_slot_s - self.busy_slot_s

    @property
    def busy_share(self) -> float:
        return self.busy_slot_s / self.capacity_slot_s if self.capacity_slot_s else math.nan

    @property
    def idle_share(self) -> float:
        return 1.0 - self.busy_share

    @property
    def completed_per_hour(self) -> float:
        return self.trials_completed / (self.wall_s / 3600) if self.wall_s else math.nan


def from_intervals(
    intervals: Iterable[tuple[float, float | None]], slots: int, until: float | None = None
) -> Utilisation:
    """Utilisation of ``slots`` slots held over (start, end) intervals; end None: still running.

    The window runs from the first start to ``until``: by default the last end, or now while an
    interval is still open (pass ``until=time.time()`` for a live run between trials, whose
    waiting is idle time too). Intervals are clipped to the window; an end before its start (the
    clocks of two nodes) counts as no time."""
    if slots < 1:
        raise ConfigError(f"a run has at least one slot; got slots={slots}")
    spans = list(intervals)
    if not spans:
        return Utilisation(slots, 0, 0, 0, None, None, 0.0)
    first = min(start for start, _ in spans)
    if until is None:
        ends = [end for _, end in spans]
        until = time.time() if None in ends else max(end for end in ends if end is not None)
    events: list[tuple[float, int]] = []
    started = completed = 0
    for start, end in spans:
        if start > until:
            continue
        started += 1
        completed += end is not None and end <= until
        end = until if end is None else min(end, until)
        if end > start:
            events += [(start, 1), (end, -1)]
    busy, active, previous = 0.0, 0, first
    for at, change in sorted(events):  # at the same instant, ends come before starts
        busy += min(active, slots) * (at - previous)
        active, previous = active + change, at
    return Utilisation(slots, started, completed, started - completed, first, until, busy)


def trial_intervals(trials: pd.DataFrame) -> list[tuple[float, float | None]]:
    """(started_at, ended_at) of every trial that started, from the ledger's trials frame (no end:
    still running)."""
    started = trials[trials.started_at.notna()]
    return [
        (float(r.started_at), None if pd.isna(r.ended_at) else float(r.ended_at))
        for r in started.itertuples()
    ]


def slots_of(config: Mapping[str, Any]) -> int:
    """How many trials of the run's shape can run at once, from its recorded config: the
    scheduler's ``max_parallel`` when set; for scheduler=local, what the local scheduler allows on
    this host (its cores and GPUs); for scheduler=slurm, one node's GPUs (``gpus_per_node`` over
    the GPUs per trial, at most ``max_array_parallel``). A run on several nodes: pass ``slots``."""
    cfg = OmegaConf.create(dict(config))
    sched, res = recorded_config(cfg.scheduler), cfg.env.resources
    if sched.get("max_parallel"):
        return int(sched.max_parallel)
    shape = Shape(int(res.gpus), int(res.cpus), int(res.mem_gb), time_limit_s=0)
    with tempfile.TemporaryDirectory(prefix="hpcx-slots-") as tmp:
        capacity = make_scheduler(sched, Path(tmp)).capacity(shape)
    if capacity is not None:
        return capacity
    cap = int(sched.get("max_array_parallel") or 0)
    if shape.gpus:
        per_node = max(1, int(sched.gpus_per_node) // shape.gpus)
        return min(per_node, cap) if cap else per_node
    if cap:
        return cap
    raise ConfigError(
        "this run's slots cannot be told from its config (scheduler=slurm, trials without GPUs, no "
        "max_parallel or max_array_parallel): pass slots=<trials that fit at once>"
    )


def utilisation(run: str | Path, slots: int | None = None, until: float | None = None) -> Utilisation:
    """GPU-slot utilisation of one run (read as ``ledger.load`` reads it: any host). ``slots``:
    default from the run's config (``slots_of``); ``until``: see ``from_intervals``."""
    frames = load(run)
    if slots is None:
        recorded = frames["meta"].set_index("key").value.get("config")
        if recorded is None:
            raise ConfigError(f"{run} has no recorded config (it never started): pass slots=")
        slots = slots_of(yaml.safe_load(recorded))
    return from_intervals(trial_intervals(frames["trials"]), slots, until)
