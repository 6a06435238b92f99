"""Snapshot benchmark (run on demand, not a test): what publishing the ledger's snapshot for readers
on other hosts costs, and reading it back, for a ledger of a paper-sized run.

    python bench/snapshot_bench.py [--calls 3000] [--prompt-kb 40] [--trials 1000] [--smoke]

A paper-scale evolution run (10 epochs x 80 ideas, 10 diff samples x up to 3 tries) records a few
thousand LLM calls whose prompts hold the whole environment's code (tens of KB each): the snapshot
is then mostly prompts. The driver renews it at most every ``snapshot_interval_s`` (default 30 s),
so a publish should cost well under a second of that interval.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from hpc_executor import ledger as ledger_module
from hpc_executor.ledger import SNAPSHOT_FILE, Ledger


def fill(ledger: Ledger, calls: int, prompt_kb: int, trials: int) -> None:
    prompt = "x" * (prompt_kb * 1024)
    with ledger.transaction() as db:
        db.executemany(
            "INSERT INTO llm_calls (call_id, role, purpose, epoch, prompt, response) VALUES (?, 'implementer',"
            " 'implement', 0, ?, 'diff')",
            [(f"c{i}", prompt) for i in range(calls)],
        )
        db.executemany(
            "INSERT INTO trials (trial_id, idea_id, epoch, trial_dir, state) VALUES (?, ?, 0, ?, 'done')",
            [(f"t{i}", f"i{i}", f"/shared/run/trials/t{i}") for i in range(trials)],
        )
        db.executemany(
            "INSERT INTO results (trial_id, status, reward, metrics, provenance) VALUES (?, 'ok', 0.3, '{}', '{}')",
            [(f"t{i}",) for i in range(trials)],
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=3000, help="LLM calls recorded")
    parser.add_argument("--prompt-kb", type=int, default=40, help="size of each call's prompt")
    parser.add_argument("--trials", type=int, default=1000, help="trials with results")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="a tiny ledger, to check the benchmark runs")
    args = parser.parse_args()
    if args.smoke:
        args.calls, args.prompt_kb, args.trials, args.repeats = 50, 4, 20, 2

    with tempfile.TemporaryDirectory() as tmp:
        ledger = Ledger(tmp, create=True)
        fill(ledger, args.calls, args.prompt_kb, args.trials)
        publish, read = [], []
        for _ in range(args.repeats):
            start = time.perf_counter()
            ledger.publish_snapshot()
            publish.append(time.perf_counter() - start)
            start = time.perf_counter()
            frames = ledger_module.load(tmp)
            read.append(time.perf_counter() - start)
        assert len(frames["results"]) == args.trials
        size_mb = (Path(tmp) / SNAPSHOT_FILE).stat().st_size / 2**20
    setting = f"{args.calls:,} calls x {args.prompt_kb} KB, {args.trials:,} trials"
    print(f"{'measure':22s} {'setting':40s} {'median':>10s} {'max':>10s}")
    for name, times in (("publish snapshot", publish), ("load (from snapshot)", read)):
        times.sort()
        print(f"{name:22s} {setting:40s} {times[len(times) // 2]:9.3f}s {times[-1]:9.3f}s")
    print(f"{'snapshot size':22s} {setting:40s} {size_mb:9.1f}MB")


if __name__ == "__main__":
    main()
