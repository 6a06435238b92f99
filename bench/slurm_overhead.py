"""Slurm overhead benchmark (run on demand against a running Slurm, not a test).

    python bench/slurm_overhead.py [--trials 64] [--smoke]

Runs N no-op trials (the tests' toy environment: a few milliseconds of training and evaluation)
twice on the same cluster, in one run:
  1. through hpc-executor: the driver writes the trials, submits them as one array, polls and
     ingests their results into the ledger;
  2. through bare submitit: the same worker function on the same kind of trial directories,
     ``map_array`` and ``job.result()``.
It prints the ratio of wall times (target <= 1.15) and the median delay from a trial's end (its
result file written) to its result being visible in the ledger (target <= 2 s). The driver polls
with the scheduler's own settings (conf/scheduler/slurm.yaml), not the tests' faster ones.
``--smoke``: 4 trials (about 15 s), to check that it still runs; it fails unless every trial ends ok.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import submitit
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from conftest import quick_env_config  # noqa: E402

from hpc_executor.cli import CONF_DIR  # noqa: E402
from hpc_executor.config import EnvConfig, register_configs  # noqa: E402
from hpc_executor.ledger import Ledger  # noqa: E402
from hpc_executor.search import Search  # noqa: E402
from hpc_executor.trial_dir import DIFF_FILE, RESULT_FILE, TrialSpec  # noqa: E402
from hpc_executor.types import Idea, Patch  # noqa: E402
from hpc_executor.worker import run_trial  # noqa: E402


def through_hpc_executor(root: Path, n: int) -> tuple[float, list[float]]:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("search", overrides=[
            "+env=tiny", "+model=offline", "scheduler=slurm", "run_baseline=false", "strategy.epochs=1",
            f"strategy.batch_size={n}", "scheduler.job_name=bench-hpcx",
        ])  # fmt: skip
    # The toy environment alone: merged into tiny's it would keep tiny's data files (eval_data, requires).
    cfg.env = OmegaConf.merge(OmegaConf.structured(EnvConfig), quick_env_config())
    run_dir = root / "hpcx"
    search = Search(cfg, run_dir)
    search.open()
    for i in range(n):
        idea = Idea(f"e0-{i:03d}", 0, f"no-op {i}", "The baseline, unchanged.")
        search.ledger.add_idea(idea, slot=i)
        search.ledger.add_patch(Patch(idea.idea_id, "", "applied"))
    start = time.monotonic()
    search.create_trials(0)
    search.execute(0)
    wall = time.monotonic() - start
    ledger = Ledger(run_dir)
    rows = ledger.db.execute(
        "SELECT t.trial_dir, r.ingested_at, r.status FROM trials t JOIN results r USING (trial_id)"
    )
    delays = []
    for trial_dir, ingested_at, status in rows:
        if status != "ok":
            raise SystemExit(f"a no-op trial ended {status}: see {trial_dir}")
        delays.append(ingested_at - (Path(trial_dir) / RESULT_FILE).stat().st_mtime)
    if len(delays) != n:
        raise SystemExit(f"{len(delays)} of {n} trials have a result in the ledger")
    return wall, delays


def through_bare_submitit(root: Path, n: int) -> float:
    dirs = []
    for i in range(n):
        d = root / "bare" / f"t{i}"
        d.mkdir(parents=True)
        (d / DIFF_FILE).write_text("")
        TrialSpec(f"t{i}", str(d), quick_env_config()).write()
        dirs.append(str(d))
    executor = submitit.AutoExecutor(folder=root / "bare" / "submitit" / "%j")
    executor.update_parameters(timeout_min=10, slurm_job_name="bench-bare", cpus_per_task=1, mem_gb=1)
    start = time.monotonic()
    jobs = executor.map_array(run_trial, dirs)
    for job in jobs:
        job.result()
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=64)
    parser.add_argument("--smoke", action="store_true", help="4 trials: check that it runs, not its numbers")
    args = parser.parse_args()
    if args.smoke:
        args.trials = 4
    if not shutil.which("sbatch"):
        # submitit would quietly run the bare half on this machine instead
        raise SystemExit(
            "no sbatch: this benchmark needs a Slurm cluster (sudo slurm/start-local-cluster.sh)"
        )
    with tempfile.TemporaryDirectory(prefix="hpcx-bench-", dir=Path.cwd()) as tmp:
        bare = through_bare_submitit(Path(tmp), args.trials)
        ours, delays = through_hpc_executor(Path(tmp), args.trials)
    ratio = ours / bare
    median = statistics.median(delays)
    print(f"{'measure':44s} {'value':>10s}  target    ok")
    print(f"{'bare submitit map_array, wall (s)':44s} {bare:10.1f}")
    print(f"{'hpc-executor, wall (s)':44s} {ours:10.1f}")
    print(
        f"{'ratio hpc-executor / bare submitit':44s} {ratio:10.2f}  <= 1.15  {'yes' if ratio <= 1.15 else 'NO'}"
    )
    print(
        f"{'result file -> ledger, median (s)':44s} {median:10.2f}  <= 2     {'yes' if median <= 2 else 'NO'}"
    )
    print(f"{'result file -> ledger, max (s)':44s} {max(delays):10.2f}")


if __name__ == "__main__":
    main()
