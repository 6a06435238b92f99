"""Confirmation of winners: the search's top ideas run again on fresh seeds.

The best reward of a search is the maximum over many noisy trials, so it is biased upward. At the
end of a search (``confirm.top_k``, ``confirm.seeds``; off by default, since it costs top_k x seeds
trials) and for a finished run by command::

    python -m hpc_executor.confirm RUN_DIR --top-k 2 --seeds 2

the top-k ideas by reward run again on M seeds no run of this search used (``seed+1000`` ...), as
trials of their own (``trials.purpose = confirm``), dispatched, followed and resumed like any other.
Their confirmed reward is the mean ± std over those fresh seeds only (the search's own trial is the
selected maximum and would bias it). An idea is *confirmed* when every confirmation run executed
and their mean beats the baseline by more than its noise (``noise``); one that does not confirm is
flagged in the table and the report, never dropped. The result is the ledger's ``confirmations``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpc_executor.ids import confirm_trial_id
from hpc_executor.noise import BaselineNoise

if TYPE_CHECKING:
    from hpc_executor.ledger import Ledger

CONFIRM = "confirm"  # trials.purpose of a confirmation run
SEED_OFFSET = 1000  # confirmation seeds start here above the run's seed, past the baseline repeats'

SCHEMA = """
CREATE TABLE IF NOT EXISTS confirmations (
    idea_id TEXT PRIMARY KEY, search_reward REAL, runs INTEGER NOT NULL, runs_ok INTEGER NOT NULL,
    mean REAL, std REAL, bar REAL, confirmed INTEGER NOT NULL, updated_at REAL);
"""


def candidates(ledger: Ledger, top_k: int) -> list[dict[str, Any]]:
    """The top-k ideas by their search trial's reward (the baseline aside)."""
    ok = [r for r in ledger.outcomes() if r["status"] == "ok" and r["kind"] != "baseline"]
    return sorted(ok, key=lambda r: (-r["reward"], r["idea_id"]))[:top_k]


def trials_for(idea_id: str, seed: int, seeds: int) -> list[tuple[str, int]]:
    """(trial id, seed) of an idea's confirmation runs: the same fresh seeds for every idea, so
    confirmed rewards compare pairwise."""
    return [(confirm_trial_id(idea_id, j), seed + SEED_OFFSET + j) for j in range(seeds)]


def record(ledger: Ledger, noise: BaselineNoise) -> list[dict[str, Any]]:
    """Summarise every idea's finished confirmation runs into ``confirmations``; returns the rows."""
    search_reward = {r["idea_id"]: r["reward"] for r in ledger.outcomes()}
    runs: dict[str, list[dict[str, Any]]] = {}
    for trial in ledger.extra_trials(CONFIRM):
        runs.setdefault(trial["idea_id"], []).append(trial)
    rows = []
    for idea_id, trials in runs.items():
        if any(t["status"] is None for t in trials):
            continue  # still running: summarised once all are in
        rewards = [float(t["reward"]) for t in trials if t["status"] == "ok"]
        mean = statistics.fmean(rewards) if rewards else None
        std = statistics.stdev(rewards) if len(rewards) > 1 else 0.0 if rewards else None
        confirmed = len(rewards) == len(trials) and noise.beats(mean)
        rows.append({"idea_id": idea_id, "search_reward": search_reward.get(idea_id), "runs": len(trials),
                     "runs_ok": len(rewards), "mean": mean, "std": std, "bar": noise.bar,
                     "confirmed": int(confirmed), "updated_at": time.time()})  # fmt: skip
    with ledger.transaction() as db:
        db.executemany(
            "INSERT OR REPLACE INTO confirmations VALUES (:idea_id, :search_reward, :runs, :runs_ok, :mean, :std,"
            " :bar, :confirmed, :updated_at)",
            rows,
        )
    return rows


def describe(row: dict[str, Any]) -> str:
    """One table cell: the confirmed reward, or why there is none."""
    if row.get("confirmed_runs") is None:
        return ""
    if row["confirmed_mean"] is None:
        return f"unconfirmed: 0 of {row['confirmed_runs']} runs executed"
    cell = f"{row['confirmed_mean']:.4f} ± {row['confirmed_std']:.4f} ({row['confirmed_ok']}/{row['confirmed_runs']})"
    return cell + ("" if row["confirmed"] else " unconfirmed")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m hpc_executor.confirm",
        description="Run a finished search's top ideas again on fresh seeds and record their confirmed reward. "
        "Running it again resumes it; a larger --top-k or --seeds adds runs.",
    )
    parser.add_argument("run_dir", help="a run directory, e.g. outputs/tiny-offline-evolution-seed0")
    parser.add_argument(
        "--top-k", type=int, default=2, help="ideas to confirm, best reward first (default 2)"
    )
    parser.add_argument("--seeds", type=int, default=2, help="fresh seeds per idea (default 2)")
    args = parser.parse_args(argv)
    if args.top_k < 1 or args.seeds < 1:
        parser.error("--top-k and --seeds must be >= 1")
    from hpc_executor.errors import HpcExecutorError
    from hpc_executor.search import search_for_run  # the driver's machinery: imported only to run

    try:
        search = search_for_run(
            Path(args.run_dir), {"confirm.top_k": args.top_k, "confirm.seeds": args.seeds}
        )
        search.open()
        search.confirm()
        search.finish()
    except HpcExecutorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
