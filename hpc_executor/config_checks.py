"""Values that compose but cannot work, found before anything is started or written.

``bound_problems`` judges the composed config (``preflight`` lists what it finds with its other
problems). ``command_line_problems`` judges the overrides before Hydra sees them, for what Hydra
would act on first: it creates the run directory ``outputs/<run_name>`` before any code of ours
runs, and a ``hydra.searchpath`` entry that does not exist is only a warning to it (a typo then runs
the built-in environment of that name, or none). It also names the valid keys when a key is
unknown, on the command line or in a config file, where Hydra names only the schema.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

CONF_DIR = (
    Path(__file__).resolve().parent.parent / "conf"
)  # the command line, its checks and the tests compose from here

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
    "strategy.ready_buffer": 0,
    # strategy=rl (absent elsewhere, so not judged there); a group of one has nothing to compare
    "strategy.steps": 1,
    "strategy.group_size": 2,
    "strategy.max_at_k": 1,
    "strategy.max_tokens": 1,
    "strategy.lora_rank": 1,
    "strategy.updates_per_step": 1,
    "env.budget_s": 1,
    "env.hard_limit_s": 1,
    "env.eval_limit_s": 1,
    "scheduler.max_parallel": 0,
}


SCHEDULES = ("barrier", "steady")  # strategy.schedule


def bound_problems(cfg: DictConfig) -> list[str]:
    """One line per value below its bound (``LOWER_BOUNDS``), an unknown ``strategy.schedule``, and a
    ``budget_usd`` that is not positive."""
    problems = []
    for key, lowest in LOWER_BOUNDS.items():
        value = OmegaConf.select(cfg, key, default=None)
        if isinstance(value, (int, float)) and value < lowest:
            problems.append(f"{key}={value} is below its lowest sensible value {lowest}; set {key}>={lowest}")
    schedule = OmegaConf.select(cfg, "strategy.schedule", default="barrier")
    if schedule not in SCHEDULES:
        problems.append(f"strategy.schedule={schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}")
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
    if not problems and (unknown := unknown_key_problem(overrides)):
        problems.append(unknown)
    return problems


def unknown_key_problem(overrides: list[str]) -> str | None:
    """A key its schema lacks (``scheduler.partiton=gpu``, or ``partition:`` in a profile of
    scheduler=local), with the keys the schema has; None when the config composes, or fails to for
    another reason (left to Hydra). The schemas must be registered (``register_configs``)."""
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            compose("search", overrides=overrides)
        return None
    except Exception as exc:  # Hydra reports anything else itself, properly
        error: BaseException | None = exc
        while error is not None and not isinstance(error, (ConfigKeyError, ConfigAttributeError)):
            error = error.__cause__ or error.__context__
        where = str(exc).split(":")[0] + ": " if str(exc).startswith("In '") else ""
    schema = getattr(error, "object_type", None)
    if not isinstance(schema, type) or not dataclasses.is_dataclass(schema):
        return None  # not an unknown key of a schema
    keys = ", ".join(f.name for f in dataclasses.fields(schema))
    return f"{where}{getattr(error, 'full_key', '?')} is not a key of {schema.__name__}; its keys are: {keys}"
