"""Open-weight models behind an OpenAI-compatible server (vLLM, llama.cpp's llama-server, ollama) through
the Chat Completions API, streamed or not. Such servers need no key unless started with one."""

from __future__ import annotations

import random
import re
import time
from collections.abc import Callable
from typing import Any

from openai.types import CompletionUsage

from hpc_executor.errors import ConfigError, PreflightError
from hpc_executor.llm.base import LLMRequest, LLMSpec
from hpc_executor.llm.openai_provider import OpenAILLM, cache_routing, sampling
from hpc_executor.llm.retry import Completion, StreamFailed, log

# A leading reasoning block, as Qwen3 and its kin write it when the server runs no reasoning parser;
# unclosed when the answer was cut off while still thinking.
_THINK = re.compile(r"\A\s*<think>.*?(?:</think>|\Z)\s*", re.DOTALL)


def strip_think(text: str) -> str:
    """The answer without a leading ``<think>…</think>`` block."""
    return _THINK.sub("", text, count=1)


class OpenAICompatibleLLM(OpenAILLM):
    api_name = "an OpenAI-compatible Chat Completions API"

    def __init__(
        self, spec: LLMSpec, sleep: Callable[[float], None] = time.sleep, rng: random.Random | None = None
    ) -> None:
        if not spec.base_url:
            raise ConfigError(
                f"openai_compatible model {spec.model!r} needs base_url, the server's OpenAI-compatible"
                " endpoint, e.g. http://localhost:8000/v1 for `vllm serve`"
            )
        super().__init__(spec, sleep, rng)

    def _attempt(self, request: LLMRequest) -> Completion:
        spec = self.spec
        system = [{"role": "system", "content": request.system}] if request.system else []
        kwargs: dict[str, Any] = {
            "model": spec.model,
            "messages": [*system, {"role": "user", "content": request.user_text}],
            "max_tokens": spec.max_tokens,
            **sampling(spec, {"reasoning_effort": spec.reasoning_effort}),
            **cache_routing(spec, request),
        }
        if spec.stream:
            text, finish, usage = self._streamed_chat(kwargs)
        else:
            completion = self._client.chat.completions.create(**kwargs)
            choice = completion.choices[0]
            text, finish, usage = choice.message.content or "", choice.finish_reason, completion.usage
        truncated = finish == "length"
        if truncated:
            log.warning("%s: answer cut off at max_tokens=%d", self.label, spec.max_tokens)
        # The <think> block's tokens stay counted: completion_tokens includes them, and they took GPU time.
        details = (
            usage.prompt_tokens_details if usage else None
        )  # vLLM: only with --enable-prompt-tokens-details
        return Completion(
            strip_think(text),
            int(usage.prompt_tokens) if usage else 0,
            int(usage.completion_tokens) if usage else 0,
            truncated,
            cache_read_tokens=int(details.cached_tokens or 0) if details else 0,
        )

    def _streamed_chat(self, kwargs: dict[str, Any]) -> tuple[str, str, CompletionUsage | None]:
        """(text, finish_reason, usage); the usage comes in a last chunk without choices."""
        parts: list[str] = []
        finish: str | None = None
        usage: CompletionUsage | None = None
        stream = self._client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
        with stream:
            for chunk in stream:
                usage = chunk.usage or usage
                for choice in chunk.choices:
                    parts.append(choice.delta.content or "")
                    finish = choice.finish_reason or finish
        if finish is None:
            raise StreamFailed(None, "the stream ended without a finish_reason")
        return "".join(parts), finish, usage

    def _find_model(self) -> None:
        # Local servers name models after what they loaded (a path, an HF id, a tag): list and compare.
        served = [model.id for model in self._client.models.list()]
        if self.spec.model not in served:
            raise PreflightError(
                f"{self.label}: the server at {self._client.base_url} serves"
                f" {', '.join(served) or 'no model'}, not {self.spec.model!r}: set model to one of those"
            )
