"""Every config in conf/ composes; the command line explains what is missing instead of crashing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from hpc_executor.cli import CONF_DIR, choices, missing_groups, role_shorthand
from hpc_executor.config import register_configs
from hpc_executor.environment import Environment
from hpc_executor.llm import PROVIDERS

register_configs()
ENVS, MODELS = choices("env"), choices("model")
STRATEGIES, SCHEDULERS = choices("strategy"), choices("scheduler")


def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("search", overrides=list(overrides))


@pytest.mark.parametrize("env", ENVS)
def test_every_env_composes_and_points_at_a_real_environment(env: str) -> None:
    cfg = composed(f"+env={env}", "+model=offline")
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    environment = Environment(cfg.env)
    assert environment.baseline_dir.is_dir()
    assert environment.catalog_path() is not None and environment.catalog_path().is_file()
    for rel in cfg.env.protected:
        assert (environment.baseline_dir / rel).is_file(), f"{env}: protected file {rel} does not exist"
    assert cfg.run_name == f"{env}-offline-evolution-seed0"


@pytest.mark.parametrize("model", MODELS)
def test_every_model_composes(model: str) -> None:
    cfg = composed("+env=grpo", f"+model={model}")
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    for role in ("ideator", "implementer"):
        assert cfg.model[role].provider in PROVIDERS


@pytest.mark.parametrize("llm", choices("llm"))
def test_every_llm_serves_either_role(llm: str) -> None:
    cfg = composed(
        "+env=grpo", "+model=opus", *role_shorthand([f"model.ideator={llm}", f"model.implementer={llm}"])
    )
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert cfg.model.ideator == cfg.model.implementer
    assert cfg.model.ideator.provider in PROVIDERS


def test_one_override_changes_one_role() -> None:
    """Self- vs cross-execution: the paper's Sonnet-ideas/GPT-5-code model is +model=sonnet plus one override."""
    crossed = composed("+env=grpo", "+model=sonnet", *role_shorthand(["model.implementer=gpt5"])).model
    paper = composed("+env=grpo", "+model=sonnet_ideas_gpt5_code").model
    assert crossed.ideator == paper.ideator and crossed.implementer == paper.implementer
    assert (crossed.ideator.model, crossed.implementer.model) == ("claude-sonnet-4-5", "gpt-5")


def test_role_shorthand_rewrites_only_model_names() -> None:
    argv = ["model.ideator=opus", "model.implementer=gpt5,sonnet", "model.ideator.max_tokens=4000",
            "model.implementer=no_such_llm", "+env=tiny"]  # fmt: skip
    assert role_shorthand(argv) == ["llm@model.ideator=opus", "llm@model.implementer=gpt5,sonnet",
                                    "model.ideator.max_tokens=4000", "model.implementer=no_such_llm", "+env=tiny"]  # fmt: skip


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_strategy_and_scheduler_composes(strategy: str, scheduler: str) -> None:
    cfg = composed("+env=tiny", "+model=opus", f"strategy={strategy}", f"scheduler={scheduler}")
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    assert cfg.strategy.name == ("rl" if strategy.startswith("rl") else strategy)  # rl_tiny: a preset of rl
    assert cfg.scheduler.name == (
        "slurm" if scheduler.startswith("slurm") else scheduler
    )  # profiles of a backend


def test_paper_models_keep_the_papers_settings() -> None:
    opus = composed("+env=grpo", "+model=opus").model
    assert opus.ideator.model == "claude-opus-4-5"
    assert (opus.ideator.thinking_budget, opus.ideator.thinking_budget_search) == (3000, 1500)
    assert (opus.implementer.max_tokens, opus.samples, opus.revisions) == (10000, 10, 2)
    gpt5 = composed("+env=grpo", "+model=gpt5").model
    assert gpt5.implementer.reasoning_effort == "minimal"
    mixed = composed("+env=grpo", "+model=sonnet_ideas_gpt5_code").model
    assert (mixed.ideator.provider, mixed.implementer.provider) == ("anthropic", "openai")


def test_missing_groups_are_detected_from_the_command_line() -> None:
    assert missing_groups([]) == ["env", "model"]
    assert missing_groups(["+env=tiny"]) == ["model"]
    assert missing_groups(["+env=tiny", "+model=offline", "seed=3"]) == []
    assert missing_groups(["--help"]) == []


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hpc_executor.search", *args], cwd=cwd, capture_output=True,
                          text=True, env=env or dict(os.environ), timeout=120)  # fmt: skip


def test_without_env_and_model_the_choices_are_listed(tmp_path: Path) -> None:
    proc = run_cli(cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "+env=tiny +model=offline" in proc.stderr
    for name in ENVS + MODELS:
        assert name in proc.stderr
    assert not (tmp_path / "outputs").exists()


def test_grpo_with_opus_and_no_key_stops_before_any_work(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    proc = run_cli(
        "+env=grpo", "+model=opus", "env.data_dir=" + str(tmp_path / "no-data"), cwd=tmp_path, env=env
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "ANTHROPIC_API_KEY" in proc.stderr
    assert "data missing" in proc.stderr and "prepare_data.py" in proc.stderr
    assert not (tmp_path / "outputs").exists(), "a run that never started leaves no directory"


def test_check_only_prints_the_plan_and_leaves_nothing(tmp_path: Path) -> None:
    proc = run_cli("+env=tiny", "+model=offline", "check_only=true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "3 epochs x 4 ideas" in proc.stdout and "exploit slots per epoch [0, 2, 2]" in proc.stdout
    assert not (tmp_path / "outputs").exists()


def test_help_explains_the_command() -> None:
    proc = run_cli("--help", cwd=Path.cwd())
    assert "+env=ENV +model=MODEL" in proc.stdout and "scripted stand-in" in proc.stdout


def test_auto_prepare_builds_missing_data_once(tmp_path: Path) -> None:
    env = Environment(composed("+env=tiny", "+model=offline", f"env.data_dir={tmp_path / 'data'}").env)
    assert env.missing_data() == ["train.bin", "val.bin", "meta.json"]
    env.prepare()
    assert env.missing_data() == []
    before = (tmp_path / "data" / "train.bin").stat().st_mtime_ns
    env.prepare()  # nothing missing: nothing rebuilt
    assert (tmp_path / "data" / "train.bin").stat().st_mtime_ns == before


def test_a_failing_data_prep_says_why(tmp_path: Path) -> None:
    from hpc_executor.errors import PreflightError

    cfg = composed("+env=tiny", "+model=offline", f"env.data_dir={tmp_path / 'data'}").env
    cfg.prepare_command = ["{python}", "-c", "raise SystemExit('no disk space')"]
    with pytest.raises(PreflightError, match="no disk space"):
        Environment(cfg).prepare()


@pytest.mark.parametrize(
    "override",
    ["model.samples=0", "model.revisions=-1", "strategy.epochs=0", "strategy.batch_size=0", "strategy.call_size=0",
     "model.implementer.max_concurrency=0", "model.ideator.max_tokens=0", "budget_usd=-5", "env.budget_s=0"],
)  # fmt: skip
def test_values_below_their_bounds_are_rejected_before_any_work(tmp_path: Path, override: str) -> None:
    proc = run_cli("+env=tiny", "+model=offline", "check_only=true", override, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout
    assert "Traceback" not in proc.stderr and override.split("=")[0] in proc.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    "name", ["../escape", "a/b", "/tmp/abs", "", ".hidden", "..", "x,../escape", "back\\slash"]
)
def test_a_run_name_that_is_no_plain_directory_name_is_rejected(tmp_path: Path, name: str) -> None:
    work = tmp_path / "work"
    work.mkdir()
    sweep = ["--multirun"] if "," in name else []  # each name of a sweep is judged
    proc = run_cli(*sweep, "+env=tiny", "+model=offline", "check_only=true", f"run_name={name}", cwd=work)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "is not a plain directory name" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["work"] and not any(work.iterdir())


def test_a_run_name_composed_from_other_keys_is_judged_too(tmp_path: Path) -> None:
    proc = run_cli("+env=tiny", "+model=offline", "check_only=true", "run_name=seed-${seed}/x", cwd=tmp_path)
    assert proc.returncode == 2 and "run_name='seed-0/x' is not a plain directory name" in proc.stderr


def test_a_search_path_that_does_not_exist_is_an_error(tmp_path: Path) -> None:
    missing = tmp_path / "my-conf"
    proc = run_cli(f"hydra.searchpath=[file://{missing}]", "+env=tiny", "+model=offline", "check_only=true",
                   cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2, proc.stdout
    assert f"no directory '{missing}'" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs").exists()
    missing.mkdir()
    proc = run_cli(f"hydra.searchpath=[file://{missing}]", "+env=tiny", "+model=offline", "check_only=true",
                   cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
