"""The worker: what runs on the node for one trial, and writes its one result.

Per trial: a fresh workspace with the diff applied, training in its own process group with a
scrubbed environment, the frozen evaluator run from a pristine copy of the baseline, a check that
protected files are byte-identical, and ``result.json`` written once, atomically.

Everything the worker needs is in ``<trial_dir>/spec.json`` so that a job on any node of the
cluster (or a re-run from the ledger) needs nothing but the shared filesystem.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from hpc_executor.claim import claim_trial, current_job_id
from hpc_executor.environment import Environment
from hpc_executor.errors import NotADiff, PatchFailed, PatchRejected
from hpc_executor.sandbox import (
    Limits,
    Sandbox,
    SandboxUnavailable,
    View,
    resolve_sandbox,
    run_in_group,
    scrubbed_environ,
    tail,
)
from hpc_executor.storage import ran_out_of_space
from hpc_executor.timed_apply import apply_diff_in_time
from hpc_executor.trial_dir import (
    EVAL_LOG,
    EVALUATOR_DIR,
    OUTPUT_DIR,
    RESULT_FILE,
    TRAIN_LOG,
    WORKSPACE_DIR,
    TrialSpec,
    copy_baseline,
    read_diff,
    write_atomic,
    write_started,
)
from hpc_executor.types import Result, Status


def file_digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def run_trial(trial_dir: str) -> str:
    """Entry point of a scheduled job. Returns the result path. Runs nothing if a result exists
    (a requeued job that already finished)."""
    tdir = Path(trial_dir)
    result_path = tdir / RESULT_FILE
    if result_path.exists():
        return str(result_path)
    job_id = current_job_id()
    if not claim_trial(tdir, job_id):
        return str(result_path)  # a second launch of this trial: the claimant's files stay untouched
    # Slurm and submitit stop a job with SIGTERM/SIGINT: turn them into exceptions so the trial's
    # process group is killed on the way out. No result is written then: the driver decides from
    # the scheduler's state whether the trial was cancelled, timed out or must run again.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # ignored: a local job, see LocalScheduler
        signal.signal(signal.SIGINT, _raise_interrupt)
    # submitit's SIGUSR2 handler (sent before Slurm's time limit) would end the job as "failed";
    # the worker keeps its own hard limit, and a Slurm kill is then recorded as a timeout.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    spec = TrialSpec.read(tdir)
    spec.provenance["job_id"] = job_id
    result = TrialRunner(spec).run()
    write_atomic(result_path, result.to_json())
    return str(result_path)


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


class TrialRunner:
    def __init__(self, spec: TrialSpec) -> None:
        self.spec = spec
        self.dir = Path(spec.trial_dir)
        self.env = Environment(spec.env)
        self.workspace = self.dir / WORKSPACE_DIR
        self.evaluator = self.dir / EVALUATOR_DIR
        self.output = self.dir / OUTPUT_DIR
        self.started = time.monotonic()
        self.where = where_am_i()  # once: it asks nvidia-smi
        self.sandbox = Sandbox(spec.sandbox, "none", "not started")
        self.limits = Limits.from_config(self.env.cfg.limits)

    def run(self) -> Result:
        write_started(self.dir, self.where)
        for d in (self.workspace, self.evaluator, self.output):
            shutil.rmtree(d, ignore_errors=True)  # leftovers of an attempt that was interrupted
        self.output.mkdir(parents=True)
        for log in (TRAIN_LOG, EVAL_LOG):
            (self.dir / log).unlink(missing_ok=True)
        try:
            return self._run()
        finally:
            if not self.spec.keep_workspace:
                shutil.rmtree(self.workspace, ignore_errors=True)
                shutil.rmtree(self.evaluator, ignore_errors=True)

    def _run(self) -> Result:
        try:
            self.sandbox = resolve_sandbox(self.spec.sandbox, self.spec.isolate_pids)
        except SandboxUnavailable as exc:
            return self._result(Status.CRASHED, reason=str(exc))
        changed = self._baseline_changed()
        if changed:  # an earlier trial, or a person, edited the environment after the run started
            return self._result(Status.CRASHED, reason=f"{changed} since the run started; restore it, or start a "
                                "new run (run_name=...) on the new baseline")  # fmt: skip
        copy_baseline(self.env.baseline_dir, self.workspace)
        diff = read_diff(self.dir)
        if diff.strip():
            try:
                apply_diff_in_time(diff, self.workspace, self.env.policy)
            except (
                PatchRejected,
                NotADiff,
            ) as exc:  # a stored diff that is no diff (edited by hand) is rejected too
                return self._result(Status.PATCH_REJECTED, reason=str(exc))
            except PatchFailed as exc:
                return self._result(Status.CRASHED, reason=f"the diff no longer applies: {exc}")

        env_vars = self.env.trial_env(self.spec.seed) | {"HPCX_OUTPUT_DIR": str(self.output)}
        train = run_in_group(
            self.sandbox.wrap(
                self.env.command(self.env.cfg.run_command), self._view(training=True), self.limits
            ),
            cwd=self.workspace,
            env=scrubbed_environ(os.environ, env_vars),
            log_path=self.dir / TRAIN_LOG,
            limit_s=self.env.train_limit_s,
        )
        if train.timed_out:
            return self._result(Status.TIMEOUT, reason=self._train_kill_reason())
        if train.returncode != 0 and ran_out_of_space(self.dir / TRAIN_LOG, self.output):
            return self._result(Status.DISK_FULL, reason=f"training exited with code {train.returncode}: the disk "
                                f"of {self.output} is full; it runs again when the run is resumed")  # fmt: skip
        # The training time is the worker's own measurement: the editable script could report any number.
        train_seconds = round(train.runtime_s, 3)
        if train.returncode != 0:
            return self._result(Status.CRASHED, reason=f"training exited with code {train.returncode}")
        # The trial runs as the user and could have written to the environment itself; the
        # evaluator is copied from there, so it must still be the baseline this run started from.
        changed = self._baseline_changed()
        if changed:
            return self._result(Status.INVALID_RESULT, reason=f"{changed} during the run: its frozen evaluator "
                                "cannot be trusted; restore it (git checkout)")  # fmt: skip
        changed = self._eval_data_changed()
        if changed:
            return self._result(Status.INVALID_RESULT, reason=f"{changed} during the run, so it cannot be scored; "
                                "check this trial's diff, then prepare the data again")  # fmt: skip
        tampered = self._tampered_protected_files()
        if tampered:
            return self._result(
                Status.INVALID_RESULT, reason=f"protected files changed during the run: {', '.join(tampered)}"
            )

        copy_baseline(self.env.baseline_dir, self.evaluator)  # pristine: never the workspace's copy
        metrics_path = self.evaluator / "metrics.json"  # where a sandboxed evaluator may write
        eval_vars = {
            "HPCX_WORKSPACE": str(self.workspace),
            "HPCX_METRICS_PATH": str(metrics_path),
            "HPCX_TRAIN_SECONDS": str(train_seconds),  # time to target from the worker's clock
        }
        evaluation = run_in_group(
            self.sandbox.wrap(
                self.env.command(self.env.cfg.eval_command), self._view(training=False), self.limits
            ),
            cwd=self.evaluator,
            env=scrubbed_environ(os.environ, env_vars | eval_vars),
            log_path=self.dir / EVAL_LOG,
            limit_s=self.env.cfg.eval_limit_s,
        )
        if evaluation.timed_out or evaluation.returncode != 0:
            why = "timed out" if evaluation.timed_out else f"exited with code {evaluation.returncode}"
            return self._result(Status.CRASHED, reason=f"the evaluator {why}", log=EVAL_LOG)
        try:
            metrics = json.loads(metrics_path.read_text())
            if not isinstance(metrics, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            return self._result(Status.INVALID_RESULT, reason=f"no readable metrics: {exc}", log=EVAL_LOG)
        metrics = {k: _json_safe(v) for k, v in metrics.items()} | {"train_seconds": train_seconds}
        outcome = self.env.reward(metrics)
        if outcome.reward is None:
            return self._result(Status.INVALID_RESULT, reason=outcome.problem, metrics=metrics, log=EVAL_LOG)
        return self._result(Status.OK, reward=outcome.reward, metrics=metrics)

    def _train_kill_reason(self) -> str:
        cfg = self.env.cfg
        if cfg.save_margin_s is not None and cfg.budget_s + cfg.save_margin_s <= cfg.hard_limit_s:
            return (f"training killed at the budget of {cfg.budget_s}s + {cfg.save_margin_s}s to save (the worker "
                    "enforces HPCX_TIME_BUDGET_S: training must stop and save by itself before then)")  # fmt: skip
        return f"training killed at the hard limit of {cfg.hard_limit_s}s"

    def _view(self, training: bool) -> View:
        """What the sandbox shows: training its workspace and output, and the data without the
        eval-only files; the evaluator its pristine copy, and the data, workspace and output read-only."""
        cfg = self.env.cfg
        extra = tuple(Path(p) for p in cfg.read_only_paths)
        common = {"private": (self.dir, self.env.dir), "network": cfg.network}
        if training:
            return View(self.workspace, (self.workspace, self.output), (self.env.data_dir, *extra),
                        tuple(self.env.eval_only_paths()), **common)  # fmt: skip
        return View(self.evaluator, (self.evaluator,), (self.env.data_dir, self.workspace, self.output, *extra),
                    **common)  # fmt: skip

    def _baseline_changed(self) -> str:
        """Why the environment's baseline is not the one this trial was created for, or ""."""
        expected = self.spec.provenance.get("baseline_hash")
        found = self.env.baseline_hash()
        if expected and found != expected:
            return (
                f"the environment's baseline in {self.env.baseline_dir} changed (hash {expected} -> {found})"
            )
        return ""

    def _eval_data_changed(self) -> str:
        """Why the evaluation data is not what the run started with, or ""."""
        expected = self.spec.provenance.get("eval_data_hash")
        if not expected:
            return ""
        try:
            found = self.env.eval_data_hash()
        except OSError as exc:
            found = f"unreadable: {exc}"
        if found != expected:
            return f"the evaluation data {', '.join(self.env.cfg.eval_data)} in {self.env.data_dir} changed (hash {expected} -> {found})"
        return ""

    def _tampered_protected_files(self) -> list[str]:
        changed = []
        for rel in self.env.baseline_files():
            if self.env.policy.is_protected(rel) and file_digest(self.workspace / rel) != file_digest(
                self.env.baseline_dir / rel
            ):
                changed.append(rel)
        return changed

    def _result(
        self,
        status: Status,
        *,
        reward: float | None = None,
        reason: str = "",
        metrics: dict[str, Any] | None = None,
        log: str = TRAIN_LOG,
    ) -> Result:
        log_path = self.dir / log
        return Result(
            trial_id=self.spec.trial_id,
            status=status,
            reward=reward,
            metrics=metrics or {},
            runtime_s=round(time.monotonic() - self.started, 3),
            log_path=str(log_path),
            log_tail=tail(log_path),
            reason=reason,
            provenance=self.spec.provenance
            | self.where
            | self.sandbox.provenance()
            | {"packages": package_versions(), "ended_at": time.time()},  # wall-clock, as started_at
        )


def where_am_i() -> dict[str, Any]:
    """Where and when this trial started: host, Slurm ids, GPUs."""
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_array_job_id": os.environ.get("SLURM_ARRAY_JOB_ID"),
        "slurm_array_task_id": os.environ.get("SLURM_ARRAY_TASK_ID"),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "gpu_type": gpu_type(),
        "started_at": time.time(),
    }


def _json_safe(value: Any) -> Any:
    """NaN and infinity are not JSON: keep them readable as strings."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return str(value)
    return value


_PACKAGES = ("torch", "transformers", "vllm", "numpy", "hpc-executor")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def gpu_type() -> str | None:
    """The GPU model, read without importing torch (worker start-up stays cheap)."""
    if not os.environ.get("CUDA_VISIBLE_DEVICES") or not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


if __name__ == "__main__":  # re-run one trial by hand: python -m hpc_executor.worker TRIAL_DIR
    if len(sys.argv) != 2:
        sys.exit("usage: python -m hpc_executor.worker TRIAL_DIR")
    print(run_trial(sys.argv[1]))
