"""The run's dollar budget for LLM calls.

Calls run on many threads, so the spend is a locked counter that every finished call adds to, and
that is asked before each new call starts. Calls already in flight when the budget is reached still
finish (and are paid for), so a run may overshoot by at most what is in flight then."""

from __future__ import annotations

import threading

from hpc_executor.errors import ConfigError


class CostMeter:
    def __init__(self, budget_usd: float | None, spent_usd: float = 0.0) -> None:
        if budget_usd is not None and budget_usd <= 0:
            raise ConfigError(
                f"budget_usd must be a positive number of dollars, or null for no budget; got {budget_usd}"
            )
        self.budget_usd = budget_usd
        self._spent = spent_usd  # what earlier sessions of this run spent, from the ledger
        self._lock = threading.Lock()

    @property
    def spent_usd(self) -> float:
        with self._lock:
            return self._spent

    def add(self, cost_usd: float) -> None:
        with self._lock:
            self._spent += cost_usd

    def exhausted(self) -> bool:
        """True once the spend reached the budget: no new call may start."""
        return self.budget_usd is not None and self.spent_usd >= self.budget_usd

    def describe(self) -> str:
        if self.budget_usd is None:
            return f"{usd(self.spent_usd)} spent (no budget set)"
        return f"{usd(self.spent_usd)} of {usd(self.budget_usd)} spent"


def usd(amount: float) -> str:
    """Dollars to the cent, with more digits below a dollar so that test runs and small budgets show."""
    if amount < 0:  # a saving can be negative: cache writes that nothing read
        return "-" + usd(-amount)
    return f"${amount:,.2f}" if amount >= 1 else f"${amount:.4f}"
