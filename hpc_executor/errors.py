"""A small exception hierarchy. Every message says what to do next."""

from __future__ import annotations


class HpcExecutorError(Exception):
    """Base class: the driver turns these into a one-paragraph message, never a traceback."""


class ConfigError(HpcExecutorError):
    """The composed configuration cannot work (unknown choice, missing field, bad value)."""


class PreflightError(HpcExecutorError):
    """Something the run needs is missing (an API key, the environment's data); nothing was started."""


class DiffProblem(HpcExecutorError):
    """An implementer's answer that cannot become a trial's patch (one of the three below)."""


class NotADiff(DiffProblem):
    """The answer holds no diff at all (prose, an empty answer): the implementer failed, no policy was broken."""


class PatchRejected(DiffProblem):
    """A diff broke the workspace policy; it is recorded and never applied."""


class PatchFailed(DiffProblem):
    """A diff is well-formed and allowed but does not apply to the baseline."""


class LedgerError(HpcExecutorError):
    """The run directory or its ledger is missing or unreadable."""


class RunCancelled(HpcExecutorError):
    """The run was cancelled (hpc_executor.cancel, or Ctrl-C in another driver)."""
