"""The paper's RL findings on the CPU preset (run on demand, not a test): over seeds, does the mean
reward of the last steps rise above the first step's beyond noise, does the number of distinct
ideas fall (the collapse), and does a mitigation keep it higher?

    python bench/rl_collapse.py [--seeds 3] [--steps 16] [--group 32] [--jobs 2] [--smoke]

Each (seed, variant) is one ``python -m hpc_executor.search +env=quick +model=tiny_policy
strategy=rl_tiny`` run (the tiny causal LM the code builds, the offline stand-in implementing its
ideas on the tests' quick environment, whose trials take about a second); the numbers come from
``analysis.rl_steps`` over its ledger. Variants: no mitigation, the paper's Jaccard penalty against
the previous step, our novelty bonus and our fitness sharing (at exponents 1 and 0.5). Seeds of one variant share their first
step (the same seed builds the same model and draws the same samples), so the change from the first
step is a paired difference: ``t`` is its mean over its standard error across seeds.
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

from hpc_executor import analysis

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "none": [],
    "jaccard_penalty (paper)": ["strategy.mitigations.jaccard_penalty.enabled=true"],
    "novelty_bonus (ours)": ["strategy.mitigations.novelty_bonus.enabled=true"],
    "fitness_sharing (ours)": ["strategy.mitigations.fitness_sharing.enabled=true"],
    "fitness_sharing^0.5": [
        "strategy.mitigations.fitness_sharing.enabled=true",
        "strategy.mitigations.fitness_sharing.exponent=0.5",
    ],
}
MEASURES = {"mean_reward": "reward", "distinct_near": "distinct", "largest_group": "largest"}


def run(out: Path, variant: str, seed: int, steps: int, group: int) -> pd.DataFrame:
    """One RL run; its per-step metrics."""
    run_dir = out / f"{variant.split()[0].replace('^', '-')}-seed{seed}"
    command = [
        sys.executable, "-m", "hpc_executor.search", f"hydra.searchpath=[file://{REPO / 'tests' / 'conf'}]",
        "+env=quick", "+model=tiny_policy", "strategy=rl_tiny", f"strategy.steps={steps}",
        f"strategy.group_size={group}", f"seed={seed}", "report.enabled=false", "sandbox=none",
        f"hydra.run.dir={run_dir}", *VARIANTS[variant],
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"run failed ({' '.join(command)}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return analysis.rl_steps(run_dir)


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def paired_t(changes: list[float]) -> str:
    """Mean change over its standard error ("-" with one seed, "inf" when every seed moved alike)."""
    if len(changes) < 2:
        return "-"
    error = statistics.stdev(changes) / math.sqrt(len(changes))
    mean = statistics.mean(changes)
    return f"{mean / error:+.1f}" if error > 0 else ("0" if mean == 0 else "inf")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--group", type=int, default=32, help="samples per step")
    parser.add_argument("--last", type=int, default=4, help="steps averaged as 'the last steps'")
    parser.add_argument("--jobs", type=int, default=2, help="runs at once (each uses about one core)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--keep", type=Path, help="keep the runs here (default: a temporary directory)")
    parser.add_argument(
        "--smoke", action="store_true", help="one seed, two steps of 4: checks the bench runs"
    )
    args = parser.parse_args()
    if args.smoke:
        args.seeds, args.steps, args.group, args.last, args.variants = 1, 2, 4, 1, ["none"]
    with tempfile.TemporaryDirectory(prefix="hpcx-rl-collapse-") as tmp:
        out = args.keep or Path(tmp)
        print(f"strategy=rl_tiny, {args.seeds} seeds x {args.steps} steps x {args.group} samples, {args.jobs} "
              f"runs at once; 'last' = the mean of the last {args.last} steps; mean ± sd over seeds")  # fmt: skip
        start = time.monotonic()
        runs = [(v, s) for v in args.variants for s in range(args.seeds)]
        with ThreadPoolExecutor(args.jobs) as pool:
            frames = dict(
                zip(runs, pool.map(lambda r: run(out, *r, args.steps, args.group), runs), strict=True)
            )
        header = f"{'variant':<24}" + "".join(
            f"{f'{label} step 1':>18}{f'{label} last':>18}{'t':>6}" for label in MEASURES.values()
        )
        print(header)
        for variant in args.variants:
            row = f"{variant:<24}"
            for column in MEASURES:
                first = [float(frames[variant, s][column].iloc[0]) for s in range(args.seeds)]
                last = [float(frames[variant, s][column].tail(args.last).mean()) for s in range(args.seeds)]
                changes = [b - a for a, b in zip(first, last, strict=True)]
                row += f"{mean_sd(first):>18}{mean_sd(last):>18}{paired_t(changes):>6}"
            print(row)
        print(f"distinct: near-duplicate groups of a step's {args.group} samples' ideas (token Jaccard >= 0.6); "
              f"largest: the largest group, the paper's '119 of 128'; t: paired change first -> last over its standard "
              f"error ({time.monotonic() - start:.0f}s in all)")  # fmt: skip


if __name__ == "__main__":
    main()
