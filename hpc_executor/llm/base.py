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
    # for gateways, local servers (required by openai_compatible) and the tests' fake
    base_url: str | None = None
    # the env var that holds the key; default per provider (openai_compatible: none)
    api_key_env: str | None = None
    stream: bool = True  # stream answers: the timeout then bounds silence, not the whole (long) answer
    check_model: bool = True  # ask the models endpoint at start-up; off for gateways that have none
    # HTTP attempts in flight per endpoint (provider + base_url), shared by all roles
    max_concurrency: int = 8


@dataclass
class LLMRequest:
    """One call. ``purpose`` and ``context`` let the offline stand-in answer without parsing prose;
    real providers send only ``system`` and ``prompt``."""

    prompt: str
    purpose: str  # "ideate", "exploit", "explore", "implement", "revise"
    system: str = ""
    thinking_budget: int | None = None  # overrides LLMSpec.thinking_budget for this call
    context: dict[str, Any] = field(default_factory=dict)


@dataclass
class LLMResponse:
    text: str
    model: str
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
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
