"""LLM providers behind one interface: anthropic, openai, openai_compatible (vLLM, llama.cpp, ollama) and
the offline scripted stand-in."""

from __future__ import annotations

from typing import Any

from hpc_executor.errors import ConfigError
from hpc_executor.llm.base import LLM, LLMRequest, LLMResponse, LLMSpec

__all__ = ["LLM", "LLMRequest", "LLMResponse", "LLMSpec", "make_llm", "spec_from_config"]

PROVIDERS = ("anthropic", "openai", "openai_compatible", "offline")


def spec_from_config(cfg: Any) -> LLMSpec:
    """An LLMSpec from a model config's ideator/implementer node (extra keys are ignored)."""
    fields = LLMSpec.__dataclass_fields__
    return LLMSpec(**{k: v for k, v in dict(cfg).items() if k in fields})


def make_llm(spec: LLMSpec) -> LLM:
    """The provider's client; raises PreflightError when its API key is missing (call ``check_model`` to
    also ask the provider whether it serves the model)."""
    if spec.provider == "anthropic":
        from hpc_executor.llm.anthropic_provider import AnthropicLLM

        return AnthropicLLM(spec)
    if spec.provider == "openai":
        from hpc_executor.llm.openai_provider import OpenAILLM

        return OpenAILLM(spec)
    if spec.provider == "openai_compatible":
        from hpc_executor.llm.openai_compatible_provider import OpenAICompatibleLLM

        return OpenAICompatibleLLM(spec)
    if spec.provider == "offline":
        from hpc_executor.llm.offline import OfflineLLM

        return OfflineLLM(spec)
    raise ConfigError(f"model provider {spec.provider!r} is unknown; choose one of {', '.join(PROVIDERS)}")
