"""The steady_mix benchmark environment: its duration mix is deterministic per trial id and has
the asked-for shares, its trials crash or finish as planned, and every idea of its catalog applies."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_worker import result_of

from hpc_executor.config import register_configs
from hpc_executor.environment import REPO_ROOT, Environment
from hpc_executor.implementer import Implementer
from hpc_executor.llm import LLMSpec
from hpc_executor.llm.offline import OfflineLLM
from hpc_executor.trial_dir import DIFF_FILE, TrialSpec
from hpc_executor.types import Idea, Status
from hpc_executor.worker import run_trial

CONF_DIR, BENCH_CONF = REPO_ROOT / "conf", REPO_ROOT / "bench" / "conf"
spec = importlib.util.spec_from_file_location("mix", REPO_ROOT / "bench/envs/steady_mix/baseline/mix.py")
assert spec is not None and spec.loader is not None
mix = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mix)


def steady_mix_config(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("search", overrides=[f"hydra.searchpath=[file://{BENCH_CONF}]", "+env=steady_mix",
                                            "+model=offline", "scheduler=slurm", *overrides])  # fmt: skip


def test_the_mix_has_its_shares_and_bounds_and_is_the_same_for_the_same_trial() -> None:
    plans = [mix.plan(f"e{e}-{s:03d}-t0", 10.0, {}) for e in range(40) for s in range(50)]
    crashed = [p for p in plans if p.crashes]
    assert len(crashed) / len(plans) == pytest.approx(0.3, abs=0.03)
    assert all(0 <= p.seconds <= 0.5 for p in crashed), "within the first 5% of the budget"
    finished = [p.seconds for p in plans if not p.crashes]
    assert (
        min(finished) >= 6.0
        and max(finished) <= 10.0
        and sum(finished) / len(finished) == pytest.approx(8, abs=0.2)
    )
    assert mix.plan("e3-007-t0", 10.0, {}) == mix.plan("e3-007-t0", 10.0, {})
    assert mix.plan("e3-007-t0", 10.0, {}) != mix.plan("e3-008-t0", 10.0, {})
    never = {"STEADY_MIX_CRASH_SHARE": "0", "STEADY_MIX_MIN": "1", "STEADY_MIX_MAX": "1"}
    assert {mix.plan(f"t{i}", 4.0, never) for i in range(20)} == {mix.plan("t0", 4.0, never)}
    assert mix.plan("t0", 4.0, never) == mix.Plan(False, 4.0)


def test_the_config_composes_and_its_environment_is_whole() -> None:
    cfg = steady_mix_config()
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    env = Environment(cfg.env)
    assert env.baseline_dir.is_dir() and env.catalog_path().is_file() and env.missing_data() == []
    assert cfg.env.resources.gpus == 1 and dict(cfg.env.extra_env)["STEADY_MIX_CRASH_SHARE"] == "0.3"


def run_as(tmp_path: Path, trial_id: str, env_cfg: dict) -> tuple[Status, float]:
    trial_dir = tmp_path / trial_id
    trial_dir.mkdir()
    (trial_dir / DIFF_FILE).write_text("")
    TrialSpec(trial_id, str(trial_dir), env_cfg, sandbox="none").write()
    run_trial(str(trial_dir))
    result = result_of(trial_dir)
    return result.status, result.runtime_s


def test_its_trials_crash_early_or_run_as_planned(tmp_path: Path) -> None:
    cfg = steady_mix_config("env.budget_s=2")
    env_cfg = OmegaConf.to_container(cfg.env, resolve=True) | {"dir": str(Environment(cfg.env).dir)}
    ids = (f"e0-{s:03d}-t0" for s in itertools.count())
    crash = next(i for i in ids if mix.plan(i, 2.0, {}).crashes)
    finish = next(i for i in ids if not mix.plan(i, 2.0, {}).crashes)
    assert run_as(tmp_path, crash, env_cfg)[0] is Status.CRASHED
    status, runtime = run_as(tmp_path, finish, env_cfg)
    assert status is Status.OK and runtime >= mix.plan(finish, 2.0, {}).seconds


def test_every_idea_of_its_catalog_applies_alone_and_combined() -> None:
    env = Environment(steady_mix_config().env)
    catalog = yaml.safe_load(env.catalog_path().read_text())
    llm = OfflineLLM(LLMSpec(provider="offline", model="scripted-stand-in"))
    recipes = [f"{e['id']} v=0.7" for e in catalog] + [
        f"{a['id']} | {b['id']}" for a, b in itertools.pairwise(catalog)
    ]
    for recipe in recipes:
        patch, calls = Implementer(llm, env, 1, 0, 0).implement(Idea("e0-000", 0, "t", f"(recipe: {recipe})"))
        assert patch.status == "applied" and len(calls) == 1, (recipe, patch.reason)
