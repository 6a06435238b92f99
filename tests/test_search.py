"""The whole loop through the real command line, on the toy environment: end to end, and resume
after the driver is killed at a bad moment."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import run_search, search_cmd

from hpc_executor import ledger as ledger_module

RUN = "outputs/quick-offline-evolution-seed0"


def test_end_to_end_on_the_local_scheduler(tmp_path: Path) -> None:
    proc = run_search("+env=quick", "+model=offline", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "offline scripted stand-in (not an LLM)" in out
    assert "epoch 2/2" in out and "Best ideas of" in out and "execution rate" in out

    frames = ledger_module.load(tmp_path / RUN)
    ideas, trials, results = frames["ideas"], frames["trials"], frames["results"]
    assert len(ideas) == 2 * 3 + 1  # two epochs of three, and the baseline
    assert set(ideas.kind) >= {"baseline", "ideate"} and ideas.kind.isin(["exploit", "explore"]).sum() == 3
    assert len(trials) == len(results) == len(ideas), "every idea ends in exactly one result"
    assert set(trials.state) == {"done"}
    ok = results[results.status == "ok"]
    baseline = ok[ok.trial_id == "baseline-t0"].reward.iloc[0]
    assert ok.reward.max() > baseline, "the search should find something better than the baseline"
    calls = frames["llm_calls"]
    assert set(calls.role) == {"ideator", "implementer"} and calls.error.isna().all()
    for trial_dir in trials.trial_dir:
        assert (Path(trial_dir) / "result.json").exists() or not (Path(trial_dir) / "spec.json").exists()

    again = run_search("+env=quick", "+model=offline", cwd=tmp_path)
    assert again.returncode == 0
    assert len(ledger_module.load(tmp_path / RUN)["llm_calls"]) == len(calls), (
        "a finished run asks nothing more"
    )


def wait_for(predicate, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.1)


def results_count(run_dir: Path) -> int:
    try:
        db = sqlite3.connect(run_dir / "ledger.sqlite", timeout=5)
        try:
            return db.execute("SELECT count(*) FROM results").fetchone()[0]
        finally:
            db.close()
    except sqlite3.OperationalError:
        return 0


def test_resume_after_the_driver_is_killed_mid_epoch(tmp_path: Path) -> None:
    run_log = tmp_path / "runs.log"
    args = ("+env=quick", "+model=offline", "+env.extra_env.QUICK_SLEEP_S=1.5",
            f"+env.extra_env.QUICK_RUN_LOG={run_log}", "sandbox=none")  # the log: outside the workspace  # fmt: skip
    driver = subprocess.Popen(
        search_cmd(*args), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    run_dir = tmp_path / RUN
    wait_for(lambda: results_count(run_dir) >= 2 or driver.poll() is not None)
    assert driver.poll() is None, (
        "the driver should still be running"
    )  # some trials done, others still running
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    done_before = results_count(run_dir)

    proc = run_search(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    frames = ledger_module.load(run_dir)
    assert len(frames["results"]) == len(frames["ideas"]) == 7 > done_before
    runs = Counter(run_log.read_text().split())
    assert runs and max(runs.values()) == 1, f"a trial ran twice: {runs}"
    assert frames["llm_calls"].call_id.is_unique


def test_trials_whose_jobs_vanished_run_again_once(tmp_path: Path) -> None:
    """Kill the driver and its jobs together (a lost node): the next driver resubmits them."""
    args = ("+env=quick", "+model=offline", "strategy.epochs=1", "+env.extra_env.QUICK_SLEEP_S=8")
    driver = subprocess.Popen(search_cmd(*args), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # fmt: skip
    run_dir = tmp_path / RUN
    wait_for(lambda: len(list(run_dir.glob("trials/*/started.json"))) >= 2)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()

    proc = run_search("+env=quick", "+model=offline", "strategy.epochs=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    frames = ledger_module.load(run_dir)
    resubmitted = frames["trials"][frames["trials"].note.fillna("").str.contains("vanished")]
    assert len(resubmitted) >= 2
    assert (resubmitted.submissions == 2).all()
    assert len(frames["results"]) == len(frames["ideas"])


def test_a_trial_can_be_rerun_from_the_ledger(tmp_path: Path) -> None:
    proc = run_search("+env=quick", "+model=offline", "strategy.epochs=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from hpc_executor.rerun import rerun

    original = ledger_module.load(tmp_path / RUN)["results"].set_index("trial_id").loc["baseline-t0"]
    again = rerun(tmp_path / RUN, "baseline-t0")
    assert again.status.value == "ok" and again.reward == original.reward
    assert again.provenance["rerun_of"] == "baseline-t0"


@pytest.mark.parametrize("schedule", ["barrier", "steady"])
def test_cancelling_a_run_stops_its_trials_and_its_driver(tmp_path: Path, schedule: str) -> None:
    args = ("+env=quick", "+model=offline", f"strategy.schedule={schedule}", "+env.extra_env.QUICK_SLEEP_S=60",
            "env.hard_limit_s=120")  # fmt: skip
    driver = subprocess.Popen(
        search_cmd(*args), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    run_dir = tmp_path / RUN
    wait_for(lambda: len(list(run_dir.glob("trials/*/started.json"))) >= 2)
    cancel = subprocess.run(
        [sys.executable, "-m", "hpc_executor.cancel", str(run_dir)], capture_output=True, text=True
    )
    assert cancel.returncode == 0 and "cancelled" in cancel.stdout
    out, _ = driver.communicate(timeout=60)
    assert driver.returncode == 2 and "was cancelled" in out and "Traceback" not in out
    results = ledger_module.load(run_dir)["results"]
    assert (results.status == "cancelled").sum() >= 2
    wait_for(lambda: not any(p for p in run_dir.glob("trials/*") if _busy(p)), timeout=30)


def _busy(trial_dir: Path) -> bool:
    """A live process still works in this trial directory."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (
                    os.readlink(entry / "cwd").startswith(str(trial_dir))
                    and "Z" not in (entry / "stat").read_text().split()[2]
                ):
                    return True
            except OSError:
                continue
    return False


def test_analysis_tables_over_a_run(tmp_path: Path) -> None:
    from hpc_executor import analysis

    proc = run_search("+env=quick", "+model=offline", "strategy.epochs=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = analysis.outcomes(tmp_path / "outputs")
    assert len(df) == 7 and set(df.run) == {"quick-offline-evolution-seed0"}
    table = analysis.by_epoch(df)
    assert list(table.epoch) == [0, 1] and table.ideas.tolist() == [3, 3]
    assert table.best_so_far.is_monotonic_increasing
    assert analysis.status_counts(df).to_numpy().sum() == 6


def test_multirun_gives_each_search_its_own_directory(tmp_path: Path) -> None:
    proc = run_search(
        "--multirun", "+env=quick", "+model=offline", "strategy.epochs=1", "seed=0,1", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from hpc_executor import analysis

    runs = analysis.run_dirs(tmp_path / "multirun")
    assert [r.name for r in runs] == ["0-quick-offline-evolution-seed0", "1-quick-offline-evolution-seed1"]
    assert all(len(ledger_module.load(r)["results"]) == 4 for r in runs)


@pytest.mark.parametrize("schedule", ["barrier", "steady"])
def test_ctrl_c_without_a_terminal_leaves_trials_running_for_the_next_driver(
    tmp_path: Path, schedule: str
) -> None:
    args = ("+env=quick", "+model=offline", "strategy.epochs=1", f"strategy.schedule={schedule}",
            "+env.extra_env.QUICK_SLEEP_S=3")  # fmt: skip
    driver = subprocess.Popen(search_cmd(*args), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, text=True)  # fmt: skip
    run_dir = tmp_path / RUN
    wait_for(lambda: len(list(run_dir.glob("trials/*/started.json"))) >= 2)
    driver.send_signal(signal.SIGINT)
    out, _ = driver.communicate(timeout=60)
    assert driver.returncode == 130
    assert "left" in out and "hpc_executor.cancel" in out and "Traceback" not in out
    proc = run_search(*args, cwd=tmp_path)
    assert proc.returncode == 0
    frames = ledger_module.load(run_dir)
    assert len(frames["results"]) == 4 and (frames["trials"].submissions <= 1).all()


class Terminal:
    """The driver on a pseudo-terminal, as a person runs it: Ctrl-C reaches its foreground group."""

    def __init__(self, cmd: list[str], cwd: Path) -> None:
        import fcntl
        import pty
        import termios
        import threading

        self.master, slave = pty.openpty()

        def controlling_terminal() -> None:
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(cmd, cwd=cwd, stdin=slave, stdout=slave, stderr=slave,
                                     preexec_fn=controlling_terminal)  # fmt: skip
        os.close(slave)
        self.output = b""
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while True:
            try:
                chunk = os.read(self.master, 4096)
            except OSError:
                return
            if not chunk:
                return
            self.output += chunk

    def type(self, keys: bytes) -> None:
        os.write(self.master, keys)


@pytest.mark.parametrize("answer", ["y", "n"])
def test_ctrl_c_in_a_terminal_asks_before_cancelling(tmp_path: Path, answer: str) -> None:
    args = ("+env=quick", "+model=offline", "strategy.epochs=1", "+env.extra_env.QUICK_SLEEP_S=4")
    term = Terminal(search_cmd(*args), tmp_path)
    run_dir = tmp_path / RUN
    wait_for(lambda: len(list(run_dir.glob("trials/*/started.json"))) >= 2)
    term.type(b"\x03")
    wait_for(lambda: b"still queued or running? [y/N]" in term.output, timeout=30)
    term.type(answer.encode() + b"\n")
    assert term.proc.wait(timeout=60) == 130
    results = ledger_module.load(run_dir)["results"]
    if answer == "y":
        assert (results.status == "cancelled").sum() >= 2
    else:
        assert b"left" in term.output and not (results.status == "cancelled").any()
        proc = run_search(*args, cwd=tmp_path)  # the next driver finds their results
        assert proc.returncode == 0, proc.stderr[-2000:]
        frames = ledger_module.load(run_dir)
        # Every trial has its one result; each that ran was submitted exactly once, and one whose
        # idea never became a diff was never submitted.
        trials, results = frames["trials"], frames["results"]
        assert sorted(results.trial_id) == sorted(trials.trial_id) and len(trials) == 4, trials.to_string()
        ran = trials.merge(results, on="trial_id")
        never_ran = ran.status.isin(["implement_failed", "patch_rejected"])
        table = ran[["trial_id", "status", "job_id", "submissions"]].to_string()
        assert (ran[~never_ran].submissions == 1).all() and ran[~never_ran].job_id.notna().all(), table
        assert (ran[never_ran].submissions == 0).all(), table
        assert (ran[ran.status == "ok"].submissions == 1).all(), "the trials survived the Ctrl-C"


def test_a_run_does_not_resume_on_other_evaluation_data(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "answers.txt").write_text("42\n")
    args = ["+env=quick", "+model=offline", "strategy.epochs=1", "strategy.batch_size=1", f"env.data_dir={data}",
            "env.eval_data=[answers.txt]"]  # fmt: skip
    first = run_search(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    (data / "answers.txt").write_text("41\n")
    second = run_search(*args, cwd=tmp_path)
    assert second.returncode == 2 and "Traceback" not in second.stderr
    assert (
        "the evaluation data (answers.txt in" in second.stderr
        and "Prepare the original data again" in second.stderr
    )
