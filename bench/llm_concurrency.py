"""LLM concurrency benchmark (run on demand, not a test): the implementer implements B ideas x N samples
for the tiny environment through the real OpenAI SDK provider, max_concurrency C, against the fake server
(its own process) answering after a fixed latency L.

    python bench/llm_concurrency.py [--ideas 10] [--samples 10] [--caps 16 ...] [--latencies 0.2 ...] [--plain]
    python bench/llm_concurrency.py --smoke    # 2 ideas x 2 samples, C=2, L=0.05 s: does it still run?

Every answer is a diff that does not apply and revisions are off, so that every sample is asked for
once (B*N calls) and every answer goes through the real check (git apply on a scratch copy of the
baseline), as in a search. Target: wall time <= 1.25 x the ideal ceil(B*N/C) * L: the pool, the cap,
the SDK, the retry wrapper and the checks add little to what the server's latency costs anyway.
One row per (C, L).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra import compose, initialize_config_dir

from hpc_executor.cli import CONF_DIR
from hpc_executor.config import register_configs
from hpc_executor.environment import Environment
from hpc_executor.implementer import Implementer
from hpc_executor.llm.base import LLMSpec
from hpc_executor.llm.openai_provider import OpenAILLM
from hpc_executor.types import Idea

FAKE = Path(__file__).resolve().parent.parent / "tests" / "fakes" / "llm_server.py"
KEY_ENV = "HPCX_BENCH_FAKE_KEY"  # a variable of our own, so that no real key is ever sent, even to loopback
# A diff whose context is not in train.py: git apply refuses it, after the real check ran.
STALE = Path(__file__).resolve().parent / "data" / "stale_tiny.diff"


@contextmanager
def fake_server(latency_s: float) -> Iterator[str]:
    """The fake as a process of its own, so that its threads do not share our interpreter lock."""
    cmd = [
        sys.executable,
        str(FAKE),
        "--port",
        "0",
        "--latency-s",
        str(latency_s),
        "--reply-text-file",
        str(STALE),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield proc.stdout.readline().split()[-1]
    finally:
        proc.terminate()
        proc.wait(10)


def wall_time(ideas: int, samples: int, cap: int, latency_s: float, stream: bool) -> float:
    env = tiny_environment()
    with fake_server(latency_s) as url:
        spec = LLMSpec(
            provider="openai",
            model="gpt-5",
            base_url=url + "/v1",
            api_key_env=KEY_ENV,
            max_concurrency=cap,
            stream=stream,
            max_retries=0,  # a failure should show, not hide inside the timing
        )
        llm = OpenAILLM(spec)
        implementer = Implementer(llm, env, samples, revisions=0, thinking_budget=0)
        batch = [Idea(f"e0-{i:03d}", 0, f"idea {i}", "Raise the learning rate.") for i in range(ideas)]
        implementer.implement(Idea("warm-up", 0, "warm-up", "lazy imports and the first connections"))
        start = time.perf_counter()
        done = list(implementer.implement_all(batch))
        elapsed = time.perf_counter() - start
    calls = [c for _, _, idea_calls in done for c in idea_calls]
    errors = [c.response.error for c in calls if c.response.error]
    if errors or len(calls) != ideas * samples:
        raise SystemExit(f"{len(errors)} of {len(calls)} calls failed, e.g. {errors[:1]}")
    if {c.outcome for c in calls} != {"failed_to_apply"}:
        raise SystemExit(f"unexpected outcomes {sorted({c.outcome for c in calls})}: the checks did not run")
    return elapsed


def tiny_environment() -> Environment:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return Environment(compose("search", ["+env=tiny", "+model=offline"]).env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ideas", type=int, default=10, help="B")
    parser.add_argument("--samples", type=int, default=10, help="N, samples per idea")
    parser.add_argument("--caps", type=int, nargs="+", default=[16], help="C, max_concurrency")
    parser.add_argument("--latencies", type=float, nargs="+", default=[0.2], help="L, the fake's latency (s)")
    parser.add_argument("--plain", action="store_true", help="no streaming")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes: check that it runs, not its numbers"
    )
    args = parser.parse_args()
    if args.smoke:
        args.ideas, args.samples, args.caps, args.latencies = 2, 2, [2], [0.05]
    os.environ[KEY_ENV] = "sk-bench-not-a-real-key"
    register_configs()
    calls = args.ideas * args.samples
    print(f"{'B':>4} {'N':>4} {'C':>4} {'L_s':>6} {'stream':>6} {'wall_s':>7} {'ideal_s':>7} {'ratio':>6}")
    for cap in args.caps:
        for latency in args.latencies:
            wall = wall_time(args.ideas, args.samples, cap, latency, stream=not args.plain)
            ideal = math.ceil(calls / cap) * latency
            print(
                f"{args.ideas:>4} {args.samples:>4} {cap:>4} {latency:>6.3f} {'no' if args.plain else 'yes':>6}"
                f" {wall:>7.2f} {ideal:>7.2f} {wall / ideal:>6.2f}"
            )


if __name__ == "__main__":
    main()
