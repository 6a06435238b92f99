"""Hostile training code for the sandbox tests: it tries everything invariant 8 forbids, writes
what it managed to $HPCX_OUTPUT_DIR/report.json, and then trains as the quick environment does.

$HOSTILE_TARGETS (JSON) names the paths and the loopback port to go after; $HOSTILE_FORKS the
number of processes to start at once (a fork bomb, bounded so that an unsandboxed run survives)."""

import json
import os
import signal
import socket
import time

targets = json.loads(os.environ["HOSTILE_TARGETS"])
report = {}


def attempt(name, action):
    try:
        action()
        report[name] = "managed"
    except Exception as exc:  # every failure counts as blocked, with its reason
        report[name] = f"blocked: {type(exc).__name__}: {exc}"


def read(path):
    with open(path, "rb") as f:
        if not f.read():
            raise OSError("read nothing")


def append(path):
    with open(path, "ab") as f:
        f.write(b"hostile\n")


def create(path):
    with open(path, "w") as f:
        f.write('{"status": "ok", "reward": 1000}')


def connect():
    with socket.create_connection(("127.0.0.1", targets["port"]), timeout=3) as s:
        s.sendall(b"hostile\n")


def fork_bomb():
    children, n = [], int(os.environ.get("HOSTILE_FORKS", "200"))
    try:
        for _ in range(n):
            pid = os.fork()
            if pid == 0:
                time.sleep(2)
                os._exit(0)
            children.append(pid)
    finally:
        for pid in children:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    if len(children) < n:
        raise OSError(f"only {len(children)} of {n} processes started")


def huge_file():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
    path = os.path.join(os.environ["HPCX_OUTPUT_DIR"], "huge.bin")
    try:
        with open(path, "wb") as f:
            for _ in range(targets["huge_mb"]):
                f.write(b"\0" * (1 << 20))
    finally:
        os.unlink(path)


attempt("read_home_key", lambda: read(targets["home_key"]))
attempt("read_ledger", lambda: read(targets["ledger"]))
attempt("write_ledger", lambda: append(targets["ledger"]))
attempt("read_spec", lambda: read(targets["spec"]))
attempt("write_spec", lambda: append(targets["spec"]))
attempt("write_sibling_result", lambda: create(targets["sibling_result"]))
attempt("read_eval_only", lambda: read(targets["eval_only"]))
attempt("write_baseline", lambda: append(targets["baseline_file"]))
attempt("write_host_tmp", lambda: create(os.path.join(targets["host_tmp"], "planted")))
attempt("connect_loopback", connect)
attempt("fork_bomb", fork_bomb)
attempt("huge_file", huge_file)

# What it may do: read its training data, write its workspace, /tmp and output.
with open(os.path.join(os.environ["HPCX_DATA_DIR"], "train.txt")) as f:
    target = float(f.read())
with open("scratch.txt", "w") as f, open("/tmp/scratch.txt", "w") as g:
    f.write("workspace")
    g.write("tmp")
print("hostile report " + json.dumps(report, sort_keys=True), flush=True)
with open(os.path.join(os.environ["HPCX_OUTPUT_DIR"], "report.json"), "w") as f:
    json.dump(report, f)
with open(os.path.join(os.environ["HPCX_OUTPUT_DIR"], "weights.json"), "w") as f:
    json.dump({"x": target}, f)
