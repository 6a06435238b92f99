"""GPU-hours per trial, epoch and run in the ledger, and budget_gpu_hours: the stop and the resume."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from conftest import run_search

from hpc_executor import gpu_hours
from hpc_executor import ledger as ledger_module
from hpc_executor.ledger import Ledger
from hpc_executor.types import Result, Status

RUN = "outputs/quick-offline-evolution-seed0"


def test_a_result_records_when_it_ran_and_its_gpu_hours(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, create=True)
    ledger.add_trial("t-ran", "i", 0, str(tmp_path / "t-ran"))
    ledger.add_trial("t-never-ran", "j", 0, str(tmp_path / "t-never-ran"))
    ledger.record_results([
        Result("t-ran", Status.OK, reward=1.0, runtime_s=1800.0,
               provenance={"started_at": 1000.0, "gpus_per_trial": 8}),
        Result("t-never-ran", Status.IMPLEMENT_FAILED),
    ])  # fmt: skip
    usage = {r["trial_id"]: dict(r) for r in ledger.db.execute("SELECT * FROM trial_usage")}
    assert usage["t-ran"] == {"trial_id": "t-ran", "gpus": 8, "runtime_s": 1800.0, "started_at": 1000.0,
                              "ended_at": 2800.0, "gpu_hours": 4.0}  # fmt: skip
    assert usage["t-never-ran"]["gpu_hours"] == 0.0 and usage["t-never-ran"]["started_at"] is None
    assert gpu_hours.spent(ledger) == 4.0
    assert gpu_hours.by_epoch(ledger) == [
        {"epoch": 0, "purpose": "search", "trials": 2, "gpu_hours": 4.0, "runtime_s": 1800.0}
    ]


def test_an_older_ledger_gains_usage_rows_from_its_results(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, create=True)
    ledger.record_results([Result("t0", Status.OK, reward=1.0, runtime_s=3600.0,
                                  provenance={"started_at": 5.0, "cuda_visible_devices": "0,1"})])  # fmt: skip
    ledger.db.execute("DROP TABLE trial_usage")  # as a ledger written before the table existed
    ledger.close()
    reopened = Ledger(tmp_path)
    assert gpu_hours.spent(reopened) == 2.0, "two visible GPUs for an hour"


def test_budget_gpu_hours_stops_new_trials_and_a_larger_budget_goes_on(tmp_path: Path) -> None:
    run_log = tmp_path / "runs.log"
    # trials "hold one GPU" (the local scheduler runs them one at a time then) and take >= 1 s:
    # >= 0.00028 GPU-hours each, so a budget of 0.0004 is spent after the second trial
    args = ["+env=quick", "+model=offline", "env.resources.gpus=1", "+env.extra_env.QUICK_SLEEP_S=1",
            f"+env.extra_env.QUICK_RUN_LOG={run_log}", "sandbox=none"]  # the log: outside the workspace  # fmt: skip
    first = run_search(*args, "budget_gpu_hours=0.0004", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    out = first.stdout + first.stderr
    assert "the GPU budget is spent" in out and "raise budget_gpu_hours to go on" in out
    run_dir = tmp_path / RUN
    frames = ledger_module.load(run_dir)
    results, trials = frames["results"], frames["trials"]
    assert len(run_log.read_text().splitlines()) == 2, (
        "the trial running when the budget was reached finished"
    )
    assert set(results.status) <= {"ok", "patch_rejected", "implement_failed"}, (
        "held-back trials are not failed"
    )
    assert (trials.state == "pending").sum() >= 1, "the rest of epoch 1 waits, unsubmitted"
    assert set(frames["ideas"].epoch) == {0}, "no later epoch was asked for"
    assert "GPU-hours" in out and "of 0.0004" in out

    second = run_search(*args, "budget_gpu_hours=1", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    frames = ledger_module.load(run_dir)
    assert set(frames["trials"].state) == {"done"} and set(frames["ideas"].epoch) == {0, 1}
    ran = run_log.read_text().splitlines()
    assert len(ran) == len(set(ran)), "no trial ran twice across the stop"
    usage = frames["trial_usage"].merge(frames["results"][["trial_id", "status"]], on="trial_id")
    executed = usage[usage.status == "ok"]
    assert (executed.gpus == 1).all() and (executed.gpu_hours > 0).all()
    assert (executed.ended_at - executed.started_at).round(6).eq(executed.runtime_s.round(6)).all()
    db = sqlite3.connect(run_dir / "ledger.sqlite")
    spec_gpus = {json.loads(p)["gpus_per_trial"] for (p,) in db.execute("SELECT provenance FROM results")
                 if json.loads(p).get("started_at")}  # fmt: skip
    assert spec_gpus == {1}
