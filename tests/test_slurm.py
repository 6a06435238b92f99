"""scheduler=slurm: parsers on captured real sacct output, sbatch scripts against reference files,
and the lifecycle against the real local cluster (slurm/start-local-cluster.sh)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import quick_env_config, run_search, search_cmd
from omegaconf import OmegaConf

from hpc_executor import ledger as ledger_module
from hpc_executor.scheduling import JobState, SchedulerQueryError, Shape
from hpc_executor.scheduling.slurm import SlurmScheduler, parse_sacct, sbatch_script
from hpc_executor.trial_dir import DIFF_FILE, RESULT_FILE, STARTED_FILE, TrialSpec

DATA = Path(__file__).parent / "data" / "slurm"


# -- parsing captured output -------------------------------------------------------------------
def captured(name: str) -> str:
    return "\n".join(line for line in (DATA / name).read_text().splitlines() if not line.startswith("#"))


def job(name: str) -> str:
    """The id of a sample job, by its name in jobs.txt (slurm/capture-samples.sh writes both)."""
    ids = dict(line.split("=") for line in captured("jobs.txt").split())
    return ids[name]


def test_sacct_states_of_finished_jobs() -> None:
    states = parse_sacct(captured("sacct_allocations.txt"))
    assert states[f"{job('array')}_0"] is JobState.COMPLETED and states[job("gpu8")] is JobState.COMPLETED
    assert states[job("timeout")] is JobState.TIMEOUT
    assert states[job("failed")] is states[job("signaled")] is JobState.FAILED
    assert (
        states[job("cancelled_running")] is states[job("cancelled_pending")] is JobState.CANCELLED
    )  # "CANCELLED by 0"


def test_sacct_history_of_requeued_preempted_and_failed_nodes() -> None:
    """With -D every attempt is listed; the last one (the job's current state) wins."""
    text = captured("sacct_duplicates.txt")
    attempts = [line for line in text.splitlines() if line.startswith(f"{job('preempted')}|")]
    assert (
        parse_sacct(attempts[0] + "\n", fields="JobID,JobIDRaw,State")[job("preempted")] is JobState.PREEMPTED
    )
    node_fail = next(line for line in text.splitlines() if line.startswith(f"{job('node_fail')}|"))
    assert parse_sacct(node_fail, fields="JobID,JobIDRaw,State")[job("node_fail")] is JobState.NODE_FAIL
    requeued = next(line for line in text.splitlines() if line.startswith(f"{job('requeued')}|"))
    assert parse_sacct(requeued, fields="JobID,JobIDRaw,State")[job("requeued")] is JobState.PENDING
    assert parse_sacct(text)[job("requeued")] is JobState.COMPLETED


def test_sacct_pending_array_ranges_expand_to_tasks() -> None:
    states = parse_sacct(captured("sacct_array_running.txt"))
    array = job("array")
    assert [states[f"{array}_{i}"] for i in range(8)] == [JobState.RUNNING] * 8
    assert states[f"{array}_8"] is states[f"{array}_9"] is JobState.PENDING


def test_sacct_steps_and_garbage_are_ignored() -> None:
    assert parse_sacct("123.batch|COMPLETED|vm\n\nnot a line\n") == {}
    assert parse_sacct("7_[1,3-4%2]|PENDING|None assigned") == {
        "7_1": JobState.PENDING, "7_3": JobState.PENDING, "7_4": JobState.PENDING}  # fmt: skip
    assert parse_sacct("9|REQUEUED|vm\n10|PREEMPTED|vm\n11|NODE_FAIL|vm\n12|OUT_OF_MEMORY|vm") == {
        "9": JobState.PENDING, "10": JobState.PREEMPTED, "11": JobState.NODE_FAIL, "12": JobState.OUT_OF_MEMORY}  # fmt: skip


# -- sbatch scripts against reference files -----------------------------------------------------
def site(**overrides: object) -> SlurmScheduler:
    cfg = OmegaConf.create({
        "name": "slurm", "partition": "gpu", "account": "lab", "qos": "normal", "constraint": "h100",
        "cpus_per_gpu": 12, "mem_gb_per_gpu": 120, "max_array_parallel": 64, "job_name": "hpcx-run",
        "setup": ["module load cuda/12.4"], **overrides})  # fmt: skip
    return SlurmScheduler(cfg, Path("/tmp/hpcx-reference-unused"))


@pytest.mark.parametrize(("name", "shape", "n"), [
    ("sbatch_grpo_1gpu.txt", Shape(gpus=1, cpus=12, mem_gb=100, time_limit_s=4260), 50),
    ("sbatch_nanogpt_8gpu.txt", Shape(gpus=8, cpus=64, mem_gb=400, time_limit_s=3360), 80),
])  # fmt: skip
def test_sbatch_scripts_match_their_reference(name: str, shape: Shape, n: int) -> None:
    """A change to the submitted scripts must be deliberate: UPDATE_REFERENCE=1 rewrites the files."""
    text = sbatch_script(
        site().sbatch_parameters(shape), Path("/shared/run/submitit/%j"), n, python="/venv/bin/python"
    )
    reference = DATA / name
    if os.environ.get("UPDATE_REFERENCE"):
        reference.write_text(text)
    assert text == reference.read_text()


def test_a_trial_larger_than_a_node_is_refused() -> None:
    with pytest.raises(Exception, match="gpus_per_node"):
        site().sbatch_parameters(Shape(gpus=16, cpus=1, mem_gb=1, time_limit_s=60))


# -- against the real local cluster -------------------------------------------------------------
def cluster_up() -> bool:
    if not shutil.which("sinfo") or not shutil.which("sacct"):
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    return out.returncode == 0 and any(s in out.stdout for s in ("idle", "mixed", "allocated"))


slurm = pytest.mark.skipif(
    not cluster_up(),
    reason="no local Slurm cluster; start one with `bash slurm/start-local-cluster.sh` (root, apt-get)",
)
FAST = ("scheduler=slurm", "scheduler.poll_interval_s=0.5", "scheduler.poll_interval_max_s=1",
        "scheduler.result_grace_s=3", "scheduler.vanished_grace_s=30")  # fmt: skip


def make_trials(tmp_path: Path, n: int, **env_overrides: object) -> list[str]:
    dirs = []
    for i in range(n):
        d = tmp_path / "trials" / f"t{i}"
        d.mkdir(parents=True)
        (d / DIFF_FILE).write_text("")
        TrialSpec(f"t{i}", str(d), quick_env_config(**env_overrides)).write()
        dirs.append(str(d))
    return dirs


def wait_for(predicate, timeout: float = 240.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.25)


def scheduler_for(tmp_path: Path) -> SlurmScheduler:
    return SlurmScheduler(OmegaConf.create({"name": "slurm", "job_name": "hpcx-test"}), tmp_path / "submitit")


@slurm
def test_ten_one_gpu_trials_get_distinct_gpus_eight_at_a_time(tmp_path: Path) -> None:
    dirs = make_trials(tmp_path, 10, **{"resources.gpus": 1, "extra_env": {"QUICK_SLEEP_S": "4"}})
    scheduler = scheduler_for(tmp_path)
    jobs = scheduler.submit(dirs, Shape(gpus=1, cpus=1, mem_gb=1, time_limit_s=120))
    assert len({j.split("_")[0] for j, _ in jobs}) == 1, "one array job"
    assert [i for _, i in jobs] == list(range(10))
    wait_for(lambda: all((Path(d) / RESULT_FILE).exists() for d in dirs), what="ten results")
    spans = []
    for d in dirs:
        started = json.loads((Path(d) / STARTED_FILE).read_text())
        result = json.loads((Path(d) / RESULT_FILE).read_text())
        assert result["status"] == "ok"
        spans.append(
            (
                started["started_at"],
                started["started_at"] + result["runtime_s"],
                started["cuda_visible_devices"],
            )
        )
    concurrency = 0
    for start, end, _gpu in spans:
        overlapping = [g for s, e, g in spans if s < end and e > start]
        assert len(set(overlapping)) == len(overlapping), f"two trials shared a GPU: {overlapping}"
        concurrency = max(concurrency, len(overlapping))
    assert 2 <= concurrency <= 8, "packed several to the node, never more than its eight GPUs"
    assert {g for _, _, g in spans} <= {str(i) for i in range(8)}


@slurm
def test_an_eight_gpu_trial_gets_the_whole_node(tmp_path: Path) -> None:
    (d,) = make_trials(tmp_path, 1, **{"resources.gpus": 8})
    scheduler_for(tmp_path).submit([d], Shape(gpus=8, cpus=1, mem_gb=1, time_limit_s=120))
    wait_for(lambda: (Path(d) / RESULT_FILE).exists(), what="the result")
    assert json.loads((Path(d) / STARTED_FILE).read_text())["cuda_visible_devices"] == "0,1,2,3,4,5,6,7"


def trial_row(run_dir: Path) -> dict | None:
    try:
        db = sqlite3.connect(run_dir / "ledger.sqlite", timeout=5)
        db.row_factory = sqlite3.Row
        try:
            row = db.execute("SELECT * FROM trials WHERE trial_id = 'e0-000-t0'").fetchone()
        finally:
            db.close()
    except sqlite3.OperationalError:
        return None
    return dict(row) if row else None


ONE_TRIAL = (
    "+env=quick",
    "+model=offline",
    "strategy.epochs=1",
    "strategy.batch_size=1",
    "run_baseline=false",
)
RUN = "outputs/quick-offline-evolution-seed0"


def start_driver(tmp_path: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(search_cmd(*ONE_TRIAL, *FAST, *args), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip


def running_job(tmp_path: Path) -> str:
    wait_for(lambda: (trial_row(tmp_path / RUN) or {}).get("state") == "running", what="a running trial")
    return trial_row(tmp_path / RUN)["job_id"]


def only_result(tmp_path: Path) -> dict:
    results = ledger_module.load(tmp_path / RUN)["results"]
    assert len(results) == 1
    return results.iloc[0].to_dict()


@slurm
def test_scancel_is_recorded_as_cancelled_once(tmp_path: Path) -> None:
    driver = start_driver(tmp_path, "+env.extra_env.QUICK_SLEEP_S=300")
    job = running_job(tmp_path)
    subprocess.run(["scancel", job], check=True)
    assert driver.wait(timeout=180) == 0
    result = only_result(tmp_path)
    assert result["status"] == "cancelled" and job in result["reason"]


@slurm
def test_a_requeued_trial_runs_again_and_is_recorded_once(tmp_path: Path) -> None:
    runs = tmp_path / "runs.log"
    driver = start_driver(
        tmp_path,
        "+env.extra_env.QUICK_SLEEP_S=8",
        f"+env.extra_env.QUICK_RUN_LOG={runs}",
        "sandbox=none",  # the run log lies outside the workspace
        "env.hard_limit_s=60",
    )
    job = running_job(tmp_path)
    wait_for(lambda: runs.exists(), what="the first run to start training")
    subprocess.run(["scontrol", "requeue", job], check=True)
    assert driver.wait(timeout=240) == 0
    assert len(runs.read_text().split()) == 2, "the trial ran again after the requeue"
    assert only_result(tmp_path)["status"] == "ok"
    assert trial_row(tmp_path / RUN)["job_id"] == job, "same job, not a resubmission"


@slurm
def test_a_slurm_time_limit_kill_is_recorded_as_timeout_with_the_log_tail(tmp_path: Path) -> None:
    driver = start_driver(tmp_path, "+env.extra_env.QUICK_SLEEP_S=600", "env.hard_limit_s=900",
                          "scheduler.time_limit_min=1")  # fmt: skip
    assert driver.wait(timeout=300) == 0
    result = only_result(tmp_path)
    assert result["status"] == "timeout"
    assert "trained: x=" in result["log_tail"]


@slurm
def test_a_killed_driver_reattaches_to_its_jobs(tmp_path: Path) -> None:
    runs = tmp_path / "runs.log"
    args = ("+env=quick", "+model=offline", "strategy.epochs=2", *FAST, "+env.extra_env.QUICK_SLEEP_S=6",
            f"+env.extra_env.QUICK_RUN_LOG={runs}", "sandbox=none")  # the log: outside the workspace  # fmt: skip
    driver = subprocess.Popen(
        search_cmd(*args), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for(lambda: runs.exists() and len(runs.read_text().split()) >= 2, what="trials running")
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    proc = run_search(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    frames = ledger_module.load(tmp_path / RUN)
    assert len(frames["results"]) == len(frames["ideas"]) == 7
    trials = frames["trials"].merge(frames["results"][["trial_id", "status"]], on="trial_id")
    ran = trials[~trials.status.isin(["patch_rejected", "implement_failed"])]
    assert (ran.submissions == 1).all(), "nothing was submitted twice"
    counts = Counter(runs.read_text().split())
    assert len(counts) >= (frames["results"].status == "ok").sum(), "every successful trial logged its run"
    assert max(counts.values()) == 1, f"a trial ran twice: {counts}"
    assert frames["trials"].job_id.dropna().str.match(r"^\d+_\d+$").all(), "array task ids"


def fake_sacct(tmp_path: Path, fail_first: int) -> Path:
    """A sacct on PATH that logs its arguments and fails its first calls, then asks the real one."""
    real = shutil.which("sacct") or "/usr/bin/sacct"
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "sacct.calls"
    script = bindir / "sacct"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {log}\n'
        f'if [ "$(wc -l < {log})" -le {fail_first} ]; then echo "sacct: error: slurmdbd: connection refused" >&2; exit 1; fi\n'
        f'exec {real} "$@"\n'
    )
    script.chmod(0o755)
    return log


def test_a_failing_sacct_raises_a_query_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_sacct(tmp_path, fail_first=1)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    with pytest.raises(SchedulerQueryError, match="connection refused"):
        scheduler_for(tmp_path).states(["1_0"])


@slurm
def test_one_sacct_per_poll_for_all_jobs_and_failures_do_not_stop_polling(tmp_path: Path) -> None:
    calls = fake_sacct(tmp_path, fail_first=2)
    env = {"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}
    start = time.monotonic()
    proc = run_search("+env=quick", "+model=offline", "strategy.epochs=1", "strategy.batch_size=6", *FAST,
                      "+env.extra_env.QUICK_SLEEP_S=3", cwd=tmp_path, env=env)  # fmt: skip
    elapsed = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "connection refused; polling goes on" in proc.stdout + proc.stderr
    lines = calls.read_text().splitlines()
    trials = ledger_module.load(tmp_path / RUN)["trials"]
    arrays = {j.split("_")[0] for j in trials.job_id.dropna()}
    assert len(arrays) == 1, "all trials of the epoch went out as one array"
    assert all(line.endswith(f"-j {next(iter(arrays))}") for line in lines), "each query asks for every job"
    assert len(lines) <= elapsed / 0.5 + 2, "no more than one query per poll"


@slurm
def test_sweep_puts_the_search_drivers_themselves_on_slurm(tmp_path: Path) -> None:
    proc = run_search("--multirun", "hydra/launcher=submitit_slurm", "hydra.launcher.timeout_min=10",
                      "hydra.launcher.cpus_per_task=1", "+env=quick", "+model=offline", "strategy.epochs=1",
                      "seed=0,1", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    from hpc_executor import analysis

    runs = analysis.run_dirs(tmp_path / "multirun")
    assert [r.name for r in runs] == ["0-quick-offline-evolution-seed0", "1-quick-offline-evolution-seed1"]
    for run in runs:
        assert len(ledger_module.load(run)["results"]) == 4
    assert list((tmp_path / "multirun").rglob(".submitit")), "the drivers ran as Slurm jobs"


@slurm
def test_a_preempted_trial_runs_again_and_is_recorded_once(tmp_path: Path) -> None:
    """A higher-priority job (partition urgent) takes the node: the trial is requeued and reruns."""
    runs = tmp_path / "runs.log"
    driver = start_driver(tmp_path, "env.resources.gpus=8", "env.hard_limit_s=60", "+env.extra_env.QUICK_SLEEP_S=8",
                          f"+env.extra_env.QUICK_RUN_LOG={runs}", "sandbox=none")  # fmt: skip
    job = running_job(tmp_path)
    wait_for(lambda: runs.exists(), what="the first run to start training")
    subprocess.run(["sbatch", "-p", "urgent", "--gpus=8", "-J", "preemptor", "-o", "/dev/null", "--wrap", "sleep 2"], check=True,
                   capture_output=True)  # fmt: skip
    assert driver.wait(timeout=240) == 0
    assert len(runs.read_text().split()) == 2, "the trial ran again after it was preempted"
    assert only_result(tmp_path)["status"] == "ok"
    row = trial_row(tmp_path / RUN)
    assert row["job_id"] == job and row["submissions"] == 1
    assert row["node"] == socket.gethostname() and row["gpus"] == "0,1,2,3,4,5,6,7"
    assert row["job_state"] in ("running", "completed"), "the last state seen while the trial was open"
