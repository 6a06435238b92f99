"""Which environment variable holds each provider's API key, checked before anything starts."""

from __future__ import annotations

import os

from hpc_executor.errors import ConfigError, PreflightError
from hpc_executor.llm.base import LLMSpec

DEFAULT_KEY_ENV = {"anthropic": "ANTHROPIC_API_KEY", "openai": "OPENAI_API_KEY", "offline": None}


def required_env_vars(spec: LLMSpec) -> list[str]:
    """The environment variables this model needs; the offline stand-in needs none."""
    if spec.provider not in DEFAULT_KEY_ENV:
        raise ConfigError(
            f"unknown LLM provider {spec.provider!r}; choose one of {', '.join(sorted(DEFAULT_KEY_ENV))}"
        )
    default = DEFAULT_KEY_ENV[spec.provider]
    if default is None:
        return []
    return [spec.api_key_env or default]


def api_key(spec: LLMSpec) -> tuple[str, str]:
    """(key, name of the variable it came from); a PreflightError names the variable when it is unset."""
    (name,) = required_env_vars(spec)
    key = os.environ.get(name, "").strip()
    if not key:
        raise PreflightError(
            f"{spec.provider} model {spec.model!r} needs an API key: set the environment variable {name}"
            " (or set api_key_env in the model config to the variable that holds it)"
        )
    return key, name
