"""Values that compose but cannot work, found before anything is started or written.

``bound_problems`` judges the composed config (``preflight`` lists what it finds with its other
problems). ``command_line_problems`` judges the overrides before Hydra sees them, for what Hydra
would act on first: it creates the run directory ``outputs/<run_name>`` before any code of ours
runs, and a ``hydra.searchpath`` entry that does not exist is only a warning to it (a typo then runs
the built-in environment of that name, or none).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

# The lowest value that makes sense, per key; below it a run could do nothing (model.samples=0
# implements no idea) or nothing sensible (a negative count of retries).
LOWER_BOUNDS: dict[str, int] = {
    "model.samples": 1,
    "model.revisions": 0,
    "model.ideator.max_concurrency": 1,
    "model.implementer.max_concurrency": 1,
    "model.ideator.max_tokens": 1,
    "model.implementer.max_tokens": 1,
    "model.ideator.max_retries": 0,
    "model.implementer.max_retries": 0,
    "model.ideator.latency_s": 0,
    "model.implementer.latency_s": 0,
    "strategy.epochs": 1,
    "strategy.batch_size": 1,
    "strategy.call_size": 1,
    "strategy.max_shown": 0,
    "env.budget_s": 1,
    "env.hard_limit_s": 1,
    "env.eval_limit_s": 1,
    "scheduler.max_parallel": 0,
}


def bound_problems(cfg: DictConfig) -> list[str]:
    """One line per value below its bound (``LOWER_BOUNDS``), and a ``budget_usd`` that is not positive."""
    problems = []
    for key, lowest in LOWER_BOUNDS.items():
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, (int, float)) and value < lowest:
            problems.append(f"{key}={value} is below its lowest sensible value {lowest}; set {key}>={lowest}")
    budget = OmegaConf.select(cfg, "budget_usd", default=None)
    if budget is not None and budget <= 0:
        problems.append(
            f"budget_usd={budget}: give a positive number of dollars, or budget_usd=null for no budget"
        )
    return problems


def run_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a directory directly under outputs/ (or multirun/...), or None."""
    if name and not name.startswith(".") and not any(c in "/\\" or ord(c) < 0x20 for c in name):
        return None
    return (
        f"run_name={name!r} is not a plain directory name: the run directory is outputs/<run_name>, so run_name "
        "may not be empty, start with '.', or hold '/', '\\' or control characters (e.g. run_name=tiny-try2)"
    )


def searchpath_problem(entry: str) -> str | None:
    """Why a ``hydra.searchpath`` entry names no config directory, or None."""
    scheme, sep, where = entry.partition("://")
    if not sep:
        scheme, where = "file", entry
    if scheme == "file" and not Path(where).is_dir():
        return f"hydra.searchpath entry {entry!r}: no directory {where!r}; give an existing config directory"
    if scheme == "pkg":
        try:
            found = importlib.util.find_spec(where.replace("/", "."))
        except (ImportError, ValueError):
            found = None
        if found is None:
            return f"hydra.searchpath entry {entry!r}: no Python package {where!r} to read configs from"
    return None


def command_line_problems(overrides: list[str]) -> list[str]:
    """What is wrong in ``run_name=`` and ``hydra.searchpath=`` overrides. Overrides Hydra cannot parse,
    and values with interpolations (judged once composed), are left to Hydra and to preflight."""
    problems = []
    parser = OverridesParser.create()
    for text in overrides:
        try:
            override = parser.parse_override(text)
        except HydraException:
            continue
        key = override.key_or_group
        if key == "run_name":
            names = override.sweep_string_iterator() if override.is_sweep_override() else [override.value()]
            problems += [p for n in names if "${" not in str(n) and (p := run_name_problem(str(n)))]
        elif key == "hydra.searchpath" and isinstance(entries := override.value(), list):
            problems += [p for e in entries if "${" not in str(e) and (p := searchpath_problem(str(e)))]
    return problems
