"""What a call costs when part of its input came from, or went into, the provider's prompt cache.

Input tokens are billed at three prices: plain input, cache writes (Anthropic charges 1.25x input for its
5-minute cache; OpenAI charges nothing extra) and cache reads (about a tenth of input for both). A model
config gives the cache prices in USD per million tokens; where it gives none, the provider's published
multiple of the input price below applies."""

from __future__ import annotations

from dataclasses import dataclass

from hpc_executor.llm.base import LLMSpec

# (cache write, cache read) as multiples of the input price, per provider, from the providers' pricing
# pages (taken 2026-12-01). OpenAI's read discount differs by model family (0.1x for GPT-5, more for older
# models): its model configs give the price itself. Local servers: no known discount.
CACHE_MULTIPLIERS = {
    "anthropic": (1.25, 0.1),
    "openai": (1.0, 0.1),
    "openai_compatible": (1.0, 1.0),
    "offline": (1.0, 1.0),
}


@dataclass(frozen=True)
class TokenCounts:
    """The tokens of one call; ``input`` counts all input tokens, the cached ones included."""

    input: int
    output: int
    cache_write: int = 0
    cache_read: int = 0

    @property
    def uncached_input(self) -> int:
        return self.input - self.cache_write - self.cache_read


def cache_prices(spec: LLMSpec) -> tuple[float, float]:
    """(cache write, cache read) in USD per million tokens for this model."""
    write_x, read_x = CACHE_MULTIPLIERS.get(spec.provider, (1.0, 1.0))
    write = spec.price_cache_write_per_mtok
    read = spec.price_cache_read_per_mtok
    return (
        spec.price_in_per_mtok * write_x if write is None else write,
        spec.price_in_per_mtok * read_x if read is None else read,
    )


def cost_usd(spec: LLMSpec, tokens: TokenCounts) -> float:
    """The call's cost, each kind of token at its own price."""
    write, read = cache_prices(spec)
    return (
        tokens.uncached_input * spec.price_in_per_mtok
        + tokens.cache_write * write
        + tokens.cache_read * read
        + tokens.output * spec.price_out_per_mtok
    ) / 1e6


def uncached_cost_usd(spec: LLMSpec, tokens: TokenCounts) -> float:
    """What the call would have cost had every input token been billed as plain input."""
    return (tokens.input * spec.price_in_per_mtok + tokens.output * spec.price_out_per_mtok) / 1e6
