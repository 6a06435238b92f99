"""Steady-state benchmark (run on demand against a running Slurm, not a test).

    python bench/steady_state.py [--ideas 48] [--budget-s 30] [--latency-s 5] [--modes barrier,steady] [--smoke]

Runs the same number of ideas through the search twice on the local Slurm (8 fake GPUs), once per
mode of ``strategy.schedule`` (``barrier``: one epoch at a time; ``steady``: every slot kept busy),
with the same command otherwise: the steady_mix environment (bench/envs/steady_mix: one GPU per
trial; 30% of the trials crash within the first 5% of the budget, the rest run 60-100% of it,
drawn from the trial id, so both modes run the same durations) and the offline stand-in with a
fixed latency per LLM call (``model.*.latency_s``, as a thinking model takes). It prints, per mode,
the GPU-slot busy share after the first trial started and the trials completed per hour (from
the ledger's trials.started_at / ended_at, see hpc_executor/utilisation.py), and their ratio,
against the targets: steady <= 3% idle slot-time; >= 1.3x the barrier's trials per hour.
``--smoke``: 4 ideas in one epoch, a 2 s budget (about a minute for both modes); it fails unless
every idea ran and has its times. A driver without ``strategy.schedule`` (before the steady loop)
runs barrier only. Worker start-up (Slurm's job start to the worker's started file) counts as idle
in the busy share; the row over Slurm's own job times counts it as busy. The final drain (from the
last trial's start, when nothing is left to start in either mode) is shown apart: its share of the
idle time falls as a run has more ideas.
"""

from __future__ import annotations

import argparse
import datetime
import math
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"
BENCH_CONF = REPO / "bench" / "conf"

from hpc_executor.config import register_configs  # noqa: E402
from hpc_executor.ledger import load  # noqa: E402
from hpc_executor.utilisation import Utilisation, from_intervals, trial_intervals, utilisation  # noqa: E402

MODES = ("barrier", "steady")
IDLE_TARGET = 0.03  # steady: at most this share of slot-time idle after the first trial starts
SPEEDUP_TARGET = 1.3  # steady's trials per hour over the barrier's


@dataclass
class Measured:
    mode: str
    usage: Utilisation
    driver_s: float  # the whole command, from start to exit
    crashed: int  # trials that crashed (the mix's early failures)
    mean_trial_s: float
    llm_calls: int
    allocated: Utilisation | None  # the same over Slurm's job start/end (sacct): start-up counts as busy
    startup_s: float | None  # mean time from Slurm's job start to the worker's started file
    drain: Utilisation  # from the last trial's start to the end: slots fall idle as the last trials end

    @property
    def idle_share_before_drain(self) -> float:
        before = self.usage.capacity_slot_s - self.drain.capacity_slot_s
        return (self.usage.idle_slot_s - self.drain.idle_slot_s) / before if before else math.nan


def drain_of(spans: list[tuple[float, float | None]], slots: int) -> Utilisation:
    """The run's drain: from the last trial's start to the last end, when no trial is left to
    start in any mode; its idle time shrinks against the whole as a run has more ideas."""
    last = max(start for start, _ in spans)
    return from_intervals([(max(s, last), e) for s, e in spans if e is None or e > last], slots)


def slurm_spans(job_ids: list[str], wait_s: float = 60.0) -> dict[str, tuple[float, float]]:
    """Slurm's start and end of each job (one sacct query, asked again until every job has its
    end: records reach sacct a few seconds after a job ends); {} when sacct cannot tell."""
    arrays = sorted({j.split("_")[0] for j in job_ids})
    deadline = time.monotonic() + wait_s
    while True:
        out = subprocess.run(["sacct", "-n", "-P", "-X", "-j", ",".join(arrays), "-o", "JobID,Start,End"],
                             capture_output=True, text=True).stdout  # fmt: skip
        spans = {}
        for line in out.split():
            job, start, end = line.split("|")
            try:
                spans[job] = (datetime.datetime.fromisoformat(start).timestamp(),
                              datetime.datetime.fromisoformat(end).timestamp())  # fmt: skip
            except ValueError:  # Unknown: not started or not ended (yet)
                continue
        if set(job_ids) <= set(spans) or time.monotonic() > deadline:
            return spans if set(job_ids) <= set(spans) else {}
        time.sleep(2)


def overrides(args: argparse.Namespace, mode: str, run_dir: Path, has_schedule: bool) -> list[str]:
    """The search command's overrides: the same for both modes but for ``strategy.schedule``."""
    epochs = args.ideas // args.batch_size  # main checks that it divides
    return [
        f"hydra.searchpath=[file://{BENCH_CONF}]", "+env=steady_mix", "+model=offline", "scheduler=slurm",
        f"hydra.run.dir={run_dir}", f"scheduler.job_name=hpcx-bench-steady-{mode}", "run_baseline=false",
        f"strategy.epochs={epochs}", f"strategy.batch_size={args.batch_size}", f"env.budget_s={args.budget_s}",
        f"env.hard_limit_s={2 * args.budget_s}",
        f"model.ideator.latency_s={args.latency_s}", f"model.implementer.latency_s={args.latency_s}",
        *([f"strategy.schedule={mode}"] if has_schedule else []),
    ]  # fmt: skip


def driver_has_schedule() -> bool:
    """Whether this driver has ``strategy.schedule`` (the steady loop); without it, it runs barrier."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("search", overrides=[f"hydra.searchpath=[file://{BENCH_CONF}]", "+env=steady_mix",
                                           "+model=offline"])  # fmt: skip
    return "schedule" in cfg.strategy


def run_mode(args: argparse.Namespace, mode: str, root: Path, has_schedule: bool) -> Measured:
    run_dir = root / mode
    command = [sys.executable, "-m", "hpc_executor.search", *overrides(args, mode, run_dir, has_schedule)]
    start = time.monotonic()
    with open(root / f"{mode}.log", "w") as log:
        proc = subprocess.run(command, cwd=root, stdout=log, stderr=subprocess.STDOUT)
    driver_s = time.monotonic() - start
    if proc.returncode != 0:
        raise SystemExit(f"the {mode} run failed (exit {proc.returncode}):\n"
                         f"{(root / f'{mode}.log').read_text()[-3000:]}")  # fmt: skip
    frames = load(run_dir)
    trials = frames["trials"].merge(frames["results"][["trial_id", "status"]], on="trial_id", how="left")
    if len(trials) != args.ideas or trials.started_at.isna().any() or trials.ended_at.isna().any():
        raise SystemExit(f"the {mode} run has {len(trials)} trials for {args.ideas} ideas, or trials without "
                         f"their start and end: see {run_dir}")  # fmt: skip
    if not set(trials.status) <= {"ok", "crashed"}:
        raise SystemExit(f"the {mode} run has trials that neither finished nor crashed as the mix says: "
                         f"{sorted(set(trials.status))}; see {run_dir}")  # fmt: skip
    usage = utilisation(run_dir, slots=args.slots)
    intervals = trial_intervals(frames["trials"])
    spans = slurm_spans(list(trials.job_id))
    startup = [
        started - spans[job][0]
        for job, started in zip(trials.job_id, trials.started_at, strict=True)
        if job in spans
    ]
    return Measured(
        mode=mode,
        usage=usage,
        driver_s=driver_s,
        crashed=int((trials.status == "crashed").sum()),
        mean_trial_s=float((trials.ended_at - trials.started_at).mean()),
        llm_calls=len(frames["llm_calls"]),
        allocated=from_intervals(spans.values(), usage.slots) if spans else None,
        drain=drain_of(intervals, usage.slots),
        startup_s=sum(startup) / len(startup) if startup else None,
    )


def other_jobs() -> int:
    """Jobs of others on the cluster now: they take slots this benchmark counts as its own."""
    out = subprocess.run(["squeue", "-h", "-o", "%j"], capture_output=True, text=True).stdout.split()
    return sum(not name.startswith("hpcx-bench-steady-") for name in out)


def print_table(results: list[Measured], args: argparse.Namespace) -> None:
    by_mode = {m.mode: m for m in results}
    modes = [m for m in MODES if m in by_mode]
    rows: list[tuple[str, list[str], str, str]] = []

    def row(name: str, cells: list[str], target: str = "", ok: str = "") -> None:
        rows.append((name, cells, target, ok))

    row("ideas (trials)", [str(by_mode[m].usage.trials_completed) for m in modes])
    row("crashed early (the mix)", [str(by_mode[m].crashed) for m in modes])
    row("mean trial duration (s)", [f"{by_mode[m].mean_trial_s:.1f}" for m in modes])
    row("LLM calls", [str(by_mode[m].llm_calls) for m in modes])
    row("slots", [str(by_mode[m].usage.slots) for m in modes])
    row("wall from first trial start (s)", [f"{by_mode[m].usage.wall_s:.1f}" for m in modes])
    row("driver wall, whole command (s)", [f"{by_mode[m].driver_s:.1f}" for m in modes])
    row("GPU-slot busy share", [f"{by_mode[m].usage.busy_share:.1%}" for m in modes])
    row("  the same over Slurm's job times", [_share(by_mode[m].allocated) for m in modes])
    row("  worker start-up, mean (s)", [_seconds(by_mode[m].startup_s) for m in modes])
    row("idle slot-seconds", [f"{by_mode[m].usage.idle_slot_s:.0f}" for m in modes])
    row("  of them in the final drain", [f"{by_mode[m].drain.idle_slot_s:.0f}" for m in modes])
    row("  idle share before the drain", [f"{by_mode[m].idle_share_before_drain:.1%}" for m in modes])
    idle = [f"{by_mode[m].usage.idle_share:.1%}" for m in modes]
    if "steady" in by_mode:
        steady_idle = by_mode["steady"].usage.idle_share
        row("idle slot-time share", idle, "steady <= 3%", "yes" if steady_idle <= IDLE_TARGET else "NO")
    else:
        row("idle slot-time share", idle, "steady <= 3%", "n/a")
    row("trials completed per hour", [f"{by_mode[m].usage.completed_per_hour:.0f}" for m in modes])
    if len(modes) == 2:
        ratio = by_mode["steady"].usage.completed_per_hour / by_mode["barrier"].usage.completed_per_hour
        row("trials per hour, steady / barrier", ["", f"{ratio:.2f}x"], ">= 1.3x",
            "yes" if ratio >= SPEEDUP_TARGET else "NO")  # fmt: skip
    print(f"{args.ideas} ideas, batch {args.batch_size}, budget {args.budget_s} s, LLM latency {args.latency_s} s "
          f"per call")  # fmt: skip
    print(f"{'measure':36s}" + "".join(f"{m:>10s}" for m in modes) + "  target          ok")
    for name, cells, target, ok in rows:
        print(f"{name:36s}" + "".join(f"{c:>10s}" for c in cells) + f"  {target:14s}  {ok}".rstrip())


def _share(usage: Utilisation | None) -> str:
    return "n/a" if usage is None else f"{usage.busy_share:.1%}"


def _seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ideas", type=int, default=48, help="ideas per mode (epochs x batch size)")
    parser.add_argument("--batch-size", type=int, default=8, help="ideas per epoch (steady: per generation)")
    parser.add_argument("--budget-s", type=int, default=30, help="the trials' training budget")
    parser.add_argument("--latency-s", type=float, default=5.0, help="seconds each LLM call takes")
    parser.add_argument("--slots", type=int, default=None, help="default: one node's GPUs (from the config)")
    parser.add_argument("--modes", default=None,
                        help="comma-separated: barrier, steady (default: both, or barrier where the driver has no "
                        "strategy.schedule)")  # fmt: skip
    parser.add_argument("--keep", type=Path, default=None, help="keep the run directories here")
    parser.add_argument("--smoke", action="store_true", help="4 ideas, 2 s budget: check that it runs")
    args = parser.parse_args()
    if args.smoke:
        args.ideas, args.batch_size, args.budget_s, args.latency_s = 4, 4, 2, 0.5
    has_schedule = driver_has_schedule()
    if args.modes is None:
        modes = list(MODES) if has_schedule else ["barrier"]
        if not has_schedule:
            print("note: this driver has no strategy.schedule (the steady loop): barrier only")
    else:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - set(MODES):
        raise SystemExit(f"--modes {args.modes!r}: give one or both of {', '.join(MODES)}, comma-separated")
    if args.ideas % args.batch_size:
        raise SystemExit(f"--ideas {args.ideas} is not a whole number of batches of {args.batch_size}")
    if not shutil.which("sbatch"):
        raise SystemExit(
            "no sbatch: this benchmark needs a Slurm cluster (sudo slurm/start-local-cluster.sh)"
        )
    if "steady" in modes and not has_schedule:
        raise SystemExit("this driver has no strategy.schedule (the steady loop): run with --modes barrier")
    if others := other_jobs():
        print(f"warning: {others} other jobs on the cluster: they take slots counted here as idle")
    with tempfile.TemporaryDirectory(prefix="hpcx-bench-steady-", dir=Path.cwd()) as tmp:
        root = args.keep or Path(tmp)
        if any((root / mode).exists() for mode in modes):  # the search would resume it, not run it
            raise SystemExit(f"--keep {root} holds a run of this benchmark already: give an empty directory")
        root.mkdir(parents=True, exist_ok=True)
        results = [run_mode(args, mode, root.resolve(), has_schedule) for mode in modes]
    print_table(results, args)


if __name__ == "__main__":
    main()
