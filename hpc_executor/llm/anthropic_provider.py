"""Claude through the Messages API, streamed or not, with extended thinking when a thinking budget is set."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import Any

import anthropic

from hpc_executor.errors import ConfigError
from hpc_executor.llm.base import LLMRequest, LLMSpec
from hpc_executor.llm.retry import Completion, RetryingLLM, SdkErrors, StreamFailed, log

MIN_THINKING_BUDGET = 1024  # the API's floor for budget_tokens
CACHE_BREAKPOINT = {"type": "ephemeral"}  # the 5-minute cache, refreshed by every hit


class AnthropicLLM(RetryingLLM):
    sdk_errors = SdkErrors(
        api_error=anthropic.APIError,
        status_error=anthropic.APIStatusError,
        connection_error=anthropic.APIConnectionError,
        timeout_error=anthropic.APITimeoutError,
    )
    api_name = "the Anthropic Messages API"

    def __init__(
        self, spec: LLMSpec, sleep: Callable[[float], None] = time.sleep, rng: random.Random | None = None
    ) -> None:
        budget = spec.thinking_budget
        if budget and not MIN_THINKING_BUDGET <= budget < spec.max_tokens:
            raise ConfigError(
                f"thinking_budget {budget} must be 0 (off) or between {MIN_THINKING_BUDGET} and"
                f" max_tokens ({spec.max_tokens}), exclusive: thinking tokens count toward max_tokens"
            )
        if budget and spec.temperature != 1.0:
            log.warning(
                "anthropic:%s: temperature %g ignored: thinking needs 1", spec.model, spec.temperature
            )
        super().__init__(spec, sleep, rng)

    def _make_client(self, key: str) -> anthropic.Anthropic:
        return anthropic.Anthropic(
            api_key=key, base_url=self.spec.base_url, timeout=self.spec.timeout_s, max_retries=0
        )

    def _attempt(self, request: LLMRequest) -> Completion:
        spec = self.spec
        budget = spec.thinking_budget if request.thinking_budget is None else request.thinking_budget
        kwargs: dict[str, Any] = {
            "model": spec.model,
            "max_tokens": spec.max_tokens,
            "messages": [{"role": "user", "content": request.prompt}],
        }
        system = system_blocks(request, cache=spec.prompt_cache)
        if system:
            kwargs["system"] = system
        if budget > 0:
            # Thinking requires the default temperature (1), so none is sent.
            kwargs["thinking"] = {"type": "enabled", "budget_tokens": budget}
        elif spec.temperature != 1.0:
            # The SDK dropped `temperature` from create() in 1.0; the API still takes it, in the body,
            # for the models that allow sampling. At 1.0 (the API default) it is left out, since the
            # newest models reject the field altogether.
            kwargs["extra_body"] = {"temperature": spec.temperature}
        if spec.stream:
            # The SDK's accumulator builds the same Message as create() returns, usage included.
            with self._client.messages.stream(**kwargs) as stream:
                message = stream.get_final_message()
            if message.stop_reason is None:
                raise StreamFailed(None, "the stream ended without message_delta and message_stop")
        else:
            message = self._client.messages.create(**kwargs)
        truncated = message.stop_reason == "max_tokens"
        if truncated:
            log.warning("%s: answer cut off at max_tokens=%d", self.label, spec.max_tokens)
        text = "".join(block.text for block in message.content if block.type == "text")
        usage = message.usage
        # The API counts input apart from what the cache wrote and read; a Completion counts all of it.
        written, read = int(usage.cache_creation_input_tokens or 0), int(usage.cache_read_input_tokens or 0)
        return Completion(
            text,
            int(usage.input_tokens) + written + read,
            int(usage.output_tokens),
            truncated,
            cache_write_tokens=written,
            cache_read_tokens=read,
        )

    def _find_model(self) -> None:
        self._client.models.retrieve(self.spec.model)  # 404 for a name (or alias) the API does not know


def system_blocks(request: LLMRequest, *, cache: bool) -> str | list[dict[str, Any]]:
    """The system prompt, then the shared prefix as a block of its own ending in a cache breakpoint.

    The prefix goes into the system prompt rather than the user message because a change of thinking
    settings invalidates cache breakpoints in messages but not in the system prompt, and the ideator's
    thinking budget differs between its purposes. One breakpoint is used (the API allows four); a prefix
    shorter than the model's minimum cacheable length (1024 to 4096 tokens) is simply not cached."""
    if not request.prefix:
        return request.system
    prefix: dict[str, Any] = {"type": "text", "text": request.prefix}
    if cache:
        prefix["cache_control"] = CACHE_BREAKPOINT
    return [*([{"type": "text", "text": request.system}] if request.system else []), prefix]
