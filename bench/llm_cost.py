"""LLM cost benchmark (run on demand, not a test): what prompt caching saves on the implementer's input.

For the nanoGPT environment's real implementer prompt (the line-numbered codebase, then the idea), B ideas x
10 samples x (1 + revisions) calls go through the real Implementer and the Anthropic provider (real SDK)
to the loopback server, which emulates Anthropic's prompt cache (exact prefix bytes up to the breakpoint,
an entry readable once the answer that wrote it has begun, 5-minute lifetime). Every answer is a diff that
does not apply, so every sample is revised to the end, each revision carrying the failed diff and git's
error after the prefix. Run twice: caching on (cache_control on the prefix) and off.

    python bench/llm_cost.py [--ideas 8] [--samples 10] [--revisions 2] [--concurrency 32] [--smoke]

Dollars at Opus 4.5 prices (conf/llm/opus.yaml): $5 input, $6.25 cache write, $0.50 cache read per million.
Target: cached input dollars <= 0.35 x uncached. Output tokens (thinking and diff) cost the same both ways
and are shown apart. Tokens are the fake's (4 characters each), not Claude's tokenizer's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import yaml
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from fakes.llm_server import FakeLLMServer, Reply  # noqa: E402

from hpc_executor.environment import Environment  # noqa: E402
from hpc_executor.implementer import Implementer  # noqa: E402
from hpc_executor.llm import LLMResponse, LLMSpec  # noqa: E402
from hpc_executor.llm.anthropic_provider import AnthropicLLM  # noqa: E402
from hpc_executor.types import Idea  # noqa: E402

KEY_ENV = "HPCX_BENCH_FAKE_KEY"  # a variable of our own, so that no real key is ever sent, even to loopback
OPUS = yaml.safe_load((REPO / "conf/llm/opus.yaml").read_text())
THINKING = 3000  # the paper's implementer budget, billed as output
TARGET = 0.35


def answer(catalog: list[dict]) -> str:
    """A real catalog diff whose removed lines were changed, so that it no longer applies."""
    diff = catalog[0]["diff"]
    for name, values in catalog[0].get("params", {}).items():
        diff = diff.replace(f"<<{name}>>", values[0])
    lines = [f"{line}  # stale" if line.startswith("-") and not line.startswith("---") else line
             for line in diff.splitlines()]  # fmt: skip
    return "Here is the change.\n```diff\n" + "\n".join(lines) + "\n```"


def run(
    env: Environment, ideas: list[Idea], args: argparse.Namespace, cache: bool, text: str
) -> dict[str, float]:
    reply = Reply(text=text, output_tokens=THINKING + len(text) // 4)
    with FakeLLMServer(latency_s=args.latency_s, prompt_cache=True, default=reply) as server:
        prices = {k: v for k, v in OPUS.items() if k.startswith("price_")}
        spec = LLMSpec("anthropic", OPUS["model"], base_url=server.url, api_key_env=KEY_ENV, prompt_cache=cache,
                       thinking_budget=THINKING, max_concurrency=args.concurrency, **prices)  # fmt: skip
        implementer = Implementer(AnthropicLLM(spec), env, args.samples, args.revisions, THINKING)
        start = time.monotonic()
        responses: list[LLMResponse] = [
            c.response for _, _, calls in implementer.implement_all(ideas) for c in calls
        ]
        wall = time.monotonic() - start
    errors = [r.error for r in responses if r.error]
    if errors:
        raise SystemExit(f"{len(errors)} calls failed, e.g. {errors[0]}")
    total = {key: sum(getattr(r, key) for r in responses)
             for key in ("input_tokens", "cache_write_tokens", "cache_read_tokens", "output_tokens", "cost_usd")}  # fmt: skip
    total["calls"], total["wall_s"] = len(responses), wall
    total["output_usd"] = total["output_tokens"] * OPUS["price_out_per_mtok"] / 1e6
    total["input_usd"] = total["cost_usd"] - total["output_usd"]
    return total


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ideas", type=int, default=8, help="B, ideas implemented together (a batch)")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--revisions", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight (opus.yaml: 32)")
    parser.add_argument("--latency-s", type=float, default=0.05, help="the fake's delay before each answer")
    parser.add_argument("--smoke", action="store_true", help="one idea: finishes in seconds")
    args = parser.parse_args(argv)
    if args.smoke:
        args.ideas = 1
    os.environ.setdefault(KEY_ENV, "sk-bench-dummy")
    env = Environment(OmegaConf.to_container(OmegaConf.load(REPO / "conf/env/nanogpt.yaml").env))
    catalog = yaml.safe_load(env.catalog_path().read_text())  # type: ignore[union-attr]
    ideas = [Idea(f"e0-{n:03d}", 0, catalog[n % len(catalog)]["title"], catalog[n % len(catalog)]["description"])
             for n in range(args.ideas)]  # fmt: skip
    text = answer(catalog)
    rows = {
        name: run(env, ideas, args, cache, text) for name, cache in (("uncached", False), ("cached", True))
    }
    print(f"nanoGPT implementer, {args.ideas} ideas x {args.samples} samples x (1 + {args.revisions} revisions), "
          f"{args.concurrency} in flight, Opus prices")  # fmt: skip
    head = (
        "",
        "calls",
        "input tok",
        "cache write",
        "cache read",
        "billed plain",
        "input $",
        "output $",
        "wall s",
    )
    print(f"{head[0]:<9}" + "".join(f"{h:>13}" for h in head[1:]))
    for name, t in rows.items():
        plain = t["input_tokens"] - t["cache_write_tokens"] - t["cache_read_tokens"]
        cells = [f"{t['calls']:.0f}", f"{t['input_tokens']:,.0f}", f"{t['cache_write_tokens']:,.0f}",
                 f"{t['cache_read_tokens']:,.0f}", f"{plain:,.0f}", f"{t['input_usd']:.4f}",
                 f"{t['output_usd']:.4f}", f"{t['wall_s']:.1f}"]  # fmt: skip
        print(f"{name:<9}" + "".join(f"{c:>13}" for c in cells))
    ratio = rows["cached"]["input_usd"] / rows["uncached"]["input_usd"]
    whole = rows["cached"]["cost_usd"] / rows["uncached"]["cost_usd"]
    verdict = "meets" if ratio <= TARGET else "MISSES"
    print(f"input $ cached / uncached = {ratio:.3f} ({verdict} the target <= {TARGET}); "
          f"with output $ = {whole:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
