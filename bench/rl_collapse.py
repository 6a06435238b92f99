"""The paper's RL findings on the CPU preset (run on demand, not a test): over seeds, does the mean
reward of the last steps rise above the first step's beyond noise, does the number of distinct
ideas fall (the collapse), and does a mitigation keep it higher?

    python bench/rl_collapse.py [--seeds 3] [--steps 8] [--group 32] [--smoke]

Each (seed, variant) is one ``python -m hpc_executor.search +env=quick +model=tiny_policy
strategy=rl`` run (the tiny causal LM the code builds, the offline stand-in implementing its ideas on
the tests' quick environment, whose trials take about a second); the numbers come from
``analysis.rl_steps`` over its ledger. Variants: no mitigation, the paper's Jaccard penalty against
the previous step, and our novelty bonus.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hpc_executor import analysis

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "none": [],
    "jaccard_penalty (paper)": ["strategy.mitigations.jaccard_penalty.enabled=true"],
    "novelty_bonus (ours)": ["strategy.mitigations.novelty_bonus.enabled=true"],
}


def run(out: Path, variant: str, seed: int, steps: int, group: int, lr: float) -> Path:
    run_dir = out / f"{variant.split()[0]}-seed{seed}"
    extra = VARIANTS[variant]
    command = [
        sys.executable, "-m", "hpc_executor.search", f"hydra.searchpath=[file://{REPO / 'tests' / 'conf'}]",
        "+env=quick", "+model=tiny_policy", "strategy=rl", f"strategy.steps={steps}", f"strategy.group_size={group}",
        f"strategy.learning_rate={lr}", "strategy.lora_rank=8", f"seed={seed}", "report.enabled=false",
        "sandbox=none", f"hydra.run.dir={run_dir}", *extra,
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"run failed ({' '.join(command)}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return run_dir


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} ± {sd:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--group", type=int, default=32, help="samples per step")
    parser.add_argument(
        "--lr", type=float, default=1e-2, help="the tiny model learns at a large rate (5e-2 breaks it)"
    )
    parser.add_argument("--last", type=int, default=2, help="steps averaged as 'the last steps'")
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
        print(f"{args.seeds} seeds x {args.steps} steps x {args.group} samples, lr {args.lr:g}; 'last' = the last "
              f"{args.last} steps (mean ± sd over seeds)")  # fmt: skip
        header = f"{'variant':<26}{'reward step 1':>16}{'reward last':>16}{'distinct step 1':>17}{'distinct last':>16}"
        rows = []
        for name in args.variants:
            first_r, last_r, first_d, last_d = [], [], [], []
            start = time.monotonic()
            for seed in range(args.seeds):
                steps = analysis.rl_steps(run(out, name, seed, args.steps, args.group, args.lr))
                tail = steps.tail(args.last)
                first_r.append(float(steps.mean_reward.iloc[0]))
                last_r.append(float(tail.mean_reward.mean()))
                first_d.append(float(steps.distinct_near.iloc[0]))
                last_d.append(float(tail.distinct_near.mean()))
            rows.append(f"{name:<26}{mean_sd(first_r):>16}{mean_sd(last_r):>16}{mean_sd(first_d):>17}"
                        f"{mean_sd(last_d):>16}   ({time.monotonic() - start:.0f}s)")  # fmt: skip
        print(header)
        print("\n".join(rows))
        print("distinct: near-duplicate groups of the step's ideas (token Jaccard >= 0.6)")


if __name__ == "__main__":
    main()
