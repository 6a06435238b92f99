"""When each trial started and ended running: from the worker's started file and result (its own
wall clock), or, for a result the driver writes itself, when it settled; old ledgers gain both."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import search_cmd
from test_slurm import RUN, running_job, slurm, start_driver, trial_row, wait_for
from test_worker import make_trial, result_of

from hpc_executor import ledger as ledger_module
from hpc_executor.ledger import Ledger
from hpc_executor.trial_dir import STARTED_FILE
from hpc_executor.types import Idea, Patch, Result, Status
from hpc_executor.worker import run_trial


def times(ledger: Ledger, trial_id: str) -> tuple[float | None, float | None]:
    row = ledger.db.execute(
        "SELECT started_at, ended_at FROM trials WHERE trial_id = ?", (trial_id,)
    ).fetchone()
    return row["started_at"], row["ended_at"]


def test_the_worker_records_when_it_ended_on_its_wall_clock(tmp_path: Path) -> None:
    trial_dir = make_trial(tmp_path)
    before = time.time()
    run_trial(str(trial_dir))
    result = result_of(trial_dir)
    started = json.loads((trial_dir / STARTED_FILE).read_text())["started_at"]
    assert before <= started < result.provenance["ended_at"] <= time.time()
    assert result.provenance["ended_at"] - started == pytest.approx(result.runtime_s, abs=0.5)


def test_a_result_sets_the_trial_times_once(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, create=True)
    for tid in ("ran", "old-worker", "settled", "never-ran"):
        ledger.add_trial(tid, "i", 0, str(tmp_path / tid))
    assert times(ledger, "ran") == (None, None), "unknown until the trial runs"
    ledger.set_trial_state("settled", "running", started_at=50.0)  # the driver read its started file
    before = time.time()
    ledger.record_results([
        Result("ran", Status.OK, reward=1.0, runtime_s=9.5, provenance={"started_at": 100.0, "ended_at": 110.0}),
        Result("old-worker", Status.CRASHED, runtime_s=4.0, provenance={"started_at": 200.0}),
        Result("settled", Status.CANCELLED, reason="job ended without a result"),
        Result("never-ran", Status.IMPLEMENT_FAILED),
    ])  # fmt: skip
    assert times(ledger, "ran") == (100.0, 110.0), "the worker's own clock"
    assert times(ledger, "old-worker") == (200.0, 204.0), "an older worker: its start plus its runtime"
    started, settled = times(ledger, "settled")
    assert started == 50.0 and before <= settled <= time.time(), "the driver's: when it settled the trial"
    assert times(ledger, "never-ran")[0] is None
    ledger.record_results(
        [Result("ran", Status.OK, reward=2.0, provenance={"started_at": 1.0, "ended_at": 2.0})]
    )
    assert times(ledger, "ran") == (100.0, 110.0), "a result ingested twice changes nothing"
    ledger.reopen_trials(["ran"], note="disk full")
    assert times(ledger, "ran") == (None, None), "a trial that runs again gets its new times"


def test_outcomes_and_frames_show_the_times(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, create=True)
    ledger.add_idea(Idea("e0-000", 0, "t", "d"), slot=0)
    ledger.add_patch(Patch("e0-000", "diff", "applied"))
    ledger.add_trial("e0-000-t0", "e0-000", 0, str(tmp_path / "t"))
    ledger.record_results(
        [Result("e0-000-t0", Status.OK, reward=1.0, provenance={"started_at": 10.0, "ended_at": 12.5})]
    )
    outcome = ledger.outcomes_frame().iloc[0]
    assert (outcome.started_at, outcome.ended_at) == (10.0, 12.5)
    assert ledger.outcomes()[0]["ended_at"] == 12.5
    ledger.publish_snapshot()
    trials = ledger_module.load(tmp_path)["trials"].iloc[0]
    assert (trials.started_at, trials.ended_at) == (10.0, 12.5)


def test_a_ledger_from_before_the_run_times_opens_and_gains_them(tmp_path: Path) -> None:
    old = sqlite3.connect(tmp_path / ledger_module.LEDGER_FILE)
    old.executescript("""
        CREATE TABLE trials (
            trial_id TEXT PRIMARY KEY, idea_id TEXT NOT NULL, epoch INTEGER NOT NULL, trial_dir TEXT,
            state TEXT NOT NULL, job_id TEXT, array_index INTEGER, job_state TEXT, node TEXT, gpus TEXT,
            submissions INTEGER NOT NULL DEFAULT 0, note TEXT, created_at REAL, updated_at REAL,
            purpose TEXT, seed INTEGER);
        CREATE TABLE results (
            trial_id TEXT PRIMARY KEY, status TEXT NOT NULL, reward REAL, metrics TEXT, runtime_s REAL,
            log_path TEXT, log_tail TEXT, reason TEXT, provenance TEXT, ingested_at REAL);
        INSERT INTO trials (trial_id, idea_id, epoch, state) VALUES
            ('ran', 'i0', 0, 'done'), ('no-diff', 'i1', 0, 'done'), ('open', 'i2', 0, 'running');
        INSERT INTO results VALUES
            ('ran', 'ok', 1.0, '{}', 30.0, '', '', '', '{"started_at": 1000.0}', 1040.0),
            ('no-diff', 'implement_failed', NULL, '{}', 0.0, '', '', '', '{}', 1050.0);
    """)
    old.commit()
    old.close()
    ledger = Ledger(tmp_path)
    assert times(ledger, "ran") == (1000.0, 1030.0)
    assert times(ledger, "no-diff") == (None, 1050.0), "never ran: ended when its result was recorded"
    assert times(ledger, "open") == (None, None)
    ledger.close()
    assert times(Ledger(tmp_path), "ran") == (1000.0, 1030.0), "opening again changes nothing"


def test_a_running_trial_has_its_start_and_no_end_in_the_live_ledger(tmp_path: Path) -> None:
    args = ("+env=quick", "+model=offline", "strategy.epochs=1", "strategy.batch_size=1", "run_baseline=false",
            "+env.extra_env.QUICK_SLEEP_S=6", "sandbox=none")  # fmt: skip
    run_dir = tmp_path / "outputs" / "quick-offline-evolution-seed0"
    with open(tmp_path / "driver.log", "w") as out:
        driver = subprocess.Popen(search_cmd(*args), cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
        try:
            running = pd.DataFrame()
            deadline = time.monotonic() + 120
            while running.empty and driver.poll() is None and time.monotonic() < deadline:
                time.sleep(0.3)
                if (run_dir / ledger_module.LEDGER_FILE).exists():
                    trials = ledger_module.load(run_dir, live=True)["trials"]
                    running = trials[trials.state == "running"]
            assert not running.empty, (tmp_path / "driver.log").read_text()[-3000:]
            trial = running.iloc[0]
            started = json.loads((Path(trial.trial_dir) / STARTED_FILE).read_text())["started_at"]
            assert trial.started_at == started and pd.isna(trial.ended_at)
        finally:
            assert driver.wait(timeout=120) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    trial = ledger_module.load(run_dir)["trials"].iloc[0]
    result = ledger_module.load(run_dir)["results"].iloc[0]
    assert trial.started_at == started and trial.ended_at == result.provenance["ended_at"]


@slurm
def test_a_requeued_trial_loses_its_start_until_it_runs_again(tmp_path: Path) -> None:
    driver = start_driver(tmp_path, "+env.extra_env.QUICK_SLEEP_S=8", "env.hard_limit_s=60")
    job = running_job(tmp_path)
    first = trial_row(tmp_path / RUN)
    assert first is not None and first["started_at"] is not None and first["ended_at"] is None
    subprocess.run(["scontrol", "requeue", job], check=True)
    wait_for(lambda: (trial_row(tmp_path / RUN) or {}).get("state") == "queued", what="the requeue seen")
    assert trial_row(tmp_path / RUN)["started_at"] is None, "queued again: not running, not busy"  # type: ignore[index]
    assert driver.wait(timeout=240) == 0
    last = trial_row(tmp_path / RUN)
    assert (
        last is not None
        and last["started_at"] > first["started_at"]
        and last["ended_at"] > last["started_at"]
    )


@slurm
def test_a_trial_the_driver_settles_ends_when_it_was_settled(tmp_path: Path) -> None:
    driver = start_driver(tmp_path, "+env.extra_env.QUICK_SLEEP_S=300")
    job = running_job(tmp_path)
    started = trial_row(tmp_path / RUN)["started_at"]  # type: ignore[index]
    cancelled_at = time.time()
    subprocess.run(["scancel", job], check=True)
    assert driver.wait(timeout=180) == 0
    row = trial_row(tmp_path / RUN)
    assert row is not None and row["started_at"] == started < cancelled_at < row["ended_at"] <= time.time()
