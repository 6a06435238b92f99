"""At-most-once execution: the driver is killed exactly in each window of a submission (after the
intent is recorded, after the jobs are submitted, after they are recorded), then the same command
runs again; every trial runs once, and the ledger names the job that ran it. Also: a second launch
of a claimed trial exits without touching it, and a requeue of the same job runs."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from collections import Counter
from pathlib import Path

import pytest
from conftest import run_search, search_cmd
from test_slurm import FAST, slurm

from hpc_executor import ledger as ledger_module
from hpc_executor.claim import claim_holder, claim_trial
from hpc_executor.crashpoints import CRASH_ENV
from hpc_executor.trial_dir import CLAIM_FILE, RESULT_FILE
from hpc_executor.worker import run_trial

RUN = "outputs/quick-offline-evolution-seed0"
WINDOWS = ["before_submit", "after_submit", "after_mark"]


def killed_at(window: str, args: tuple[str, ...], cwd: Path) -> None:
    """Run the driver until it kills itself at ``window``. Its output goes to a file: the jobs it
    leaves running inherit it, and a pipe would keep the caller waiting for them too."""
    with open(cwd / f"killed-at-{window}.log", "w") as out:
        driver = subprocess.Popen(search_cmd(*args), cwd=cwd, env={**os.environ, CRASH_ENV: window}, stdout=out,
                                  stderr=subprocess.STDOUT)  # fmt: skip
        assert driver.wait(timeout=300) == -9, (cwd / f"killed-at-{window}.log").read_text()[-3000:]


def kill_then_resume(tmp_path: Path, window: str, *args: str) -> tuple[dict, Counter]:
    runs = tmp_path / "runs.log"
    args = ("+env=quick", "+model=offline", "strategy.epochs=1", "strategy.batch_size=2",
            "+env.extra_env.QUICK_SLEEP_S=2", f"+env.extra_env.QUICK_RUN_LOG={runs}", "sandbox=none", *args)  # the log: outside the workspace  # fmt: skip
    killed_at(window, args, tmp_path)
    frames = ledger_module.load(tmp_path / RUN)
    assert len(frames["results"]) < len(frames["ideas"]), "killed before the epoch's trials ended"
    proc = run_search(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return ledger_module.load(tmp_path / RUN), Counter(runs.read_text().split())


def assert_ran_once_as_recorded(frames: dict, runs: Counter) -> None:
    trials = frames["trials"].merge(frames["results"], on="trial_id")
    ran = trials[trials.status == "ok"]
    assert len(ran) >= 2 and len(runs) == len(ran), f"every trial that ran logged it: {runs}"
    assert max(runs.values()) == 1, f"a trial ran twice: {runs}"
    assert (ran.submissions == 1).all(), "nothing was submitted twice"
    for _, row in ran.iterrows():
        assert row.provenance["job_id"] == row.job_id == claim_holder(Path(row.trial_dir)), (
            "the ledger names the job that ran the trial"
        )


@pytest.mark.parametrize("window", WINDOWS)
def test_a_driver_killed_in_any_window_of_a_local_submission(tmp_path: Path, window: str) -> None:
    assert_ran_once_as_recorded(*kill_then_resume(tmp_path, window))


@slurm
@pytest.mark.parametrize("window", WINDOWS)
def test_a_driver_killed_in_any_window_of_a_slurm_submission(tmp_path: Path, window: str) -> None:
    frames, runs = kill_then_resume(tmp_path, window, *FAST)
    assert_ran_once_as_recorded(frames, runs)
    assert frames["trials"].job_id.dropna().str.match(r"^\d+_\d+$").all(), "one array's tasks"


def test_a_second_launch_of_a_claimed_trial_leaves_it_alone(tmp_path: Path, quick_env: dict) -> None:
    from hpc_executor.trial_dir import TrialSpec

    trial = tmp_path / "t0"
    trial.mkdir()
    (trial / "patch.diff").write_text("")
    TrialSpec("t0", str(trial), quick_env).write()
    assert claim_trial(trial, "100_3")
    (trial / "workspace").mkdir()
    (trial / "workspace" / "busy").write_text("the first launch works here")
    run_trial(str(trial))  # outside any job: its id is host:pid, not the claimant's
    assert (trial / "workspace" / "busy").exists() and not (trial / RESULT_FILE).exists()
    assert json.loads((trial / CLAIM_FILE).read_text())["job_id"] == "100_3"


def test_a_requeued_job_holds_its_claim_and_runs(tmp_path: Path, quick_env: dict, monkeypatch) -> None:
    from hpc_executor.trial_dir import TrialSpec

    trial = tmp_path / "t0"
    trial.mkdir()
    (trial / "patch.diff").write_text("")
    TrialSpec("t0", str(trial), quick_env).write()
    for name, value in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "101", "SLURM_ARRAY_JOB_ID": "100",
                        "SLURM_ARRAY_TASK_ID": "3"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    assert claim_trial(trial, "100_3"), "the first run of job 100_3 claimed it"
    assert not claim_trial(trial, "100_4")
    run_trial(str(trial))  # the same job, requeued
    result = json.loads((trial / RESULT_FILE).read_text())
    assert result["status"] == "ok" and result["provenance"]["job_id"] == "100_3"


def test_a_claim_whose_job_is_gone_is_released_when_the_trial_goes_out_again(tmp_path: Path) -> None:
    args = ("+env=quick", "+model=offline", "strategy.epochs=1", "strategy.batch_size=1", "run_baseline=false",
            "scheduler.vanished_grace_s=1")  # fmt: skip
    killed_at("before_submit", args, tmp_path)
    trial = tmp_path / RUN / "trials" / "e0-000-t0"
    assert claim_trial(trial, "999999"), "a job, since gone, claimed the trial"
    proc = run_search(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "adopted 1 of 1 trials a killed driver had submitted (jobs 999999)" in proc.stdout
    frames = ledger_module.load(tmp_path / RUN)
    row = frames["trials"].merge(frames["results"], on="trial_id").iloc[0]
    assert row.status == "ok" and row.submissions == 2 and "999999 vanished" in row.note
    assert row.provenance["job_id"] == row.job_id == claim_holder(trial) != "999999"


def test_the_driver_follows_the_job_that_claimed_the_trial(tmp_path: Path) -> None:
    """Two launches raced (the resumed driver found nothing and submitted again while the first
    job's sbatch was still under way): the ledger names the loser; the claim names the job that runs."""
    runs = tmp_path / "runs.log"
    args = ("+env=quick", "+model=offline", "strategy.epochs=1", "strategy.batch_size=1", "run_baseline=false",
            "+env.extra_env.QUICK_SLEEP_S=8", f"+env.extra_env.QUICK_RUN_LOG={runs}",
            "sandbox=none")  # the log: outside the workspace  # fmt: skip
    killed_at("after_mark", args, tmp_path)
    db = sqlite3.connect(tmp_path / RUN / "ledger.sqlite")
    with db:
        db.execute("UPDATE trials SET job_id = '999998' WHERE trial_id = 'e0-000-t0'")  # the loser's id
    db.close()
    proc = run_search(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    frames = ledger_module.load(tmp_path / RUN)
    row = frames["trials"].merge(frames["results"], on="trial_id").iloc[0]
    assert row.status == "ok" and len(runs.read_text().split()) == 1
    assert row.job_id == row.provenance["job_id"] != "999998" and "claimed the trial, not 999998" in row.note


def test_a_result_names_the_job_that_ran_it(tmp_path: Path) -> None:
    from hpc_executor.ledger import Ledger
    from hpc_executor.types import Result, Status

    ledger = Ledger(tmp_path, create=True)
    ledger.add_trial("t0", "i0", 0, str(tmp_path / "t0"))
    ledger.mark_submitted([("t0", "500_1", 1)])
    ledger.record_results([Result("t0", Status.OK, reward=1.0, provenance={"job_id": "600_2"})])
    row = ledger.db.execute("SELECT job_id, array_index, state FROM trials").fetchone()
    assert tuple(row) == ("600_2", 2, "done")
