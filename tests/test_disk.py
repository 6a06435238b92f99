"""A read-only or full disk: a message that says what happened and what to do (no traceback),
nothing recorded lost, and the same command going on once there is space. Real filesystems: small
tmpfs mounts (root needed), unmounted by the fixture."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import run_search, search_cmd

from hpc_executor import ledger as ledger_module

RUN = "outputs/quick-offline-evolution-seed0"
ONE = ("+env=quick", "+model=offline", "strategy.epochs=1", "strategy.batch_size=1")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def remount(mount: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(mount)], check=True)


def assert_told(proc: subprocess.CompletedProcess, what: str) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert what in proc.stderr and "run the same command again" in proc.stderr


def test_a_new_run_on_a_read_only_disk(small_disk: Path) -> None:
    remount(small_disk, "ro")
    assert_told(run_search(*ONE, cwd=small_disk), "read-only")


def test_resuming_a_finished_run_on_a_read_only_disk_then_writable(small_disk: Path) -> None:
    assert run_search(*ONE, cwd=small_disk).returncode == 0
    before = ledger_module.load(small_disk / RUN)
    remount(small_disk, "ro")
    assert_told(run_search(*ONE, cwd=small_disk), "read-only")  # the same command
    assert_told(run_search(*ONE, "strategy.epochs=2", cwd=small_disk), "read-only")  # one that goes on
    remount(small_disk, "rw")
    proc = run_search(*ONE, "strategy.epochs=2", cwd=small_disk)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = ledger_module.load(small_disk / RUN)
    assert set(before["results"].trial_id) < set(after["results"].trial_id), "kept, and went on"


def test_a_trial_whose_checkpoint_filled_the_disk_runs_again_once_there_is_space(small_disk: Path) -> None:
    runs = small_disk / "runs.log"
    args = (*ONE, "run_baseline=false", "+env.extra_env.QUICK_CHECKPOINT_MB=40",
            f"+env.extra_env.QUICK_RUN_LOG={runs}", "scheduler.result_grace_s=1",
            "sandbox=none")  # the log: outside the workspace  # fmt: skip
    for _ in range(3):  # the driver too may find the disk full while the checkpoint fills it
        proc = run_search(*args, cwd=small_disk)
        if proc.returncode == 0:
            break
        assert_told(proc, "the disk is full")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = ledger_module.load(small_disk / RUN)["results"].iloc[0]
    assert result.status == "disk_full" and "runs again when the run is resumed" in result.reason
    remount(small_disk, "size=100m")
    proc = run_search(*args, cwd=small_disk)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 trials that stopped on a full disk run again" in proc.stdout
    frames = ledger_module.load(small_disk / RUN)
    assert list(frames["results"].status) == ["ok"]
    assert len(runs.read_text().split()) == 2, "it ran again"


def test_a_disk_that_fills_under_the_driver(small_disk: Path) -> None:
    args = (*ONE, "strategy.batch_size=2", "+env.extra_env.QUICK_SLEEP_S=2")
    driver = subprocess.Popen(
        search_cmd(*args), cwd=small_disk, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    started = small_disk / RUN / "trials"
    while not list(started.glob("*/started.json")):
        assert driver.poll() is None, driver.stderr.read() if driver.stderr else ""
    filler = small_disk / "filler"
    subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M"], capture_output=True)
    out, err = driver.communicate(timeout=240)
    assert_told(subprocess.CompletedProcess(driver.args, driver.returncode, out, err), "the disk is full")
    filler.unlink()
    proc = run_search(*args, cwd=small_disk)
    assert proc.returncode == 0, proc.stderr[-3000:]
    frames = ledger_module.load(small_disk / RUN)
    assert len(frames["results"]) == len(frames["ideas"]) == 3


def test_a_worker_whose_own_files_do_not_fit_ends_disk_full_not_crashed(
    tmp_path: Path, small_disk: Path
) -> None:
    """The trial's directory alone is full (its own mount): the worker cannot even claim it."""
    from test_at_most_once import killed_at

    args = (*ONE, "run_baseline=false", "scheduler.result_grace_s=1")
    killed_at("before_submit", args, tmp_path)  # the trial exists, nothing is submitted yet
    trial = tmp_path / RUN / "trials" / "e0-000-t0"
    for f in trial.iterdir():
        (small_disk / f.name).write_bytes(f.read_bytes())
    subprocess.run(["mount", "--bind", str(small_disk), str(trial)], check=True)
    try:
        subprocess.run(["dd", "if=/dev/zero", f"of={trial / 'filler'}", "bs=1M"], capture_output=True)
        proc = run_search(*args, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        result = ledger_module.load(tmp_path / RUN)["results"].iloc[0]
        assert result.status == "disk_full" and "the disk is full" in result.reason
        (trial / "filler").unlink()
        proc = run_search(*args, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert list(ledger_module.load(tmp_path / RUN)["results"].status) == ["ok"]
    finally:
        subprocess.run(["umount", str(trial)], check=True)
