"""LLM concurrency benchmark (run on demand, not a test): B ideas x N samples calls through the real OpenAI
SDK provider, C at a time, against the fake server (its own process) answering after a fixed latency L.

    python bench/llm_concurrency.py [--ideas 10] [--samples 10] [--caps 16 ...] [--latencies 0.2 ...] [--plain]

Target: wall time <= 1.25 x the ideal ceil(B*N/C) * L: the concurrency cap, the SDK and the retry wrapper
add little to what the server's latency costs anyway. One row per (C, L).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

from hpc_executor.llm.base import LLMRequest, LLMSpec
from hpc_executor.llm.openai_provider import OpenAILLM

FAKE = Path(__file__).resolve().parent.parent / "tests" / "fakes" / "llm_server.py"
KEY_ENV = "HPCX_BENCH_FAKE_KEY"  # a variable of our own, so that no real key is ever sent, even to loopback
REQUEST = LLMRequest(prompt="Implement the idea as a unified diff.", purpose="implement")


@contextmanager
def fake_server(latency_s: float) -> Iterator[str]:
    """The fake as a process of its own, so that its threads do not share our interpreter lock."""
    cmd = [sys.executable, str(FAKE), "--port", "0", "--latency-s", str(latency_s)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        yield proc.stdout.readline().split()[-1]
    finally:
        proc.terminate()
        proc.wait(10)


def wall_time(calls: int, cap: int, latency_s: float, stream: bool) -> float:
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
        llm.complete(REQUEST)  # warm-up: lazy imports and the first connection
        with ThreadPoolExecutor(cap) as pool:
            start = time.perf_counter()
            responses = list(pool.map(lambda _: llm.complete(REQUEST), range(calls)))
            elapsed = time.perf_counter() - start
    errors = [r.error for r in responses if r.error]
    if errors:
        raise SystemExit(f"{len(errors)} of {calls} calls failed, e.g. {errors[0]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ideas", type=int, default=10, help="B")
    parser.add_argument("--samples", type=int, default=10, help="N, samples per idea")
    parser.add_argument("--caps", type=int, nargs="+", default=[16], help="C, max_concurrency and pool size")
    parser.add_argument("--latencies", type=float, nargs="+", default=[0.2], help="L, the fake's latency (s)")
    parser.add_argument("--plain", action="store_true", help="no streaming")
    args = parser.parse_args()
    os.environ[KEY_ENV] = "sk-bench-not-a-real-key"
    calls = args.ideas * args.samples
    print(f"{'B':>4} {'N':>4} {'C':>4} {'L_s':>6} {'stream':>6} {'wall_s':>7} {'ideal_s':>7} {'ratio':>6}")
    for cap in args.caps:
        for latency in args.latencies:
            wall = wall_time(calls, cap, latency, stream=not args.plain)
            ideal = math.ceil(calls / cap) * latency
            print(
                f"{args.ideas:>4} {args.samples:>4} {cap:>4} {latency:>6.3f} {'no' if args.plain else 'yes':>6}"
                f" {wall:>7.2f} {ideal:>7.2f} {wall / ideal:>6.2f}"
            )


if __name__ == "__main__":
    main()
