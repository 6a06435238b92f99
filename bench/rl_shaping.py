"""RL shaping and step-metrics benchmark (run on demand, not a test): what the mitigations and the
per-step metrics cost the RL loop at the paper's scale.

    python bench/rl_shaping.py [--group 128] [--steps 68] [--smoke]

The paper's nanoGPT run drew groups of 128 ideas for 68+ epochs: by then the novelty bonus compares
each new idea with ~8,700 earlier ones, and the metrics cluster every step's ideas. Ideas here are
random 15-40-word texts over a Zipf-like vocabulary (a few words in nearly every idea, as "the" and
"learning rate" are in real ones), the worst case for the shared-word index.
"""

from __future__ import annotations

import argparse
import random
import time

import pandas as pd

from hpc_executor.rl import metrics
from hpc_executor.rl.shaping import shape_rewards

VOCABULARY = [f"w{i}" for i in range(3000)]
WEIGHTS = [1 / (rank + 1) for rank in range(len(VOCABULARY))]
ALL_ON = {name: {"enabled": True} for name in ("length_reward", "jaccard_penalty", "novelty_bonus")}


def idea(rng: random.Random) -> str:
    return " ".join(rng.choices(VOCABULARY, WEIGHTS, k=rng.randint(15, 40)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--group", type=int, default=128, help="samples per step (the paper: 128 or 256)")
    parser.add_argument("--steps", type=int, default=68, help="steps before the one shaped")
    parser.add_argument("--smoke", action="store_true", help="a tiny run, to check the benchmark runs")
    args = parser.parse_args()
    if args.smoke:
        args.group, args.steps = 16, 4
    rng = random.Random(0)
    steps = [[idea(rng) for _ in range(args.group)] for _ in range(args.steps + 1)]
    *before, current = steps
    earlier = [text for step in before for text in step]

    start = time.perf_counter()
    shape_rewards([1.0] * args.group, current, [1000] * args.group, before[-1], earlier, ALL_ON)
    shaping = time.perf_counter() - start

    samples = pd.DataFrame(
        [{"step": s, "sample_index": i, "text": "", "thinking_chars": rng.randint(0, 5000), "answer_chars": 100,
          "idea_id": f"{s}-{i}", "title": text, "description": "", "executed": rng.random() < 0.5,
          "reward": rng.random()} for s, step in enumerate(steps) for i, text in enumerate(step)]
    )  # fmt: skip
    start = time.perf_counter()
    frame = metrics.step_metrics(samples)
    measuring = time.perf_counter() - start
    assert len(frame) == len(steps)

    print(f"{'measure':36s} {'setting':44s} {'time':>9s}")
    print(f"{'shape_rewards (all mitigations on)':36s} "
          f"{f'{args.group} samples vs {len(earlier):,} earlier ideas':44s} {shaping:8.3f}s")  # fmt: skip
    print(f"{'step_metrics':36s} {f'{len(steps)} steps x {args.group} samples':44s} {measuring:8.3f}s")


if __name__ == "__main__":
    main()
