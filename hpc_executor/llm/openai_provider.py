"""OpenAI models through the Responses API, streamed or not, with a reasoning effort when one is set."""

from __future__ import annotations

from typing import Any

import openai
from openai.types.responses import Response

from hpc_executor.llm.base import LLMRequest, LLMSpec
from hpc_executor.llm.retry import Completion, RetryingLLM, SdkErrors, StreamFailed, log


def sampling(spec: LLMSpec, reasoning: dict[str, Any]) -> dict[str, Any]:
    """``reasoning`` (the API's spelling of the effort) when an effort is set, else the temperature.
    Reasoning models reject sampling parameters, so temperature goes only without reasoning, and only
    when it is not the API default (1.0)."""
    if spec.reasoning_effort:
        return reasoning
    return {"temperature": spec.temperature} if spec.temperature != 1.0 else {}


def cache_routing(spec: LLMSpec, request: LLMRequest) -> dict[str, Any]:
    """``prompt_cache_key``: OpenAI caches long prompt prefixes by itself, and routes calls with the same key
    to the same machines, so calls sharing the codebase find it there. No key when caching is off."""
    return {"prompt_cache_key": request.cache_key} if spec.prompt_cache and request.cache_key else {}


class OpenAILLM(RetryingLLM):
    sdk_errors = SdkErrors(
        api_error=openai.APIError,
        status_error=openai.APIStatusError,
        connection_error=openai.APIConnectionError,
        timeout_error=openai.APITimeoutError,
    )
    api_name = "the OpenAI Responses API"

    def _make_client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(
            api_key=key, base_url=self.spec.base_url, timeout=self.spec.timeout_s, max_retries=0
        )

    def _attempt(self, request: LLMRequest) -> Completion:
        spec = self.spec
        kwargs: dict[str, Any] = {
            "model": spec.model,
            "input": request.user_text,
            "max_output_tokens": spec.max_tokens,
            **sampling(spec, {"reasoning": {"effort": spec.reasoning_effort}}),
            **cache_routing(spec, request),
        }
        if request.system:
            kwargs["instructions"] = request.system
        response = self._streamed(kwargs) if spec.stream else self._client.responses.create(**kwargs)
        truncated = response.status == "incomplete"
        if truncated:
            reason = response.incomplete_details.reason if response.incomplete_details else "unknown"
            log.warning(
                "%s: answer incomplete (%s), max_output_tokens=%d", self.label, reason, spec.max_tokens
            )
        usage = response.usage
        details = usage.input_tokens_details if usage else None
        return Completion(
            response.output_text,
            int(usage.input_tokens) if usage else 0,
            int(usage.output_tokens) if usage else 0,
            truncated,
            # Writes are reported (and billed above plain input) from gpt-5.6 on; older models and servers omit them.
            cache_write_tokens=int(getattr(details, "cache_write_tokens", None) or 0),
            cache_read_tokens=int(getattr(details, "cached_tokens", None) or 0),
        )

    def _streamed(self, kwargs: dict[str, Any]) -> Response:
        """The response a stream ends with: its last event carries it whole, usage included."""
        with self._client.responses.create(**kwargs, stream=True) as events:
            for event in events:
                if event.type in ("response.completed", "response.incomplete"):
                    return event.response
                # A kind is always given: None would read as a stream that merely ended early.
                if event.type == "response.failed":
                    error = event.response.error
                    raise StreamFailed(error.code, error.message) if error else StreamFailed(event.type, "")
                if event.type == "error":
                    raise StreamFailed(event.code or "error", event.message)
        raise StreamFailed(None, "the stream ended without response.completed")

    def _find_model(self) -> None:
        self._client.models.retrieve(self.spec.model)  # 404 for a name the API does not know
