"""Ledger benchmark (run on demand, not a test): ingest rate and the cost of an empty poll.

    python bench/ledger_bench.py [--ingest 10000] [--recorded 100000] [--open 64] [--smoke]

Targets (issue 2): >= 5,000 results/s ingested from result files; <= 20 ms for a poll that finds
nothing new while 100,000 results are already recorded (and `--open` trials are still running).
``--smoke``: 200 / 2,000 / 8, to check that it still runs (every result ingested once).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from hpc_executor.ledger import Ledger
from hpc_executor.trial_dir import RESULT_FILE, write_atomic
from hpc_executor.types import Result, Status


def add_trials(ledger: Ledger, run_dir: Path, start: int, n: int, *, make_dirs: bool) -> list[Path]:
    dirs = [run_dir / "trials" / f"t{i:07d}" for i in range(start, start + n)]
    with ledger.transaction() as db:
        db.executemany(
            "INSERT INTO trials (trial_id, idea_id, epoch, trial_dir, state) VALUES (?, ?, 0, ?, 'queued')",
            [(d.name, f"i{d.name}", str(d)) for d in dirs],
        )
    if make_dirs:
        for d in dirs:
            d.mkdir(parents=True)
    return dirs


def result_json(trial_id: str) -> str:
    return Result(trial_id, Status.OK, reward=0.3, metrics={"val_loss": 3.3, "val_tokens": 10485760},
                  runtime_s=1500.0, log_path=f"/shared/run/trials/{trial_id}/train.log",
                  log_tail="step 1000 loss 3.30\n" * 20, provenance={"host": "node001"}).to_json()  # fmt: skip


def bench_ingest(n: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        ledger = Ledger(run_dir, create=True)
        dirs = add_trials(ledger, run_dir, 0, n, make_dirs=True)
        for d in dirs:
            write_atomic(d / RESULT_FILE, result_json(d.name))
        start = time.perf_counter()
        new = ledger.poll()
        elapsed = time.perf_counter() - start
        assert new == n, f"ingested {new} of {n}"
        assert ledger.poll() == 0
        return n / elapsed, elapsed


def bench_empty_poll(recorded: int, open_trials: int, repeats: int = 50) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        ledger = Ledger(run_dir, create=True)
        add_trials(ledger, run_dir, 0, recorded, make_dirs=False)
        with ledger.transaction() as db:  # record results directly: only the poll is timed here
            db.executemany(
                "INSERT INTO results (trial_id, status, reward) VALUES (?, 'ok', 0.3)",
                [(f"t{i:07d}",) for i in range(recorded)],
            )
            db.execute("UPDATE trials SET state = 'done'")
        add_trials(ledger, run_dir, recorded, open_trials, make_dirs=True)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            assert ledger.poll() == 0
            times.append(time.perf_counter() - start)
        return statistics.median(times) * 1000, max(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ingest", type=int, default=10_000, help="result files to ingest")
    parser.add_argument("--recorded", type=int, default=100_000, help="results already in the ledger")
    parser.add_argument("--open", type=int, default=64, help="trials still running during the empty poll")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes: check that it runs, not its numbers"
    )
    args = parser.parse_args()
    if args.smoke:
        args.ingest, args.recorded, args.open = 200, 2_000, 8

    rate, elapsed = bench_ingest(args.ingest)
    median_ms, max_ms = bench_empty_poll(args.recorded, args.open)
    rows = [
        ("ingest rate", f"{args.ingest:,} result files", f"{rate:,.0f} results/s ({elapsed:.2f} s)", ">= 5,000/s",
         rate >= 5000),
        ("empty poll, median", f"{args.recorded:,} recorded, {args.open} open", f"{median_ms:.2f} ms", "<= 20 ms",
         median_ms <= 20),
        ("empty poll, max", f"{args.recorded:,} recorded, {args.open} open", f"{max_ms:.2f} ms", "", True),
    ]  # fmt: skip
    print(f"{'measure':20s} {'setting':32s} {'value':34s} {'target':12s} ok")
    for name, setting, value, target, ok in rows:
        print(f"{name:20s} {setting:32s} {value:34s} {target:12s} {'yes' if ok else 'NO'}")


if __name__ == "__main__":
    main()
