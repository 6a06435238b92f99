"""Which environment variable holds each provider's API key, checked before anything starts."""

from __future__ import annotations

import os

from hpc_executor.errors import ConfigError, PreflightError
from hpc_executor.llm.base import LLMSpec

# openai_compatible servers (vLLM, llama.cpp, ollama) run without a key unless started with one, in which
# case api_key_env names the variable that holds it.
DEFAULT_KEY_ENV = {
    "anthropic": "ANTHROPIC_API_KEY",
    "openai": "OPENAI_API_KEY",
    "openai_compatible": None,
    "offline": None,
}
PLACEHOLDER_KEY = "EMPTY"  # sent when no key is needed: the SDK insists on one, keyless servers ignore it


def required_env_vars(spec: LLMSpec) -> list[str]:
    """The environment variables this model needs; the offline stand-in and keyless servers need none."""
    if spec.provider not in DEFAULT_KEY_ENV:
        raise ConfigError(
            f"unknown LLM provider {spec.provider!r}; choose one of {', '.join(sorted(DEFAULT_KEY_ENV))}"
        )
    if spec.provider == "offline":
        return []
    name = spec.api_key_env or DEFAULT_KEY_ENV[spec.provider]
    return [name] if name else []


def api_key(spec: LLMSpec) -> tuple[str, str | None]:
    """(key, name of the variable it came from, None for the placeholder); a PreflightError names the
    variable when it is unset."""
    names = required_env_vars(spec)
    if not names:
        return PLACEHOLDER_KEY, None
    (name,) = names
    key = os.environ.get(name, "").strip()
    if not key:
        raise PreflightError(
            f"{spec.provider} model {spec.model!r} needs an API key: set the environment variable {name}"
            " (or set api_key_env in the model config to the variable that holds it)"
        )
    return key, name
