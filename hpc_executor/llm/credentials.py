"""Which environment variable holds each provider's API key, checked before anything starts."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

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
TINKER_KEY_ENV = "TINKER_API_KEY"  # the RL policy backend tinker (see policy_env_vars)
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


def policy_env_vars(policy_cfg: Mapping[str, Any] | None) -> list[str]:
    """The environment variables an RL policy (the model group's ``policy:`` section) needs: the
    Tinker key for ``backend: tinker`` (``api_key_env``, default TINKER_API_KEY); none otherwise."""
    if not policy_cfg or policy_cfg.get("backend") != "tinker":
        return []
    return [str(policy_cfg.get("api_key_env") or TINKER_KEY_ENV)]
