"""slurm/start-local-cluster.sh and stop-local-cluster.sh on the fresh path: a second cluster in a
temporary root (empty config dir and state dir, no slurm.conf anywhere in them, its own ports, node
name and fake GPUs) comes up beside the machine's cluster, runs a job and is stopped; and every way
the scripts can fail ends with a message and a non-zero exit, never silently."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

SLURM_DIR = Path(__file__).resolve().parent.parent / "slurm"
DAEMONS = [
    "/usr/sbin/munged",
    "/usr/sbin/mariadbd",
    "/usr/sbin/slurmdbd",
    "/usr/sbin/slurmctld",
    "/usr/sbin/slurmd",
]

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the scripts run as root only")
# Without the packages the start script would apt-get install them: the tests never do that.
needs_packages = pytest.mark.skipif(
    os.geteuid() != 0 or not all(Path(d).exists() for d in DAEMONS),
    reason="needs root and the Slurm packages: run `sudo slurm/start-local-cluster.sh` once",
)


def run_script(
    name: str, settings: dict[str, str], *args: str, timeout: float = 240
) -> subprocess.CompletedProcess:
    """Run a script with exactly these HPCX_SLURM_* settings (none inherited, no SLURM_CONF)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HPCX_SLURM_") and k != "SLURM_CONF"}
    return subprocess.run(
        ["bash", str(SLURM_DIR / name), *args],
        env={**env, **settings},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_fails_saying(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode != 0, f"exited 0:\n{proc.stdout}{proc.stderr}"
    assert "error:" in proc.stderr, f"no error message (exit {proc.returncode}):\n{proc.stderr}"
    for word in words:
        assert word in proc.stderr, f"{word!r} not in:\n{proc.stderr}"


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def listening(port: int) -> bool:
    """Something accepts connections on the port (a closed port may still be in TIME_WAIT: not free to
    bind for a minute, yet nothing listens)."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def free_ports(n: int) -> list[int]:
    """Ports below Linux's ephemeral range (outgoing connections do not take them meanwhile)."""
    candidates = random.sample(range(20000, 32000), 50)
    return [p for p in candidates if port_free(p)][:n]


@pytest.fixture
def fresh_root() -> Iterator[tuple[Path, dict[str, str]]]:
    """An empty temporary root and the settings that put a whole second cluster inside it."""
    # Short (MariaDB's socket path must fit in 108 bytes), and open to the mysql user.
    root = Path(tempfile.mkdtemp(prefix="hpcx-fresh-", dir="/tmp"))
    root.chmod(0o755)
    ctld, slurmd, dbd, db = free_ports(4)
    settings = {
        "HPCX_SLURM_STATE": str(root / "state"),
        "HPCX_SLURM_CONF_DIR": str(root / "etc" / "slurm"),
        "HPCX_SLURM_CLUSTER": "fresh",
        "HPCX_SLURM_NODE": "freshnode",
        "HPCX_SLURM_GPU_PREFIX": str(root / "dev" / "fakegpu"),
        "HPCX_SLURM_CTLD_PORT": str(ctld),
        "HPCX_SLURM_SLURMD_PORT": str(slurmd),
        "HPCX_SLURM_DBD_PORT": str(dbd),
        "HPCX_SLURM_DB_PORT": str(db),
    }
    try:
        yield root, settings
    finally:
        if (root / "state").exists():
            run_script("stop-local-cluster.sh", settings, "--cancel-jobs")
        shutil.rmtree(root)


def wait_for_state(job_id: str, env: dict[str, str], final: str, limit_s: float = 60) -> str:
    deadline = time.monotonic() + limit_s
    state = ""
    while time.monotonic() < deadline:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", job_id],
                             env=env, capture_output=True, text=True, timeout=30)  # fmt: skip
        state = out.stdout.strip()
        if state == final:
            break
        time.sleep(0.3)
    return state


def machine_cluster_node() -> str:
    """What the machine's own cluster (/etc/slurm, no SLURM_CONF) says its node is, if it is up."""
    if not shutil.which("sinfo"):
        return ""
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CONF"}
    out = subprocess.run(["sinfo", "-h", "-o", "%N"], env=env, capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


@needs_packages
@pytest.mark.slurm
def test_a_second_cluster_in_an_empty_root_starts_runs_a_job_and_stops(fresh_root) -> None:
    root, settings = fresh_root
    conf = root / "etc" / "slurm" / "slurm.conf"
    assert not conf.exists()
    machine_node = machine_cluster_node()

    up = run_script("start-local-cluster.sh", settings)
    assert up.returncode == 0, up.stdout + up.stderr
    assert "up on freshnode (idle" in up.stdout
    assert f"export SLURM_CONF={conf}" in up.stdout  # the user is told how to reach it
    text = conf.read_text()
    for line in (f"SlurmctldPort={settings['HPCX_SLURM_CTLD_PORT']}", "ClusterName=fresh",
                 f"AccountingStoragePort={settings['HPCX_SLURM_DBD_PORT']}"):  # fmt: skip
        assert line in text.splitlines()
    assert (root / "dev" / "fakegpu7").is_char_device()

    # A GPU job through the new cluster's config; sacct (slurmdbd, MariaDB) reports it.
    env = {**os.environ, "SLURM_CONF": str(conf)}
    out = root / "job.out"
    job_id = subprocess.run(
        ["sbatch", "--parsable", "--gpus=1", "-o", str(out),
         "--wrap", "echo $SLURM_CLUSTER_NAME $SLURMD_NODENAME gpu=$CUDA_VISIBLE_DEVICES"],
        env=env, capture_output=True, text=True, check=True, timeout=30,
    ).stdout.strip()  # fmt: skip
    assert wait_for_state(job_id, env, "COMPLETED") == "COMPLETED"
    assert out.read_text().split() == ["fresh", "freshnode", "gpu=0"]
    # The machine's cluster is untouched.
    assert machine_cluster_node() == machine_node

    again = run_script("start-local-cluster.sh", settings)
    assert again.returncode == 0 and "started:[]" in again.stdout, again.stdout + again.stderr

    running = subprocess.run(["sbatch", "--parsable", "-o", "/dev/null", "--wrap", "sleep 300"],
                             env=env, capture_output=True, text=True, check=True, timeout=30).stdout.strip()  # fmt: skip
    assert wait_for_state(running, env, "RUNNING") == "RUNNING"
    down = run_script("stop-local-cluster.sh", settings, "--cancel-jobs")
    assert down.returncode == 0, down.stderr
    assert "cancelled 1 job(s)" in down.stderr  # this cluster's job, none of the machine's
    assert "stopped [slurmd slurmctld slurmdbd mariadbd]" in down.stdout  # munged is the machine's
    ports = [int(settings[k]) for k in settings if k.endswith("_PORT")]
    assert not any(listening(p) for p in ports)
    assert machine_cluster_node() == machine_node


@needs_packages
def test_a_port_in_use_stops_the_start_before_any_daemon_with_its_name(fresh_root) -> None:
    root, settings = fresh_root
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", int(settings["HPCX_SLURM_DBD_PORT"])))
        taken.listen()
        proc = run_script("start-local-cluster.sh", settings)
    assert_fails_saying(proc, f"port {settings['HPCX_SLURM_DBD_PORT']} for slurmdbd", "HPCX_SLURM_DBD_PORT")
    assert not (root / "state" / "mysql.initialized").exists()


@needs_packages
def test_a_foreign_slurm_conf_is_never_overwritten(fresh_root) -> None:
    root, settings = fresh_root
    conf_dir = root / "etc" / "slurm"
    conf_dir.mkdir(parents=True)
    (conf_dir / "slurm.conf").write_text("ClusterName=somebody-elses\n")
    proc = run_script("start-local-cluster.sh", settings)
    assert_fails_saying(proc, f"{conf_dir}/slurm.conf exists and was not written by this script")
    assert (conf_dir / "slurm.conf").read_text() == "ClusterName=somebody-elses\n"


@needs_packages
def test_a_state_dir_the_mysql_user_cannot_enter_is_named(fresh_root) -> None:
    root, settings = fresh_root
    root.chmod(0o700)
    proc = run_script("start-local-cluster.sh", settings)
    assert_fails_saying(proc, "the mysql user cannot enter", "HPCX_SLURM_STATE")


@needs_root
@pytest.mark.parametrize("script", ["start-local-cluster.sh", "stop-local-cluster.sh"])
@pytest.mark.parametrize(
    ("setting", "value", "says"),
    [
        ("HPCX_SLURM_CTLD_PORT", "68l7", "HPCX_SLURM_CTLD_PORT must be a port number"),
        ("HPCX_SLURM_DB_PORT", "6817", "the four ports must differ"),
        ("HPCX_SLURM_STATE", "relative/state", "HPCX_SLURM_STATE must be an absolute path"),
        ("HPCX_SLURM_NODE", "a node", "HPCX_SLURM_NODE must be"),
    ],
)
def test_bad_settings_are_refused_with_the_variable_named(
    script: str, setting: str, value: str, says: str
) -> None:
    assert_fails_saying(run_script(script, {setting: value}), says)


@needs_root
def test_an_unforeseen_failure_still_says_what_failed(tmp_path: Path) -> None:
    """A command that fails with no message of its own (here mkdir under a file) is reported by line."""
    settings = {"HPCX_SLURM_STATE": "/dev/null/state", "HPCX_SLURM_CONF_DIR": str(tmp_path)}
    assert_fails_saying(run_script("start-local-cluster.sh", settings), "error: line", "install -d")


@needs_root
def test_the_running_clusters_config_dir_is_not_taken_over(tmp_path: Path) -> None:
    if not machine_cluster_node():
        pytest.skip("the machine's cluster is not running")
    proc = run_script("start-local-cluster.sh", {"HPCX_SLURM_STATE": str(tmp_path / "state")})
    assert_fails_saying(proc, "is running on /etc/slurm", "HPCX_SLURM_CONF_DIR")
    assert not (tmp_path / "state").exists()


@needs_root
def test_stop_cancels_no_jobs_of_a_cluster_whose_config_it_was_not_given(tmp_path: Path) -> None:
    """--cancel-jobs for a second cluster's state dir, its config dir forgotten: the default config is
    the machine's cluster, whose jobs must not be cancelled. (squeue and scancel are stand-ins here,
    so that a regression cannot cancel real jobs.)"""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    for command in ("squeue", "scancel"):
        (bin_dir / command).write_text(f'#!/bin/sh\necho {command} "$@" >>{calls}\necho 4242\n')
        (bin_dir / command).chmod(0o755)
    settings = {"HPCX_SLURM_STATE": str(tmp_path / "state"), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    proc = run_script("stop-local-cluster.sh", settings, "--cancel-jobs")
    assert_fails_saying(proc, "not cancelling anything", "HPCX_SLURM_CONF_DIR")
    assert not calls.exists()


@needs_root
@pytest.mark.parametrize("script", ["start-local-cluster.sh", "stop-local-cluster.sh"])
def test_not_root_is_refused_with_a_message(script: str) -> None:
    proc = subprocess.run(["runuser", "-u", "nobody", "--", "bash", str(SLURM_DIR / script)],
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert_fails_saying(proc, "must run as root")
