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
        if request.system:
            kwargs["system"] = request.system
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
        return Completion(text, int(message.usage.input_tokens), int(message.usage.output_tokens), truncated)

    def _find_model(self) -> None:
        self._client.models.retrieve(self.spec.model)  # 404 for a name (or alias) the API does not know
