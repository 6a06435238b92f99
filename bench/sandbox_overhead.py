"""Sandbox start-up overhead (run on demand, not a test).

    python bench/sandbox_overhead.py [--runs 200] [--smoke]

Starts the same no-op trial command many times the way the worker does (run_in_group: its own
process group, the scrubbed environment, a log file) with sandbox=none and with sandbox=bwrap (the
training view: workspace and output read-write, a data directory with an eval-only file left out,
the limits), alternating the two so that load on the machine hits both alike. Two commands: `true`
(the start-up alone) and `python -c pass` (a trial's interpreter start, which the sandbox makes read
its files through bind mounts). Prints the median and p90 of each, and the median added by bwrap
(target <= 50 ms).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from hpc_executor.sandbox import Limits, View, resolve_sandbox, run_in_group, scrubbed_environ

TARGET_MS = 50.0


def timed_start(argv: list[str], cwd: Path, log: Path) -> float:
    start = time.perf_counter()
    done = run_in_group(argv, cwd=cwd, env=scrubbed_environ(os.environ), log_path=log, limit_s=60)
    if done.returncode != 0:
        raise SystemExit(f"{argv[0]} failed (exit {done.returncode}); see {log}")
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=200, help="starts per sandbox and command")
    parser.add_argument("--smoke", action="store_true", help="10 starts each: checks the benchmark runs")
    args = parser.parse_args()
    runs = 10 if args.smoke else args.runs
    bwrap, none = resolve_sandbox("auto"), resolve_sandbox("none", isolate_pids="off")
    if bwrap.kind != "bwrap":
        print(f"bubblewrap cannot run here ({bwrap.why}); nothing to compare")
        return
    limits = Limits(file_size_bytes=64 << 30, processes=8192, open_files=65536, tmp_bytes=16 << 30)
    with tempfile.TemporaryDirectory(prefix="hpcx-bench-") as tmp:
        root = Path(tmp)
        workspace, output, data = root / "workspace", root / "output", root / "data"
        for d in (workspace, output, data):
            d.mkdir()
        (data / "train.bin").write_bytes(b"\0" * 1024)
        (data / "val.bin").write_bytes(b"\0" * 1024)
        view = View(workspace, (workspace, output), (data,), (data / "val.bin",), private=(root,))
        rows = []
        for label, command in (("true", ["true"]), ("python -c pass", [sys.executable, "-c", "pass"])):
            times: dict[str, list[float]] = {"none": [], "bwrap": []}
            for _ in range(runs):
                for sandbox in (none, bwrap):
                    argv = sandbox.wrap(command, view, limits)
                    times[sandbox.kind].append(timed_start(argv, workspace, root / "log"))
            rows.append((label, times))
    print(f"sandbox start-up overhead, {runs} starts each ({bwrap.why})")
    print(f"{'command':<16} {'none median':>12} {'none p90':>9} {'bwrap median':>13} {'bwrap p90':>10} {'added median':>13} {'added p90':>10}")  # fmt: skip
    for label, times in rows:
        med = {k: statistics.median(v) for k, v in times.items()}
        p90 = {k: statistics.quantiles(v, n=10)[-1] for k, v in times.items()}
        print(f"{label:<16} {med['none']:>10.1f}ms {p90['none']:>7.1f}ms {med['bwrap']:>11.1f}ms {p90['bwrap']:>8.1f}ms "
              f"{med['bwrap'] - med['none']:>11.1f}ms {p90['bwrap'] - p90['none']:>8.1f}ms")  # fmt: skip
    added = statistics.median(rows[0][1]["bwrap"]) - statistics.median(rows[0][1]["none"])
    print(
        f"target: <= {TARGET_MS:.0f} ms added (median, `true`): {'met' if added <= TARGET_MS else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
