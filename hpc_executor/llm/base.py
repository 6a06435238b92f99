"""The one interface the ideator and the implementer talk to, whatever the provider."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any


@dataclass
class LLMSpec:
    """Which model to call and how; one of these per role (ideator, implementer)."""

    provider: str  # "anthropic", "openai", "openai_compatible" (vLLM, llama.cpp, ollama) or "offline"
    model: str  # the provider's model name, e.g. "claude-opus-4-5"
    temperature: float = 1.0
    max_tokens: int = 10000
    thinking_budget: int = 0  # Anthropic extended thinking; 0 turns it off
    reasoning_effort: str | None = None  # OpenAI Responses API, e.g. "minimal"
    timeout_s: float = 600.0
    max_retries: int = 6  # on 429 / 529 / 5xx / timeouts, with exponential backoff
    backoff_s: float = 2.0  # first backoff; doubles each retry, capped at backoff_max_s, then jittered
    backoff_max_s: float = 60.0
    price_in_per_mtok: float = 0.0  # USD per million input tokens
    price_out_per_mtok: float = 0.0  # USD per million output tokens (thinking included)
    # USD per million input tokens written to / read from the provider's prompt cache; None: the provider's
    # published multiple of price_in_per_mtok (see llm/pricing.py)
    price_cache_write_per_mtok: float | None = None
    price_cache_read_per_mtok: float | None = None
    # mark the prompt's shared prefix for the provider's cache: Anthropic cache_control, OpenAI prompt_cache_key
    prompt_cache: bool = True
    # for gateways, local servers (required by openai_compatible) and the tests' fake
    base_url: str | None = None
    # the env var that holds the key; default per provider (openai_compatible: none)
    api_key_env: str | None = None
    stream: bool = True  # stream answers: the timeout then bounds silence, not the whole (long) answer
    check_model: bool = True  # ask the models endpoint at start-up; off for gateways that have none
    # HTTP attempts in flight per endpoint (provider + base_url), shared by all roles
    max_concurrency: int = 8
    # offline stand-in only: seconds each call takes (at most max_concurrency at once), so that a
    # benchmark's calls take as long as a thinking model's; real providers take what they take
    latency_s: float = 0.0


@dataclass
class LLMRequest:
    """One call. ``purpose`` and ``context`` let the offline stand-in answer without parsing prose;
    real providers send only ``system``, ``prefix`` and ``prompt``, in that order.

    ``prefix`` is the part shared by many calls (the codebase), byte-identical between them so that the
    provider's prompt cache can serve it; ``prompt`` is this call's own part (the idea, the error)."""

    prompt: str
    purpose: str  # "ideate", "exploit", "explore", "implement", "revise"
    system: str = ""
    prefix: str = ""
    cache_key: str = ""  # names the prefix (environment + role): OpenAI routes calls with one key together
    thinking_budget: int | None = None  # overrides LLMSpec.thinking_budget for this call
    context: dict[str, Any] = field(default_factory=dict)

    @property
    def user_text(self) -> str:
        """The prefix and the prompt as one text: what a provider without cache blocks sends, and the ledger."""
        return f"{self.prefix}\n\n{self.prompt}" if self.prefix else self.prompt


@dataclass
class LLMResponse:
    text: str
    model: str
    input_tokens: int = 0  # every input token, those the cache wrote or served included
    output_tokens: int = 0
    cache_write_tokens: int = 0  # input tokens written to the prompt cache (billed above the input price)
    cache_read_tokens: int = 0  # input tokens served by the prompt cache (billed far below it)
    cost_usd: float = 0.0  # what the call cost, each kind of token at its own price
    cache_saved_usd: float = 0.0  # what the same tokens would have cost uncached, minus cost_usd
    latency_s: float = 0.0
    attempts: int = 1  # 1 + retries
    error: str | None = None  # set when every attempt failed; text is then ""
    truncated: bool = False  # the answer stopped at max_tokens, so a diff in it may be cut off


class LLM(abc.ABC):
    """A chat model. ``complete`` never raises for provider errors: after its retries it returns a
    response with ``error`` set, so that one bad call never stops a run."""

    def __init__(self, spec: LLMSpec) -> None:
        self.spec = spec

    @property
    def label(self) -> str:
        return f"{self.spec.provider}:{self.spec.model}"

    @abc.abstractmethod
    def complete(self, request: LLMRequest) -> LLMResponse: ...

    def check_model(self) -> None:  # noqa: B027 -- a no-op on purpose: stand-ins have nothing to check
        """Raise PreflightError when the provider cannot serve this model (unknown name, key refused,
        endpoint unreachable); called once at start-up, before anything is submitted."""
