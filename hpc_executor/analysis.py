"""pandas helpers over ledgers: one table of ideas with their outcomes, across one run or a sweep.

from hpc_executor import analysis
df = analysis.outcomes(["multirun/2026-11-27/10-00-00/0-tiny-offline-evolution-seed0", ...])
analysis.by_epoch(df)        # ideas, execution rate, best and mean reward per run and epoch
analysis.rl_steps("outputs/tiny-rl-seed0")  # strategy=rl: what the paper measured, per step
analysis.slot_utilisation("multirun/2026-11-27/10-00-00")  # GPU-slot busy share, trials per hour
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from hpc_executor.ledger import LEDGER_FILE, Ledger, load
from hpc_executor.rl import metrics
from hpc_executor.utilisation import utilisation


def run_dirs(root: str | Path) -> list[Path]:
    """Every run directory under ``root`` (a run, an outputs/ folder or a multirun sweep)."""
    return sorted(p.parent for p in Path(root).rglob(LEDGER_FILE))


def outcomes(runs: str | Path | Iterable[str | Path]) -> pd.DataFrame:
    """One row per idea: run, epoch, kind, title, status, reward, runtime, LLM tokens and cost."""
    paths = run_dirs(runs) if isinstance(runs, (str, Path)) else [Path(r) for r in runs]
    frames = []
    for run in paths:
        t = load(run)
        calls = t["llm_calls"]
        if "idea_id" not in calls:  # a snapshot published before calls named their idea
            calls = calls.assign(idea_id=None)
        spend = calls.groupby("idea_id")[["input_tokens", "output_tokens", "cost_usd"]].sum()
        search_trials = t["trials"][t["trials"].purpose.isna()]  # extra seeds: see noise, confirm
        df = (
            t["ideas"][["idea_id", "epoch", "kind", "title"]]
            .merge(
                search_trials[["idea_id", "trial_id", "trial_dir", "job_id", "node"]],
                on="idea_id",
                how="left",
            )
            .merge(
                t["results"][["trial_id", "status", "reward", "runtime_s", "reason"]],
                on="trial_id",
                how="left",
            )
            .merge(spend, left_on="idea_id", right_index=True, how="left")
        )
        frames.append(df.assign(run=run.name))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def by_epoch(df: pd.DataFrame) -> pd.DataFrame:
    """Per run and epoch: ideas, execution rate (valid results / ideas), best and mean reward, and
    the best reward found so far (the search curve)."""
    ideas = df[df.kind != "baseline"]
    table = ideas.groupby(["run", "epoch"]).agg(
        ideas=("idea_id", "count"),
        execution_rate=("status", lambda s: (s == "ok").mean()),
        best_reward=("reward", "max"),
        mean_reward=("reward", "mean"),
    )
    table["best_so_far"] = table.groupby(level="run").best_reward.cummax()
    return table.reset_index()


def status_counts(df: pd.DataFrame) -> pd.DataFrame:
    """How ideas ended, per run: ok, implement_failed, patch_rejected, crashed, timeout, ..."""
    return df[df.kind != "baseline"].pivot_table(index="run", columns="status", values="idea_id", aggfunc="count",
                                                   fill_value=0)  # fmt: skip


def rl_steps(run: str | Path | pd.DataFrame) -> pd.DataFrame:
    """Per step of an RL run (strategy=rl): mean and max reward, execution rate, distinct ideas (exact
    and near-duplicate), Jaccard similarity to the previous step, mean thinking length and thinking
    length vs execution (``hpc_executor.rl.metrics``). ``run`` is a run directory (read live, as
    ``ledger.load(run, live=True)`` reads it: on the driver's host), or its samples frame
    (``Ledger.rl_samples_frame()``) itself."""
    if isinstance(run, pd.DataFrame):
        return metrics.step_metrics(run)
    ledger = Ledger(run)
    try:
        samples = ledger.rl_samples_frame()
    finally:
        ledger.close()
    return metrics.step_metrics(samples)


UTILISATION_COLUMNS = ("slots", "trials_started", "trials_completed", "running", "wall_s", "busy_slot_s",
                       "idle_slot_s", "busy_share", "completed_per_hour")  # fmt: skip


def slot_utilisation(runs: str | Path | Iterable[str | Path], slots: int | None = None) -> pd.DataFrame:
    """Per run: its slots, trials started, completed and still running, the window from the first
    trial's start (``wall_s``), busy and idle slot-seconds, the busy share and trials completed per
    hour (see ``hpc_executor.utilisation``; ``slots``: default from each run's config)."""
    paths = run_dirs(runs) if isinstance(runs, (str, Path)) else [Path(r) for r in runs]
    rows = []
    for run in paths:
        u = utilisation(run, slots)
        rows.append({"run": run.name} | {column: getattr(u, column) for column in UTILISATION_COLUMNS})
    return pd.DataFrame(rows, columns=["run", *UTILISATION_COLUMNS])
