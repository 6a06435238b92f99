"""Shared fixtures: the toy `quick` environment and a way to run the real command line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

# A test that forgets a base_url must fail here, not reach the internet: the SDKs read these when
# base_url is unset, and every process a test starts inherits them.
os.environ["ANTHROPIC_BASE_URL"] = os.environ["OPENAI_BASE_URL"] = "http://127.0.0.1:9"

REPO = Path(__file__).resolve().parent.parent
TEST_CONF = REPO / "tests" / "conf"
QUICK_DIR = REPO / "tests" / "envs" / "quick"


def quick_env_config(**overrides: object) -> dict:
    """The `quick` environment's env config as a plain dict, with overrides (dotted keys allowed)."""
    cfg = OmegaConf.load(TEST_CONF / "env" / "quick.yaml").env
    cfg.dir = str(QUICK_DIR)
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return OmegaConf.to_container(cfg)


def search_cmd(*args: str) -> list[str]:
    flags = [a for a in args if a.startswith("-")]  # Hydra wants --multirun before the overrides
    overrides = [a for a in args if not a.startswith("-")]
    return [
        sys.executable,
        "-m",
        "hpc_executor.search",
        *flags,
        f"hydra.searchpath=[file://{TEST_CONF}]",
        *overrides,
    ]


def run_search(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 300):
    return subprocess.run(
        search_cmd(*args),
        cwd=cwd,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def quick_env() -> dict:
    return quick_env_config()
