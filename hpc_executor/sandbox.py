"""How a trial's processes are started: a scrubbed environment, its own process group, a hard limit.

Generated code runs here, so nothing of the driver's secrets may reach it: the environment is
rebuilt from an allow-list, and anything that still looks like a credential (by name or by value)
is dropped. The process group lets us kill everything the trial started, including children that
ignore SIGTERM.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

# Variables a training job legitimately needs from the node.
_ALLOW_EXACT = frozenset(
    {
        "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "TERM", "TMPDIR", "TZ", "HOSTNAME",
        "VIRTUAL_ENV", "CONDA_PREFIX", "LD_LIBRARY_PATH", "PYTHONPATH", "PYTHONHASHSEED",
        "MASTER_ADDR", "MASTER_PORT", "HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
        "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE",
    }
)  # fmt: skip
_ALLOW_PREFIXES = (
    "LC_", "SLURM_", "CUDA_", "NCCL_", "NVIDIA_", "OMP_", "MKL_", "TORCH", "PYTORCH_",
    "TRITON_", "GLOO_", "UCX_", "VLLM_", "HPCX_",
)  # fmt: skip
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH|COOKIE|PRIVATE", re.IGNORECASE)
_SECRET_VALUE = re.compile(r"^(sk-|sk-ant-|hf_|ghp_|gho_|github_pat_|xox[abp]-|AKIA)")


def looks_secret(name: str, value: str = "") -> bool:
    return bool(_SECRET_NAME.search(name) or _SECRET_VALUE.match(value))


def scrubbed_environ(base: Mapping[str, str], extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The allow-listed part of ``base`` plus ``extra``, minus anything that looks like a secret."""
    env = {
        k: v
        for k, v in base.items()
        if (k in _ALLOW_EXACT or k.startswith(_ALLOW_PREFIXES)) and not looks_secret(k, v)
    }
    for k, v in (extra or {}).items():
        if looks_secret(k, v):
            raise ValueError(f"refusing to pass {k} to a trial: it looks like a credential")
        env[k] = v
    return env


def drop_secrets_from_environ() -> list[str]:
    """Remove credential-looking variables from this process's environment, so that nothing it
    starts (submitit's controllers, sbatch) inherits them. Call after the LLM clients hold their keys."""
    dropped = [k for k, v in os.environ.items() if looks_secret(k, v)]
    for k in dropped:
        del os.environ[k]
    return dropped


_UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]


@functools.cache
def pid_namespace_prefix(mode: str = "auto") -> tuple[str, ...]:
    """argv prefix that runs a trial in its own PID namespace, where /proc shows only its own
    processes (so it cannot read another process's environment). ``auto`` uses it where the
    kernel allows (root, or unprivileged user namespaces); ``off`` never; ``on`` insists."""
    if mode == "off":
        return ()
    for prefix in (_UNSHARE, ["unshare", "--user", "--map-root-user", *_UNSHARE[1:]]):
        if shutil.which("unshare"):
            probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=10)
            if probe.returncode == 0:
                return tuple(prefix)
    if mode == "on":
        raise RuntimeError("isolate_pids=on but `unshare --pid` is not permitted on this host")
    return ()


@dataclass
class Completed:
    returncode: int | None  # None when killed at the limit
    timed_out: bool
    runtime_s: float


def run_in_group(
    argv: list[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    log_path: Path,
    limit_s: float,
    grace_s: float = 5.0,
) -> Completed:
    """Run ``argv`` in a new session, output appended to ``log_path``. At ``limit_s`` the whole
    group gets SIGTERM, then SIGKILL after ``grace_s``. Leftover group members are killed at the end
    either way, so a trial leaves nothing running behind it."""
    start = time.monotonic()
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(argv)}  (cwd {cwd}, limit {limit_s:.0f}s)\n".encode())
        log.flush()
        proc = subprocess.Popen(
            argv, cwd=cwd, env=dict(env), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            proc.wait(timeout=limit_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=grace_s)
        except BaseException:
            # the worker itself is being stopped (scancel, Ctrl-C): take the trial with it
            kill_group(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        kill_group(proc.pid, signal.SIGKILL)
        proc.wait()
        runtime = time.monotonic() - start
        if timed_out:
            log.write(f"\n[hpc-executor] killed at the hard limit of {limit_s:.0f}s\n".encode())
    return Completed(None if timed_out else proc.returncode, timed_out, runtime)


def kill_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def tail(path: Path, max_bytes: int = 4000) -> str:
    """The end of a log file, for the ledger and error messages."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            return f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""
