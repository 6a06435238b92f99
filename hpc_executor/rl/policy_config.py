"""A backend's ``policy:`` section read against its schema (a dataclass of defaults)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from hpc_executor.errors import ConfigError


def read_policy_config(policy_cfg: DictConfig, schema: type[Any], model_hint: str) -> DictConfig:
    """``policy_cfg`` over ``schema``'s defaults. An unknown key or a wrong type is a ConfigError that
    lists the backend's keys; an empty ``model`` one that says what to give (``model_hint``)."""
    backend = schema.__dataclass_fields__["backend"].default
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(schema), policy_cfg)
    except (ConfigKeyError, ValidationError) as exc:
        keys = ", ".join(schema.__dataclass_fields__)
        raise ConfigError(
            f"model.policy (backend {backend}): {str(exc).splitlines()[0]}; its keys are {keys}"
        ) from exc
    assert isinstance(cfg, DictConfig)
    if not cfg.model:
        raise ConfigError(f"model.policy.model is not set: give {model_hint}")
    return cfg
