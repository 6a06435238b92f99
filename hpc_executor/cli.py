"""The command line: ``python -m hpc_executor.search +env=tiny +model=offline``.

Reads the command line (what it lacks, in one message), composes the config with Hydra, checks
everything a run needs before any work starts (preflight), prints the plan (``check_only``) or what
an epoch would submit (``dry_run``), runs the search, and asks before cancelling the trials still
running when the user presses Ctrl-C. Only this module and ``progress`` print to the terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import sqlite3
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from hpc_executor.budget import usd
from hpc_executor.cancel import cancel_run
from hpc_executor.config import register_configs
from hpc_executor.config_checks import CONF_DIR, bound_problems, command_line_problems, run_name_problem
from hpc_executor.environment import Environment
from hpc_executor.errors import HpcExecutorError, LedgerError, PreflightError
from hpc_executor.ledger import Ledger
from hpc_executor.llm import spec_from_config
from hpc_executor.llm.credentials import policy_env_vars, required_env_vars
from hpc_executor.rl import settings as rl_settings
from hpc_executor.sandbox import SandboxUnavailable, resolve_sandbox
from hpc_executor.scheduling import Shape, make_scheduler
from hpc_executor.servers import ROLES
from hpc_executor.storage import check_writable, storage_message, storage_problem

if TYPE_CHECKING:
    from hpc_executor.search import Search

log = logging.getLogger("hpc_executor.search")


def trial_shape(cfg: DictConfig) -> Shape:
    res = cfg.env.resources
    # the worker's own limits plus a minute to copy workspaces and write the result
    return Shape(res.gpus, res.cpus, res.mem_gb, cfg.env.hard_limit_s + cfg.env.eval_limit_s + 60)


def dry_run(cfg: DictConfig, run_dir: Path) -> str:
    """What an epoch of this run would submit, without submitting (or calling any model)."""
    scheduler = make_scheduler(cfg.scheduler, run_dir / "submitit")
    return scheduler.dry_run(trial_shape(cfg), cfg.strategy.batch_size)


def preflight(cfg: DictConfig, env: Environment) -> None:
    """Everything missing, at once, before any work starts."""
    problems = env.problems() + bound_problems(cfg)
    if (bad_name := run_name_problem(cfg.run_name)) is not None:
        problems.append(bad_name)
    needed: dict[str, list[str]] = {}
    for role in ("ideator", "implementer"):
        spec = spec_from_config(cfg.model[role])
        for var in required_env_vars(spec):
            needed.setdefault(var, []).append(f"{role} {spec.provider}:{spec.model}")
    if cfg.strategy.name == "rl":
        for var in policy_env_vars(cfg.model.get("policy")):
            needed.setdefault(var, []).append(
                f"RL policy {cfg.model.policy.get('backend')}:{cfg.model.policy.get('model')}"
            )
    for var, users in needed.items():
        if not os.environ.get(var):
            problems.append(f"{var} is not set (needed by the {' and the '.join(users)}); export it, "
                            "or try the pipeline with +model=offline")  # fmt: skip
    for role in ROLES:
        if cfg.model[role].serve.enabled and cfg.model[role].provider != "openai_compatible":
            problems.append(f"model.{role}.serve.enabled is true but its provider is {cfg.model[role].provider}: "
                            f"only provider openai_compatible can be served (e.g. model.{role}=qwen3_vllm)")  # fmt: skip
    if cfg.scheduler.name == "slurm" and not shutil.which("sbatch"):
        problems.append(
            "scheduler=slurm but sbatch is not on PATH; run on a Slurm login node or use scheduler=local"
        )
    try:
        resolve_sandbox(cfg.sandbox, cfg.isolate_pids)
    except SandboxUnavailable as exc:
        problems.append(str(exc))
    if cfg.strategy.name == "rl":
        problems += rl_settings.problems(cfg)
    if problems:
        raise PreflightError("cannot start:\n  - " + "\n  - ".join(problems))


def plan(search: Search) -> str:
    """What this run will do, for check_only."""
    s, shape = search.cfg.strategy, search.shape
    lines = [
        f"run directory  {search.run_dir}"
        + (" (resumes it)" if (search.run_dir / "ledger.sqlite").exists() else ""),
        f"environment    {search.env.name} ({search.env.baseline_dir}), baseline hash {search.env.baseline_hash()}",
        f"ideator        {search.ideator_llm.label}",
        f"implementer    {search.implementer_llm.label}, {search.cfg.model.samples} samples x "
        f"{search.cfg.model.revisions} revisions",
        f"strategy       {s.name}: {s.epochs} epochs x {s.batch_size} ideas, calls of {s.call_size}; "
        f"exploit slots per epoch {[search.strategy.exploit_count(e) for e in range(s.epochs)]}; "
        + (
            f"schedule steady (no epoch barrier, {s.ready_buffer} patches kept ready beyond the free slots)"
            if s.schedule == "steady"
            else "schedule barrier (each epoch waits for its last trial)"
        ),
        f"trials         {shape.gpus} GPUs, {shape.cpus} CPUs, {shape.mem_gb} GB each; budget "
        f"{search.cfg.env.budget_s}s, hard limit {search.cfg.env.hard_limit_s}s; scheduler {search.cfg.scheduler.name}",
        f"sandbox        {search.sandbox.describe()}",
        f"LLM budget     {usd(search.cfg.budget_usd) if search.cfg.budget_usd else 'none (budget_usd=...)'}; "
        f"up to {search.cfg.model.implementer.max_concurrency} implementer requests at once",
        "GPU budget     "
        + (
            f"{search.cfg.budget_gpu_hours:g} GPU-hours"
            if search.cfg.budget_gpu_hours
            else "none (budget_gpu_hours=...)"
        ),
        f"integrity      baseline on {search.cfg.noise.baseline_repeats} seeds (an idea beats it above mean + "
        f"{search.cfg.noise.k:g}·std); confirm the top {search.cfg.confirm.top_k} on {search.cfg.confirm.seeds} "
        f"fresh seeds; novelty filter {'on' if search.cfg.novelty.enabled else 'off'}",
        *(
            f"serves        {role}: {cfg.model} as a job ({cfg.serve.gpus} GPUs), started by the run"
            for role in ROLES
            if (cfg := search.cfg.model[role]).serve.enabled
        ),
        "check_only: preflight passed (keys, models, data, scheduler), nothing was run",
    ]
    return "\n".join(lines)


def ask_to_cancel(run_dir: Path) -> None:
    """Ctrl-C: ask before cancelling what runs; without a terminal, leave it running."""
    try:
        ledger = Ledger(run_dir)
    except LedgerError:  # stopped before the run had a ledger: nothing was submitted
        return
    try:
        running = [t for t in ledger.open_trials() if t.job_id]
    finally:
        ledger.close()
    if not running:
        return
    answer = "n"
    if sys.stdin.isatty():
        answer = input(f"\nCancel the {len(running)} trials still queued or running? [y/N] ").strip().lower()
    if answer.startswith("y"):
        n = cancel_run(run_dir, reason="cancelled by the user (Ctrl-C)")
        log.info("cancelled %d trials; run the same command again to resume the search", n)
    else:
        log.info("left %d trials running; run the same command again to pick up their results, or cancel "
                 "them with: python -m hpc_executor.cancel %s", len(running), run_dir)  # fmt: skip


def choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def missing_groups(argv: list[str]) -> list[str]:
    """Groups the user must append (``+env=...``, ``+model=...``) that the command line lacks."""
    if any(
        a in ("-h", "--help", "--hydra-help", "--info", "-c", "--cfg", "--shell-completion") for a in argv
    ):
        return []
    return [g for g in ("env", "model") if not any(re.match(rf"^\+{{0,2}}{g}=", a) for a in argv)]


def role_shorthand(argv: list[str]) -> list[str]:
    """``model.ideator=NAME`` (or ``model.implementer=``) picks a role's model from conf/llm/; Hydra
    spells that ``llm@model.ideator=NAME``. Comma lists (sweeps) are rewritten alike; anything else,
    such as ``model.ideator.max_tokens=4000``, is left to Hydra."""
    names = set(choices("llm"))
    rewritten = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key in ("model.ideator", "model.implementer") and set(value.split(",")) <= names:
            arg = f"llm@{key}={value}"
        rewritten.append(arg)
    return rewritten


def usage_message(missing: list[str]) -> str:
    lines = [f"hpc-executor: missing {' and '.join('+' + g for g in missing)}. A search needs an "
             "environment and a model, appended with '+':",
             "    python -m hpc_executor.search +env=tiny +model=offline",
             "Choices:"]  # fmt: skip
    for group in ("env", "model", "strategy", "scheduler"):
        prefix = "+" if group in ("env", "model") else ""
        lines.append(f"    {prefix}{group}=  {', '.join(choices(group))}")
    lines.append(f"    model.ideator= / model.implementer=  {', '.join(choices('llm'))}  (one role's model)")
    lines.append("'+model=offline' is a scripted stand-in (not an LLM) that needs no API key.")
    return "\n".join(lines)


@hydra.main(config_path=str(CONF_DIR), config_name="search", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # a line per LLM request drowns the progress lines
    # a full disk refuses the log file: no logging traceback may bury the message that says so
    logging.raiseExceptions = False
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        missing = [g for g in ("env", "model") if OmegaConf.is_missing(cfg, g)]
        if missing:
            raise PreflightError(usage_message(missing))
        if cfg.dry_run:
            print(dry_run(cfg, run_dir))
            _remove_if_untouched(run_dir)
            return
        from hpc_executor.search import Search  # here: search imports this module (preflight)

        search = Search(cfg, run_dir)
        if cfg.check_only:
            print(plan(search))
            _remove_if_untouched(run_dir)
            return
        try:
            search.run()
        except KeyboardInterrupt:
            ask_to_cancel(run_dir)
            raise
    except HpcExecutorError as exc:
        if run_name_problem(cfg.run_name) is None:  # a bad name may point anywhere: remove nothing there
            _remove_if_untouched(run_dir)
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except (sqlite3.OperationalError, OSError) as exc:
        problem = storage_problem(exc)
        if problem is None:
            raise
        print(f"error: {storage_message(run_dir, problem)}", file=sys.stderr)
        sys.exit(2)


def _remove_if_untouched(run_dir: Path) -> None:
    """A run that stopped before its ledger existed leaves no directory behind."""
    if run_dir.is_dir() and not (run_dir / "ledger.sqlite").exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        with contextlib.suppress(OSError):  # outputs/ itself, if this run was its only content
            run_dir.parent.rmdir()


def main() -> None:
    register_configs()
    sys.argv[1:] = role_shorthand(sys.argv[1:])
    missing = missing_groups(sys.argv[1:])
    if missing:
        print(usage_message(missing), file=sys.stderr)
        sys.exit(2)
    # Hydra makes outputs/<run_name> and reads the search path before any code of ours runs.
    if problems := command_line_problems([a for a in sys.argv[1:] if not a.startswith("-")]):
        print("error: cannot start:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        sys.exit(2)
    unwritable = run_dir_problem(sys.argv[1:])
    if unwritable:
        print(f"error: {unwritable}", file=sys.stderr)
        sys.exit(2)
    _hydra_main()


def run_dir_problem(argv: list[str]) -> str | None:
    """Why the run directory cannot be written (a full or read-only disk), asked before Hydra writes
    its config and log there, which would fail with a traceback; None when it can, or for what this
    check cannot tell (a sweep, --help, overrides Hydra itself will reject)."""
    if any(a.startswith("-") for a in argv):
        return None
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            run_dir = Path(compose("search", overrides=argv, return_hydra_config=True).hydra.run.dir)
    except Exception:  # Hydra reports a bad command line itself, properly
        return None
    try:
        check_writable(run_dir)
    except OSError as exc:
        problem = storage_problem(exc)
        if problem is None:
            raise
        return storage_message(run_dir, problem)
    return None
