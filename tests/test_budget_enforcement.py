"""The worker enforces the training budget itself: it kills training at budget_s + save_margin_s and
records the training time it measured, so a diff that ignores the budget is cut off and a diff that
reports a shorter training time than it took gains nothing."""

from __future__ import annotations

import difflib
import sys
import time
from pathlib import Path

import pytest
from conftest import quick_env_config

from hpc_executor.environment import Environment
from hpc_executor.errors import ConfigError
from hpc_executor.trial_dir import DIFF_FILE, RESULT_FILE, TrialSpec
from hpc_executor.types import Result, Status
from hpc_executor.worker import run_trial

sys.path.insert(0, str(Path(__file__).parent))
from test_env_nanogpt import BASELINE as NANOGPT_BASELINE
from test_env_nanogpt import nanogpt_cpu_env, synthetic_data  # noqa: F401  (a fixture)


def run(tmp_path: Path, env: dict, diff: str = "") -> tuple[Result, float]:
    trial_dir = tmp_path / "trial"
    trial_dir.mkdir()
    (trial_dir / DIFF_FILE).write_text(diff)
    TrialSpec("t1", str(trial_dir), env, seed=0).write()
    start = time.monotonic()
    run_trial(str(trial_dir))
    return Result.from_json((trial_dir / RESULT_FILE).read_text()), time.monotonic() - start


def edit(baseline: Path, name: str, old: str, new: str) -> str:
    """A unified diff (as git prints it) that replaces `old` by `new` in one baseline file."""
    before = (baseline / name).read_text()
    assert before.count(old) == 1, old
    after = before.replace(old, new)
    lines = difflib.unified_diff(
        before.splitlines(keepends=True), after.splitlines(keepends=True), f"a/{name}", f"b/{name}"
    )
    return "".join(lines)


def test_the_kill_comes_at_the_budget_plus_the_margin_never_past_the_hard_limit() -> None:
    assert (
        Environment(quick_env_config(budget_s=5, hard_limit_s=10)).train_limit_s == 10
    )  # no margin: hard limit
    assert Environment(quick_env_config(budget_s=5, save_margin_s=2, hard_limit_s=10)).train_limit_s == 7
    assert Environment(quick_env_config(budget_s=5, save_margin_s=20, hard_limit_s=10)).train_limit_s == 10
    with pytest.raises(ConfigError, match="save_margin_s"):
        Environment(quick_env_config(save_margin_s=-1))


def test_training_past_the_budget_is_killed_at_budget_plus_margin(tmp_path: Path) -> None:
    env = quick_env_config(
        budget_s=1, save_margin_s=1, hard_limit_s=60, **{"extra_env": {"QUICK_SLEEP_S": "30"}}
    )
    result, took = run(tmp_path, env)
    assert result.status is Status.TIMEOUT and result.reward is None
    assert "budget of 1s + 1s" in result.reason
    assert took < 20, "killed at 2 s (+ the group's grace), long before the hard limit"


def test_the_recorded_training_time_is_the_workers_measurement(tmp_path: Path) -> None:
    env = quick_env_config(save_margin_s=3, **{"extra_env": {"QUICK_SLEEP_S": "1"}})
    result, took = run(tmp_path, env)
    assert result.status is Status.OK, result.reason
    assert 1.0 <= result.metrics["train_seconds"] < took


def nanogpt_trial(tmp_path: Path, data: Path, old: str, new: str) -> tuple[Result, float]:
    """The nanogpt_cpu baseline with one edit of train_gpt.py, through the worker: 4 s of budget + 3 s."""
    diff = edit(NANOGPT_BASELINE, "train_gpt.py", old, new)
    return run(tmp_path, nanogpt_cpu_env(data, budget_s=4, save_margin_s=3), diff)


@pytest.mark.slow
def test_a_nanogpt_diff_that_ignores_the_budget_is_cut_off_and_cannot_win(
    tmp_path: Path,
    synthetic_data: Path,  # noqa: F811
) -> None:
    result, took = nanogpt_trial(
        tmp_path,
        synthetic_data,
        "out_of_time = elapsed_s + step_time + hp.save_reserve_s >= budget_s",
        "out_of_time = False  # train until the step limit, whatever the budget",
    )
    assert result.status is Status.TIMEOUT and result.reward is None, result.reason
    assert "budget of 4s + 3s" in result.reason
    assert took < 40


@pytest.mark.slow
def test_a_nanogpt_checkpoint_cannot_claim_a_shorter_training_time(
    tmp_path: Path,
    synthetic_data: Path,  # noqa: F811
) -> None:
    result, _ = nanogpt_trial(
        tmp_path,
        synthetic_data,
        '"model_config": dataclasses.asdict(hp.model),',
        '"model_config": dataclasses.asdict(hp.model),\n            "train_seconds": 0.5,',
    )
    assert result.status in (Status.OK, Status.INVALID_RESULT), result.reason
    measured = result.metrics["train_seconds"]
    assert measured > 2.0, "the worker's clock, not the checkpoint's 0.5 s"
    assert result.metrics["time_to_target_s"] in (None, measured)
