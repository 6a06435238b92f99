"""GPU-hours: what each trial held (runtime x GPUs), per epoch and per run, and the run's GPU budget.

Every result that lands in the ledger gets a row of ``trial_usage`` in the same transaction: when
the trial started and ended running (wall-clock, from the worker's own clock, so a steady-state
driver can compute utilisation from the intervals), its runtime, its GPUs and its GPU-hours.
Results that never ran (an idea without a diff) hold no GPU and count zero.

``budget_gpu_hours`` stops new trials the way ``budget_usd`` stops new calls: once the GPU-hours of
finished trials reach it, no trial is created or submitted; trials already running finish (so a run
may overshoot by what is in flight then), and the same command with a larger budget goes on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hpc_executor.errors import ConfigError

if TYPE_CHECKING:
    from hpc_executor.ledger import Ledger

USAGE_SCHEMA = """
CREATE TABLE IF NOT EXISTS trial_usage (
    trial_id TEXT PRIMARY KEY, gpus INTEGER NOT NULL, runtime_s REAL NOT NULL, started_at REAL,
    ended_at REAL, gpu_hours REAL NOT NULL);
"""
INSERT_USAGE = "INSERT OR IGNORE INTO trial_usage VALUES (?, ?, ?, ?, ?, ?)"


def trial_gpus(provenance: dict[str, Any]) -> int:
    """The GPUs a trial held: what it asked for (recorded when it was created), else what it saw."""
    if provenance.get("gpus_per_trial") is not None:
        return int(provenance["gpus_per_trial"])
    visible = provenance.get("cuda_visible_devices") or ""
    return len([d for d in str(visible).split(",") if d.strip()])


def usage_row(
    trial_id: str, runtime_s: float | None, provenance: dict[str, Any]
) -> tuple[str, int, float, float | None, float | None, float]:
    """(trial_id, gpus, runtime_s, started_at, ended_at, gpu_hours) of one result."""
    started = provenance.get("started_at")
    runtime = float(runtime_s or 0.0)
    if started is None:  # never ran (no diff applied): it held nothing
        return (trial_id, 0, runtime, None, None, 0.0)
    gpus = trial_gpus(provenance)
    return (trial_id, gpus, runtime, float(started), float(started) + runtime, gpus * runtime / 3600)


def spent(ledger: Ledger) -> float:
    """GPU-hours of every finished trial of the run, all sessions together."""
    (total,) = ledger.db.execute("SELECT coalesce(sum(gpu_hours), 0.0) FROM trial_usage").fetchone()
    return float(total)


def by_epoch(ledger: Ledger) -> list[dict[str, Any]]:
    """Per epoch and kind of trial (search, baseline_repeat, confirm): trials, GPU-hours, runtime."""
    rows = ledger.db.execute(
        "SELECT t.epoch, coalesce(t.purpose, 'search') AS purpose, count(*) AS trials,"
        " sum(u.gpu_hours) AS gpu_hours, sum(u.runtime_s) AS runtime_s"
        " FROM trial_usage u JOIN trials t USING (trial_id) GROUP BY t.epoch, purpose ORDER BY t.epoch, purpose"
    )
    return [dict(r) for r in rows]


class GpuBudget:
    """The run's GPU-hour budget, asked before trials are created and submitted."""

    def __init__(self, budget_gpu_hours: float | None) -> None:
        if budget_gpu_hours is not None and budget_gpu_hours <= 0:
            raise ConfigError(
                f"budget_gpu_hours must be a positive number of GPU-hours, or null for none; got {budget_gpu_hours}"
            )
        self.budget = budget_gpu_hours

    def exhausted(self, ledger: Ledger) -> bool:
        """True once finished trials used the budget: no new trial may be created or submitted."""
        return self.budget is not None and spent(ledger) >= self.budget

    def describe(self, ledger: Ledger) -> str:
        used = spent(ledger)
        return f"{used:.3f} GPU-hours used" + (f" of {self.budget:g}" if self.budget is not None else "")
