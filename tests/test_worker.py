"""The worker and its sandbox: fresh workspace, scrubbed environment, hard kill, frozen evaluator,
protected files, exactly one atomic result."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import quick_env_config
from omegaconf import OmegaConf

from hpc_executor.sandbox import pid_namespace_prefix, run_in_group, scrubbed_environ
from hpc_executor.trial_dir import DIFF_FILE, RESULT_FILE, TrialSpec
from hpc_executor.types import Result, Status
from hpc_executor.worker import run_trial

SECRETS = {
    "ANTHROPIC_API_KEY": "sk-ant-test-123",
    "OPENAI_API_KEY": "sk-test-456",
    "HF_TOKEN": "hf_abcdef",
    "MY_SERVICE_SECRET": "s3cr3t",
    "SLURM_AUTH_TOKEN": "slurm-auth-value",
    "INNOCENT_LOOKING": "sk-ant-hidden-in-a-plain-name",
}


def make_trial(tmp_path: Path, diff: str = "", **env_overrides: object) -> Path:
    trial_dir = tmp_path / "trial"
    trial_dir.mkdir()
    (trial_dir / DIFF_FILE).write_text(diff)
    TrialSpec("t1", str(trial_dir), quick_env_config(**env_overrides), seed=0).write()
    return trial_dir


def result_of(trial_dir: Path) -> Result:
    return Result.from_json((trial_dir / RESULT_FILE).read_text())


def test_baseline_trial_is_ok_with_reward_from_the_frozen_evaluator(tmp_path: Path) -> None:
    trial_dir = make_trial(tmp_path)
    run_trial(str(trial_dir))
    result = result_of(trial_dir)
    assert result.status is Status.OK, result.reason
    assert result.reward == pytest.approx(1 / result.metrics["loss"])
    assert result.metrics["evaluated_from"] == str(trial_dir / "evaluator"), (
        "evaluator must run from a pristine copy"
    )
    assert "trained" in result.log_tail
    assert result.provenance["packages"]["python"]
    started = json.loads((trial_dir / "started.json").read_text())
    assert result.provenance["started_at"] == started["started_at"] < started["started_at"] + result.runtime_s
    assert [p.name for p in trial_dir.iterdir() if p.name.startswith(".")] == [], "no temp files left"
    assert not (trial_dir / "workspace").exists(), "workspaces are removed unless kept"


def test_the_diff_is_applied_in_the_workspace_only(tmp_path: Path) -> None:
    diff = textwrap.dedent("""\
        --- a/params.py
        +++ b/params.py
        @@ -2,1 +2,1 @@
        -LEARNING_RATE = 0.1
        +LEARNING_RATE = 0.4
    """)
    baseline = quick_env_config()["dir"] + "/baseline/params.py"
    before = Path(baseline).read_bytes()
    trial_dir = make_trial(tmp_path, diff)
    run_trial(str(trial_dir))
    assert result_of(trial_dir).reward > 9.95
    assert Path(baseline).read_bytes() == before


def test_trial_sees_no_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    trial_dir = make_trial(tmp_path, **{"extra_env": {"QUICK_PRINT_ENV": "1"}})
    run_trial(str(trial_dir))
    log = (trial_dir / "train.log").read_text()
    printed = json.loads(next(line for line in log.splitlines() if line.startswith("{")))
    assert printed["HPCX_OUTPUT_DIR"].endswith("output")
    for name, value in SECRETS.items():
        assert name not in printed and value not in log


def test_scrubbed_environ_allows_what_training_needs() -> None:
    base = {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0,1", "SLURM_JOB_ID": "7", "LC_ALL": "C", "RANDOM_VAR": "1",
            **SECRETS}  # fmt: skip
    env = scrubbed_environ(base, {"HPCX_SEED": "0"})
    assert env == {
        "PATH": "/bin",
        "CUDA_VISIBLE_DEVICES": "0,1",
        "SLURM_JOB_ID": "7",
        "LC_ALL": "C",
        "HPCX_SEED": "0",
    }
    with pytest.raises(ValueError, match="WANDB_API_KEY"):
        scrubbed_environ(base, {"WANDB_API_KEY": "x"})


@pytest.mark.skipif(not pid_namespace_prefix("auto"), reason="unshare --pid is not permitted on this host")
def test_trial_cannot_read_other_processes_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even /proc/<pid>/environ of the driver is out of reach: the trial has its own PID namespace."""
    probe = tmp_path / "probe.py"
    probe.write_text("import os\nprint(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n")
    log = tmp_path / "log"
    argv = [*pid_namespace_prefix("auto"), sys.executable, str(probe)]
    run_in_group(argv, cwd=tmp_path, env=scrubbed_environ(os.environ), log_path=log, limit_s=30)
    pids = json.loads(log.read_text().splitlines()[-1])
    assert os.getpid() not in pids and max(pids) < 10


def test_hard_limit_kills_a_group_that_ignores_sigterm(tmp_path: Path) -> None:
    script = tmp_path / "stubborn.py"
    script.write_text(
        textwrap.dedent("""\
        import os, signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
        open("child.pid", "w").write(str(child.pid))
        time.sleep(600)
    """)
    )
    start = time.monotonic()
    done = run_in_group([sys.executable, str(script)], cwd=tmp_path, env=scrubbed_environ(os.environ),
                        log_path=tmp_path / "log", limit_s=2, grace_s=1)  # fmt: skip
    assert done.timed_out and done.returncode is None
    assert time.monotonic() - start < 15
    child = int((tmp_path / "child.pid").read_text())
    deadline = time.monotonic() + 5  # SIGKILL is delivered asynchronously
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child)
    assert "killed at the hard limit" in (tmp_path / "log").read_text()


def test_timeout_result(tmp_path: Path) -> None:
    trial_dir = make_trial(tmp_path, hard_limit_s=1, budget_s=1, **{"extra_env": {"QUICK_SLEEP_S": "60"}})
    run_trial(str(trial_dir))
    result = result_of(trial_dir)
    assert result.status is Status.TIMEOUT and result.reward is None
    assert "hard limit" in result.reason


def training_line_diff(line: str) -> str:
    """A diff that adds one line to train.py right after `import params`."""
    return f"--- a/train.py\n+++ b/train.py\n@@ -8,2 +8,3 @@\n import params\n+{line}\n \n"


@pytest.mark.parametrize(
    ("line", "status", "where", "text"),
    [
        ('raise RuntimeError("boom from the idea")', Status.CRASHED, "log_tail", "boom from the idea"),
        ('open("evaluate.py", "a").write("# tampered")', Status.INVALID_RESULT, "reason", "evaluate.py"),
    ],
    ids=["crash-keeps-log-tail", "tampered-protected-file"],
)
def test_failing_trials_say_why(tmp_path: Path, line: str, status: Status, where: str, text: str) -> None:
    trial_dir = make_trial(tmp_path, training_line_diff(line))
    run_trial(str(trial_dir))
    result = result_of(trial_dir)
    assert result.status is status, result.reason
    assert text in getattr(result, where)


def test_a_diff_to_a_protected_file_is_rejected_by_the_worker_too(tmp_path: Path) -> None:
    first_line = (Path(quick_env_config()["dir"]) / "baseline" / "evaluate.py").read_text().splitlines()[0]
    diff = f"--- a/evaluate.py\n+++ b/evaluate.py\n@@ -1,1 +1,1 @@\n-{first_line}\n+x = 1\n"
    trial_dir = make_trial(tmp_path, diff)
    run_trial(str(trial_dir))
    result = result_of(trial_dir)
    assert result.status is Status.PATCH_REJECTED
    assert "evaluate.py" in result.reason


def test_out_of_range_metric_is_invalid(tmp_path: Path) -> None:
    trial_dir = make_trial(tmp_path, **{"reward.metric_max": 0.05})
    run_trial(str(trial_dir))
    assert result_of(trial_dir).status is Status.INVALID_RESULT


def test_a_finished_trial_never_runs_again(tmp_path: Path) -> None:
    trial_dir = make_trial(tmp_path)
    run_trial(str(trial_dir))
    first = (trial_dir / RESULT_FILE).read_text()
    (trial_dir / "train.log").unlink()
    run_trial(str(trial_dir))
    assert (trial_dir / RESULT_FILE).read_text() == first
    assert not (trial_dir / "train.log").exists()


def test_worker_interrupted_leaves_no_result_and_no_processes(tmp_path: Path) -> None:
    """scancel/Ctrl-C: the trial's group dies with the worker; the driver decides what it means."""
    trial_dir = make_trial(tmp_path, **{"extra_env": {"QUICK_SLEEP_S": "60"}, "hard_limit_s": 120})
    proc = subprocess.Popen([sys.executable, "-m", "hpc_executor.worker", str(trial_dir)])
    deadline = time.monotonic() + 30
    log = trial_dir / "train.log"
    while not (log.exists() and "trained" in log.read_text(errors="ignore")):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert processes_under(trial_dir), "the trial should be running now"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert not (trial_dir / RESULT_FILE).exists()
    assert processes_under(trial_dir) == []


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for a parent to reap it (kill(pid, 0) says yes to those)."""
    try:
        state = next(
            line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("State:")
        )
    except (OSError, StopIteration):
        return False
    return "Z" not in state.split()[1]


def processes_under(directory: Path) -> list[int]:
    """Live processes whose working directory lies in ``directory``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cwd = os.readlink(entry / "cwd")
            except OSError:
                continue
            if cwd.startswith(str(directory)) and alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def test_a_trial_that_rewrites_the_environments_own_evaluator_is_invalid(tmp_path: Path) -> None:
    """The pristine copy comes from the environment directory: writing there is caught by its hash."""
    env_dir = tmp_path / "env"
    shutil.copytree(quick_env_config()["dir"], env_dir)
    from hpc_executor.environment import Environment

    config = quick_env_config(dir=str(env_dir))
    trial_dir = tmp_path / "trial"
    trial_dir.mkdir()
    line = f'open("{env_dir}/baseline/evaluate.py", "a").write("# rewritten")'
    (trial_dir / DIFF_FILE).write_text(training_line_diff(line))
    # unsandboxed, the trial can write there (under bwrap it cannot: tests/test_hostile_trials.py)
    TrialSpec("t1", str(trial_dir), config, sandbox="none",
              provenance={"baseline_hash": Environment(config).baseline_hash()}).write()  # fmt: skip
    run_trial(str(trial_dir))
    result = result_of(trial_dir)
    assert result.status is Status.INVALID_RESULT
    assert "baseline in" in result.reason and "changed" in result.reason and "during the run" in result.reason


def test_a_trial_created_for_another_baseline_does_not_run(tmp_path: Path) -> None:
    trial_dir = tmp_path / "trial"
    trial_dir.mkdir()
    (trial_dir / DIFF_FILE).write_text("")
    TrialSpec("t1", str(trial_dir), quick_env_config(), provenance={"baseline_hash": "0" * 16}).write()
    run_trial(str(trial_dir))
    result = result_of(trial_dir)
    assert result.status is Status.CRASHED and "since the run started" in result.reason
    assert not (trial_dir / "train.log").exists()


def test_the_driver_drops_its_secrets_before_starting_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    from hpc_executor.sandbox import drop_secrets_from_environ

    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("HPCX_KEEP_ME", "1")
    dropped = drop_secrets_from_environ()
    assert set(dropped) >= set(SECRETS)
    assert not set(SECRETS) & set(os.environ) and os.environ["HPCX_KEEP_ME"] == "1"
    child = subprocess.run(
        [sys.executable, "-c", "import os; print(sorted(os.environ))"], capture_output=True, text=True
    )
    assert not any(k in child.stdout for k in SECRETS)


def test_a_trial_that_writes_to_the_evaluation_data_is_invalid(tmp_path: Path) -> None:
    from hpc_executor.environment import Environment

    data = tmp_path / "data"
    data.mkdir()
    (data / "answers.txt").write_text("42\n")
    env = quick_env_config(data_dir=str(data), eval_data=["answers.txt"])
    expected = Environment(OmegaConf.create(env)).eval_data_hash()
    diff = textwrap.dedent("""\
        --- a/train.py
        +++ b/train.py
        @@ -8,2 +8,4 @@
         import params

        +open(os.path.join(os.environ["HPCX_DATA_DIR"], "answers.txt"), "w").write("what I will answer\\n")
        +
         x, velocity = 5.0, 0.0
    """)
    trial_dir = tmp_path / "trial"
    trial_dir.mkdir()
    (trial_dir / DIFF_FILE).write_text(diff)
    TrialSpec("t1", str(trial_dir), env, sandbox="none", provenance={"eval_data_hash": expected}).write()
    run_trial(str(trial_dir))
    result = result_of(trial_dir)
    assert result.status is Status.INVALID_RESULT and "answers.txt" in result.reason
    assert f"changed (hash {expected} -> " in result.reason and not (trial_dir / "eval.log").exists()
