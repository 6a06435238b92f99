"""The bubblewrap sandbox: its command line (GPUs, network, hidden files), the auto probe and its
fallback, the plan and provenance that say which sandbox ran, the hard limit, and the apply limit."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import run_search

from hpc_executor import timed_apply
from hpc_executor.errors import PatchRejected
from hpc_executor.patching import WorkspacePolicy
from hpc_executor.sandbox import (
    Limits,
    SandboxUnavailable,
    View,
    bwrap_argv,
    gpu_devices,
    resolve_sandbox,
    run_in_group,  # fmt: skip
    scrubbed_environ,
)

bwrap_works = pytest.mark.skipif(
    resolve_sandbox("auto").kind != "bwrap", reason="bubblewrap cannot run here (resolve_sandbox('auto'))"
)


def pairs(argv: list[str], flag: str) -> list[str]:
    """The destinations of every ``flag SRC DEST`` in ``argv``."""
    return [argv[i + 2] for i, a in enumerate(argv) if a == flag]


def test_gpu_nodes_pass_the_nvidia_devices_and_nothing_else_of_dev(tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "sda", "kmsg"):
        (dev / name).parent.mkdir(exist_ok=True)
        (dev / name).touch()
    for name in ("nvidia-caps", "dri"):
        (dev / name).mkdir()
    found = gpu_devices(dev)
    assert [p.name for p in found] == ["dri", "nvidia-caps", "nvidia-uvm", "nvidia-uvm-tools", "nvidia0",
                                       "nvidia1", "nvidiactl"]  # fmt: skip
    argv = bwrap_argv("bwrap", View(cwd=tmp_path), Limits(), ["true"], devices=found)
    assert pairs(argv, "--dev-bind") == [str(p) for p in found]
    assert argv[argv.index("--dev") : argv.index("--dev") + 2] == ["--dev", "/dev"]
    assert argv[argv.index("/sys") - 1 : argv.index("/sys") + 2] == ["--ro-bind", "/sys", "/sys"]
    assert gpu_devices(tmp_path / "cpu-node") == []


def test_no_network_unless_the_environment_declares_it(tmp_path: Path) -> None:
    assert "--unshare-net" in bwrap_argv("bwrap", View(cwd=tmp_path), Limits(), ["true"], devices=[])
    assert "--unshare-net" not in bwrap_argv(
        "bwrap", View(cwd=tmp_path, network=True), Limits(), ["true"], devices=[]
    )


def test_hidden_files_are_left_out_of_the_data_binds(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "val").mkdir(parents=True)
    for rel in ("train.bin", "meta.json", "val/shard0.bin", "val/shard1.bin"):
        (data / rel).write_text(rel)
    view = View(cwd=tmp_path, read_only=(data,), hidden=(data / "val" / "shard1.bin",))
    ro = pairs(bwrap_argv("bwrap", view, Limits(), ["true"], devices=[]), "--ro-bind")
    assert {str(data / r) for r in ("meta.json", "train.bin", "val/shard0.bin")} <= set(ro)
    assert not any(p.startswith(str(data / "val" / "shard1")) or p == str(data) for p in ro)


def test_limits_apply_the_process_limit_only_in_the_sandbox() -> None:
    limits = Limits(file_size_bytes=1 << 20, processes=64, open_files=256)
    # root ignores RLIMIT_NPROC: there the sandbox starts in a pids cgroup (the hostile suite's fork bomb)
    assert ("--nproc=64" in limits.prlimit_argv(True)) is (os.geteuid() != 0)
    assert not any(a.startswith("--nproc=") for a in limits.prlimit_argv(False))
    assert "--fsize=1048576" in limits.prlimit_argv(False) and Limits().prlimit_argv(True) == []


def test_auto_without_a_working_bwrap_runs_unsandboxed_and_bwrap_refuses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HPCX_BWRAP", "/bin/false")  # a bwrap whose every start fails
    chosen = resolve_sandbox("auto")
    assert chosen.kind == "none" and "cannot run here" in chosen.why
    assert chosen.provenance() == {"sandbox": "none", "sandbox_requested": "auto", "sandbox_why": chosen.why}
    with pytest.raises(SandboxUnavailable, match=r"user namespaces.*sandbox=none"):
        resolve_sandbox("bwrap")
    with pytest.raises(SandboxUnavailable, match="not one of auto, bwrap, none"):
        resolve_sandbox("docker")


@bwrap_works
def test_loopback_works_inside_and_the_hard_limit_ends_everything(tmp_path: Path) -> None:
    script = tmp_path / "stubborn.py"
    script.write_text(
        textwrap.dedent("""\
        import signal, socket, subprocess, sys, time
        server = socket.create_server(("127.0.0.1", 0))  # what torchrun --standalone needs
        socket.create_connection(server.getsockname()).close()
        print("loopback ok", flush=True)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                          "signal.SIG_IGN); time.sleep(600)  # hpcx-stubborn-child"])
        time.sleep(600)
    """)
    )
    sandbox = resolve_sandbox("bwrap")
    argv = sandbox.wrap([sys.executable, str(script)], View(cwd=tmp_path, read_only=(tmp_path,)), Limits())
    start = time.monotonic()
    done = run_in_group(argv, cwd=tmp_path, env=scrubbed_environ(os.environ), log_path=tmp_path / "log",
                        limit_s=3, grace_s=1)  # fmt: skip
    assert done.timed_out and time.monotonic() - start < 15
    assert "loopback ok" in (tmp_path / "log").read_text()
    deadline = time.monotonic() + 5
    while stubborn_children() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stubborn_children() == []


def stubborn_children() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"hpcx-stubborn-child" in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_the_plan_says_which_sandbox_and_bwrap_that_cannot_work_is_a_preflight_error(tmp_path: Path) -> None:
    proc = run_search(
        "+env=quick", "+model=offline", "check_only=true", cwd=tmp_path, env={"HPCX_BWRAP": "/bin/false"}
    )
    assert proc.returncode == 0, proc.stderr
    assert "sandbox        none (auto: bubblewrap cannot run here" in proc.stdout
    proc = run_search(
        "+env=quick", "+model=offline", "sandbox=bwrap", cwd=tmp_path, env={"HPCX_BWRAP": "/bin/false"}
    )
    assert proc.returncode == 2 and "sandbox=bwrap, but bubblewrap cannot run" in proc.stderr
    assert "enable unprivileged user namespaces" in proc.stderr and "Traceback" not in proc.stderr
    if resolve_sandbox("auto").kind == "bwrap":
        proc = run_search("+env=quick", "+model=offline", "check_only=true", cwd=tmp_path)
        assert "sandbox        bwrap (bubblewrap at" in proc.stdout


def test_every_trial_of_an_unsandboxed_run_says_so(tmp_path: Path) -> None:
    proc = run_search("+env=quick", "+model=offline", "strategy.epochs=1", cwd=tmp_path,
                      env={"HPCX_BWRAP": "/bin/false"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sandbox none (auto: bubblewrap cannot run here" in proc.stdout + proc.stderr
    db = sqlite3.connect(next(tmp_path.glob("outputs/*/ledger.sqlite")))
    rows = [json.loads(p) for (p,) in db.execute("SELECT provenance FROM results WHERE status = 'ok'")]
    assert rows and all(r["sandbox"] == "none" and r["sandbox_requested"] == "auto" for r in rows)


def test_an_apply_that_runs_past_its_limit_is_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    diff = "--- a/f.txt\n+++ b/f.txt\n@@ -1 +1 @@\n-old\n+new\n"
    (tmp_path / "f.txt").write_text("old\n")
    policy = WorkspacePolicy(editable=("f.txt",))
    assert "+new" in timed_apply.apply_diff_in_time(diff, tmp_path, policy)
    assert (tmp_path / "f.txt").read_text() == "new\n"
    monkeypatch.setattr(timed_apply, "apply_diff", lambda *args: time.sleep(60))  # a parser gone quadratic
    start = time.monotonic()
    with pytest.raises(PatchRejected, match="took longer than 1s and was stopped"):
        timed_apply.apply_diff_in_time(diff, tmp_path, policy, limit_s=1)
    assert time.monotonic() - start < 10


def test_a_hung_git_apply_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from hpc_executor import patching

    (tmp_path / "f.txt").write_text("old\n")
    monkeypatch.setattr(patching, "_GIT_TIMEOUT_S", 1e-4)
    with pytest.raises(PatchRejected, match="git apply took longer than"):
        patching.apply_diff("--- a/f.txt\n+++ b/f.txt\n@@ -1 +1 @@\n-old\n+new\n", tmp_path,
                            WorkspacePolicy(editable=("f.txt",)))  # fmt: skip


def test_the_sandbox_command_runs_a_smoke_script_inside(tmp_path: Path) -> None:
    if resolve_sandbox("auto").kind != "bwrap":
        pytest.skip("bubblewrap cannot run here")
    (tmp_path / "smoke.py").write_text(
        "import os; print(os.environ['HOME'], len(os.listdir(os.environ['HOME'])))\n"
    )
    proc = subprocess.run([sys.executable, "-m", "hpc_executor.sandbox", "--", sys.executable, "smoke.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["/home/trial", "0"]
