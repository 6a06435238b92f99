"""OpenAI models through the Responses API, with a reasoning effort when one is set."""

from __future__ import annotations

from typing import Any

import openai

from hpc_executor.llm.base import LLMRequest
from hpc_executor.llm.retry import Completion, RetryingLLM, SdkErrors, log


class OpenAILLM(RetryingLLM):
    sdk_errors = SdkErrors(
        api_error=openai.APIError,
        status_error=openai.APIStatusError,
        connection_error=openai.APIConnectionError,
        timeout_error=openai.APITimeoutError,
    )

    def _make_client(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(
            api_key=key, base_url=self.spec.base_url, timeout=self.spec.timeout_s, max_retries=0
        )

    def _attempt(self, request: LLMRequest) -> Completion:
        spec = self.spec
        kwargs: dict[str, Any] = {
            "model": spec.model,
            "input": request.prompt,
            "max_output_tokens": spec.max_tokens,
        }
        if request.system:
            kwargs["instructions"] = request.system
        if spec.reasoning_effort:
            # Reasoning models reject sampling parameters, so temperature goes only without reasoning,
            # and only when it is not the API default (1.0).
            kwargs["reasoning"] = {"effort": spec.reasoning_effort}
        elif spec.temperature != 1.0:
            kwargs["temperature"] = spec.temperature
        response = self._client.responses.create(**kwargs)
        if response.status == "incomplete":
            reason = response.incomplete_details.reason if response.incomplete_details else "unknown"
            log.warning(
                "%s: answer incomplete (%s), max_output_tokens=%d", self.label, reason, spec.max_tokens
            )
        usage = response.usage
        return Completion(
            response.output_text, usage.input_tokens if usage else 0, usage.output_tokens if usage else 0
        )
