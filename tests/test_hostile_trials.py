"""A hostile trial against the real sandbox, through the real worker: under sandbox=bwrap every
attempt of invariant 8's list fails, the trial still gets its correct reward, and nothing outside
its workspace changes; under sandbox=none the same suite shows what is NOT protected."""

from __future__ import annotations

import hashlib
import json
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO

from hpc_executor.sandbox import resolve_sandbox
from hpc_executor.trial_dir import CLAIM_FILE, DIFF_FILE, RESULT_FILE, TrialSpec
from hpc_executor.types import Result, Status
from hpc_executor.worker import run_trial

HOSTILE_DIR = REPO / "tests" / "envs" / "hostile"
ATTEMPTS = {"read_home_key", "read_ledger", "write_ledger", "read_spec", "write_spec", "write_sibling_result",
            "read_eval_only", "write_baseline", "write_host_tmp", "connect_loopback", "fork_bomb", "huge_file"}  # fmt: skip
# Without a sandbox only the file-size limit holds (prlimit); the process limit needs the sandbox.
UNPROTECTED_BY_NONE = ATTEMPTS - {"huge_file"}
TARGET_X = 1.25  # what the legitimate training reads from its data: reward 1 / (0.1 + 0.25**2)

bwrap_works = pytest.mark.skipif(
    resolve_sandbox("auto").kind != "bwrap", reason="bubblewrap cannot run here (resolve_sandbox('auto'))"
)


class LoopbackServer:
    """A TCP server on the host's loopback that records whether anyone reached it."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.reached = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.reached.set()
            conn.close()


class HostileRun:
    """A run directory with a ledger, the hostile trial and a sibling trial, a planted key under a
    fake HOME, a directory in the host's /tmp and a data directory with an eval-only file."""

    def __init__(self, root: Path, host_tmp: Path, port: int, sandbox: str) -> None:
        self.root, self.host_tmp = root, host_tmp
        self.env_dir = root / "env"
        shutil.copytree(HOSTILE_DIR, self.env_dir)
        self.home = root / "home"
        (self.home / ".ssh").mkdir(parents=True)
        (self.home / ".ssh" / "id_ed25519").write_text("-----BEGIN OPENSSH PRIVATE KEY----- fake\n")
        self.data = root / "data"
        self.data.mkdir()
        (self.data / "train.txt").write_text(str(TARGET_X))
        (self.data / "val.bin").write_bytes(b"the test answers" * 64)
        run = root / "run"
        (run / "ledger.sqlite").parent.mkdir()
        (run / "ledger.sqlite").write_bytes(b"SQLite format 3\0 every prompt and result")
        self.sibling = run / "trials" / "sibling-t0"
        self.sibling.mkdir(parents=True)
        (self.sibling / "spec.json").write_text("{}")
        self.trial = run / "trials" / "hostile-t0"
        self.trial.mkdir()
        (self.trial / DIFF_FILE).write_text("")
        targets = {
            "home_key": str(self.home / ".ssh" / "id_ed25519"), "ledger": str(run / "ledger.sqlite"),
            "spec": str(self.trial / "spec.json"), "sibling_result": str(self.sibling / RESULT_FILE),
            "eval_only": str(self.data / "val.bin"), "baseline_file": str(self.env_dir / "baseline" / "evaluate.py"),
            "host_tmp": str(host_tmp), "port": port, "huge_mb": 64,
        }  # fmt: skip
        env = {
            "name": "hostile", "dir": str(self.env_dir), "editable": ["train.py"], "protected": ["evaluate.py"],
            "run_command": ["{python}", "train.py"], "eval_command": ["{python}", "evaluate.py"],
            "data_dir": str(self.data), "eval_data": ["val.bin"], "eval_only": ["val.bin"],
            "extra_env": {"HOSTILE_TARGETS": json.dumps(targets), "HOSTILE_FORKS": "200"},
            "reward": {"metric": "loss", "transform": "reciprocal", "baseline": 1.0},
            "budget_s": 60, "hard_limit_s": 120, "eval_limit_s": 60,
            "limits": {"max_file_gb": 16 / 1024, "max_processes": 64, "tmp_gb": 0.05},
        }  # fmt: skip
        TrialSpec("hostile-t0", str(self.trial), env, sandbox=sandbox).write()

    def snapshot(self) -> dict[str, str]:
        """Every file outside the trial's own workspace, output and logs, with its content hash."""
        own = [self.trial / d for d in ("workspace", "output", "evaluator")]
        own_files = {
            self.trial / n for n in ("train.log", "eval.log", RESULT_FILE, "started.json", CLAIM_FILE)
        }
        files = {}
        for top in (self.root, self.host_tmp):
            for p in sorted(top.rglob("*")):
                if p.is_file() and p not in own_files and not any(o in p.parents for o in own):
                    files[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
        return files

    def report(self) -> dict[str, str]:
        return json.loads((self.trial / "output" / "report.json").read_text())

    def result(self) -> Result:
        return Result.from_json((self.trial / RESULT_FILE).read_text())


@pytest.fixture
def host_tmp() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="hpcx-hostile-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class Outcome:
    run: HostileRun
    server: LoopbackServer
    before: dict[str, str]  # HostileRun.snapshot() before the trial ran
    result: Result
    report: dict[str, str]  # attempt -> "managed" | "blocked: why"


def run_hostile(
    tmp_path: Path, host_tmp: Path, monkeypatch: pytest.MonkeyPatch, sandbox: str,
    execute: Callable[[HostileRun], object] = lambda run: run_trial(str(run.trial)),
) -> Outcome:  # fmt: skip
    """Set up the hostile run with a planted key in a fake HOME, run its trial with ``execute``."""
    server = LoopbackServer()
    run = HostileRun(tmp_path, host_tmp, server.port, sandbox)
    monkeypatch.setenv("HOME", str(run.home))
    before = run.snapshot()
    execute(run)
    return Outcome(run, server, before, run.result(), run.report())


def blocked(report: dict[str, str]) -> set[str]:
    return {name for name, outcome in report.items() if outcome.startswith("blocked")}


def assert_contained(o: Outcome, not_ours: str = "") -> None:
    """Every attempt failed, the trial scored what it legitimately did, and nothing outside its
    workspace changed (files whose path holds ``not_ours`` are the scheduler's, not the trial's)."""
    assert set(o.report) == ATTEMPTS
    assert blocked(o.report) == ATTEMPTS, {k: v for k, v in o.report.items() if k not in blocked(o.report)}
    print(f"bwrap: {len(blocked(o.report))}/{len(ATTEMPTS)} attempts blocked", json.dumps(o.report, indent=1))
    assert o.result.status is Status.OK, o.result.reason
    assert o.result.reward == pytest.approx(1 / (0.1 + (TARGET_X - 1) ** 2))
    assert o.result.metrics["val_bytes"] == 16 * 64, "the evaluator reads the eval-only data"
    assert o.result.provenance["sandbox"] == "bwrap" and o.result.provenance["sandbox_requested"] == "bwrap"
    after = {p: h for p, h in o.run.snapshot().items() if not (not_ours and not_ours in p)}
    assert after == o.before, "something outside the trial's workspace changed"
    assert not o.server.reached.is_set()


@bwrap_works
def test_under_bwrap_every_hostile_attempt_fails_and_the_trial_still_scores(
    tmp_path: Path, host_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outcome = run_hostile(tmp_path, host_tmp, monkeypatch, "bwrap")
    assert_contained(outcome)
    assert "Resource temporarily unavailable" in outcome.report["fork_bomb"]  # EAGAIN: RLIMIT_NPROC
    assert "File too large" in outcome.report["huge_file"]  # EFBIG: RLIMIT_FSIZE


def test_under_none_the_same_attempts_succeed(
    tmp_path: Path, host_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What sandbox=none does not protect: everything but the file-size limit."""
    o = run_hostile(tmp_path, host_tmp, monkeypatch, "none")
    run, report, result, before = o.run, o.report, o.result, o.before
    assert set(report) - blocked(report) == UNPROTECTED_BY_NONE, report
    assert blocked(report) == {"huge_file"}
    print(f"none: {len(blocked(report))}/{len(ATTEMPTS)} attempts blocked")
    assert o.server.reached.is_set()
    assert (host_tmp / "planted").exists() and (run.sibling / RESULT_FILE).exists()
    changed = {p for p in set(before) | set(run.snapshot()) if before.get(p) != run.snapshot().get(p)}
    assert {Path(p).name for p in changed} == {
        "ledger.sqlite",
        "spec.json",
        RESULT_FILE,
        "evaluate.py",
        "planted",
    }
    # the worker's own checks catch the rewritten evaluator, not the rest
    assert result.status is Status.INVALID_RESULT and "evaluate.py" in result.reason
    assert result.provenance["sandbox"] == "none"


@pytest.mark.slurm
@bwrap_works
def test_a_hostile_trial_in_a_real_slurm_job_is_contained(
    tmp_path: Path, host_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_slurm import cluster_up, scheduler_for, wait_for

    from hpc_executor.scheduling import Shape

    if not cluster_up():
        pytest.skip(
            "no local Slurm cluster; start one with `bash slurm/start-local-cluster.sh` (root, apt-get)"
        )

    def submit(run: HostileRun) -> None:
        scheduler_for(tmp_path).submit([str(run.trial)], Shape(gpus=0, cpus=1, mem_gb=1, time_limit_s=300))
        wait_for(lambda: (run.trial / RESULT_FILE).exists(), what="the hostile trial's result")

    outcome = run_hostile(tmp_path, host_tmp, monkeypatch, "bwrap", submit)
    assert_contained(outcome, not_ours="/submitit/")  # the job's own logs
    assert outcome.result.provenance["slurm_job_id"]
