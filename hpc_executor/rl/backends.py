"""Which ``Policy`` a model group's ``policy:`` section names, built lazily: a backend's heavy
dependencies (transformers, vLLM, the tinker SDK) are imported only when a run uses it.

``policy.backend`` is ``transformers`` (the tiny model or any Hugging Face model, on the CPU),
``vllm`` (a served base model with LoRA adapters), ``tinker`` (the paper's service), or
``<module>:<Class>`` for a backend of your own (a ``Policy`` subclass taking the same arguments).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from omegaconf import DictConfig

from hpc_executor.errors import ConfigError
from hpc_executor.rl.policy import Policy, TrainSettings
from hpc_executor.scheduling import Scheduler


@dataclass(frozen=True)
class Backend:
    module: str
    name: str  # the Policy class in that module
    install: str  # what installs its dependencies


BACKENDS = {
    "transformers": Backend(
        "hpc_executor.rl.transformers_policy", "TransformersPolicy", "pip install -e '.[cpu]'"
    ),
    "vllm": Backend("hpc_executor.rl.vllm_policy", "VllmLoraPolicy", "pip install -e '.[gpu]'"),
    "tinker": Backend("hpc_executor.rl.tinker_policy", "TinkerPolicy", "pip install -e '.[tinker]'"),
}


def make_policy(
    policy_cfg: DictConfig, train: TrainSettings, work_dir: Path, scheduler: Scheduler | None
) -> Policy:
    """The policy ``policy_cfg`` (the model group's ``policy:`` section) names; its versions live
    under ``work_dir`` (``<run_dir>/policy``)."""
    problem = policy_problem(policy_cfg)
    if problem is not None:
        raise ConfigError(problem)
    work_dir.mkdir(parents=True, exist_ok=True)
    return policy_class(str(policy_cfg.backend))(policy_cfg, train, work_dir, scheduler)


def policy_problem(policy_cfg: DictConfig | None) -> str | None:
    """Why ``policy_cfg`` names no policy this installation can build, or None."""
    if not policy_cfg or not policy_cfg.get("backend") or not policy_cfg.get("model"):
        return (
            "strategy=rl trains a policy: the model group needs a policy section with backend "
            f"({', '.join(BACKENDS)}) and model (a path, a hub id, or tiny); use +model=tiny_policy, or "
            "see README, 'RL on the ideator'"
        )
    try:
        policy_class(str(policy_cfg.backend))
    except ConfigError as exc:
        return str(exc)
    return None


# every backend's constructor, as the RL seams fix it
PolicyFactory = Callable[[DictConfig, TrainSettings, Path, Scheduler | None], Policy]


def policy_class(name: str) -> PolicyFactory:
    """The ``Policy`` class of a backend name, or of ``<module>:<Class>``."""
    if name in BACKENDS:
        backend = BACKENDS[name]
    elif ":" in name:
        module_name, _, cls_name = name.partition(":")
        backend = Backend(module_name, cls_name, f"make {module_name} importable (PYTHONPATH)")
    else:
        raise ConfigError(
            f"model.policy.backend={name!r} is unknown; choose one of {', '.join(BACKENDS)}, "
            "or <module>:<Class> for a Policy of your own"
        )
    try:
        module = importlib.import_module(backend.module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and backend.module.startswith(exc.name):
            raise ConfigError(
                f"model.policy.backend={name!r}: its module {backend.module} is not in this installation"
            ) from exc
        raise ConfigError(
            f"model.policy.backend={name!r} needs the Python package {exc.name!r}, which is not installed: "
            f"{backend.install}"
        ) from exc
    cls = getattr(module, backend.name, None)
    if not (isinstance(cls, type) and issubclass(cls, Policy)):
        raise ConfigError(
            f"model.policy.backend={name!r}: {backend.module} has no Policy class {backend.name}"
        )
    return cast(PolicyFactory, cls)
