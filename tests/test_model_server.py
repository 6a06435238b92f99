"""A model server as a job of its own, on the local executor and on the real Slurm cluster: it comes
up on a port it chose, answers its health check, is found again by a restarted driver, and is gone
when cancelled. The server here is Python's http.server serving a file named ``health``: a real
process listening on a real port, standing in for ``vllm serve``."""

from __future__ import annotations

import json
import re
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import run_search
from fakes.memory_scheduler import MemoryScheduler
from omegaconf import OmegaConf
from test_at_most_once import killed_at
from test_slurm import slurm

from hpc_executor import ledger as ledger_module
from hpc_executor.config import ServeConfig
from hpc_executor.errors import PreflightError
from hpc_executor.model_server import ModelServer, serve_in_job, server_output
from hpc_executor.scheduling import JobState, Shape, make_scheduler
from hpc_executor.servers import saved_record


def scheduler(tmp_path: Path, name: str):
    cfg = {"name": name, "time_limit_min": 5} if name == "slurm" else {"name": name}
    return make_scheduler(OmegaConf.create(cfg), tmp_path / "submitit")


def http_server(tmp_path: Path) -> list[str]:
    root = tmp_path / "www"
    root.mkdir(exist_ok=True)
    (root / "health").write_text("ok")
    return [sys.executable, "-m", "http.server", "{port}", "--bind", "0.0.0.0", "--directory", str(root)]


def serve_config(command: list[str], **overrides: object):
    fields = {"enabled": True, "command": command, "gpus": 0, "cpus": 1, "mem_gb": 1, "time_limit_min": 5,
              "startup_timeout_s": 60.0} | overrides  # fmt: skip
    return OmegaConf.structured(ServeConfig(**fields))


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url.removesuffix("/v1") + "/health", timeout=3) as response:
            return response.status == 200
    except OSError:
        return False


def wait_gone(sched, job_id: str, timeout: float = 60) -> JobState:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = sched.states([job_id])[job_id]
        if state.finished or state == JobState.UNKNOWN:
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still {state} after {timeout}s")


def start_use_adopt_stop(tmp_path: Path, name: str) -> None:
    sched = scheduler(tmp_path, name)
    server = ModelServer("org/tiny-model", serve_config(http_server(tmp_path)), sched, tmp_path / "server")
    records: list[dict] = []
    url = server.start(records.append)
    assert url.startswith("http://") and url.endswith("/v1") and answers(url)
    job_id = server.job_id
    intent, made = records  # the token before the job was submitted, its id before the wait
    assert intent["job_id"] is None and made == intent | {"job_id": job_id}

    # a restarted driver (a new scheduler object too) adopts the job instead of starting another: by
    # the id it recorded, or by the token alone when it was killed before it recorded the id
    for saved in (made, intent):
        again = ModelServer("org/tiny-model", serve_config(http_server(tmp_path)), scheduler(tmp_path, name),
                            tmp_path / "server")  # fmt: skip
        found: list[dict] = []
        assert again.resume(saved, found.append) == url and again.job_id == job_id
    assert found == [made], "the job found by its token is recorded with its id"

    server.stop()
    assert wait_gone(sched, job_id) in (
        JobState.CANCELLED,
        JobState.COMPLETED,
        JobState.FAILED,
        JobState.UNKNOWN,
    )
    assert not answers(url)
    assert again.resume(made, found.append) is None  # a server that is gone is not adopted


def test_a_local_server_starts_is_adopted_and_stops(tmp_path: Path) -> None:
    start_use_adopt_stop(tmp_path, "local")


@slurm
def test_a_slurm_server_starts_is_adopted_and_stops(tmp_path: Path) -> None:
    start_use_adopt_stop(tmp_path, "slurm")


def test_a_server_that_dies_at_start_says_so_with_its_log(tmp_path: Path) -> None:
    command = [sys.executable, "-c", "import sys; sys.exit('no CUDA devices found')"]
    server = ModelServer(
        "org/tiny-model", serve_config(command), scheduler(tmp_path, "local"), tmp_path / "server"
    )
    with pytest.raises(PreflightError, match=r"ended \(\w+\) before it answered(.|\n)*no CUDA devices found"):
        server.start(lambda record: None)


def test_the_log_hint_keeps_the_servers_error_however_long_submitits_traceback_is() -> None:
    frames = "".join(
        f'  File "/a/long/venv/path/site-packages/submitit/core/frame{i}.py", line {i}\n' for i in range(60)
    )
    log_text = (
        "INFO loading weights\n"
        "ValueError: Model GPT2LMHeadModel does not support LoRA, but LoRA is enabled.\n"
        "submitit ERROR (2026-12-07 20:53:25,033) - Submitted job triggered an exception\n"
        f"Traceback (most recent call last):\n{frames}"
        "RuntimeError: the model server vllm exited with status 1\n"
    )
    hint = server_output(log_text)
    assert "does not support LoRA, but LoRA is enabled" in hint
    assert hint.endswith("RuntimeError: the model server vllm exited with status 1")
    assert "frame" not in hint
    assert server_output("just the server\n" * 500).endswith("just the server")
    assert len(server_output("x" * 5000)) == 1500


def test_a_server_that_never_answers_is_cancelled_at_the_timeout(tmp_path: Path) -> None:
    pid_file = tmp_path / "server.pid"
    write_pid = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(600)"
    sched = scheduler(tmp_path, "local")
    server = ModelServer(
        "org/tiny-model", serve_config([sys.executable, "-c", write_pid], startup_timeout_s=3.0), sched,
        tmp_path / "server",
    )  # fmt: skip
    with pytest.raises(
        PreflightError, match=r"\(job (\d+)\) did not answer /health within serve\.startup_timeout_s=3s"
    ) as error:
        server.start(lambda record: None)
    job_id = re.search(r"\(job (\d+)\)", str(error.value))[1]  # type: ignore[index]
    # Left alone, the server sleeps for 600 s, and its job with it: both end at once when cancelled.
    assert wait_gone(sched, job_id, timeout=15) is JobState.CANCELLED
    assert not Path(f"/proc/{pid_file.read_text()}").exists(), "the server process outlived its job"


def test_a_killed_drivers_server_found_by_its_token_is_cancelled_when_its_startup_time_is_up(
    tmp_path: Path,
) -> None:
    """In memory: the orphan is found by its token (asked again while the scheduler is down), recorded
    with its id, and, never having answered, cancelled instead of adopted; nothing found, nothing done."""
    sched = MemoryScheduler(tmp_path / "submitit")
    shape = Shape(gpus=0, cpus=1, mem_gb=1, time_limit_s=60)
    orphan = sched.submit_call(serve_in_job, ([], ""), shape, "serve-tiny-model", token="orphantoken1")
    sched.submit_call(serve_in_job, ([], ""), shape, "serve-other", token="othertoken12")
    sched.queries_fail = True
    server = ModelServer("org/tiny-model", serve_config(["true"]), sched, tmp_path / "server",
                         sleep=lambda _: setattr(sched, "queries_fail", False))  # fmt: skip
    found: list[dict] = []
    saved = {"token": "orphantoken1", "job_id": None, "since": time.time() - 61}  # startup_timeout_s is 60
    assert server.resume(saved, found.append) is None and server.job_id is None
    assert found == [saved | {"job_id": orphan}] and sched.cancelled == [orphan]
    assert sched.find_call("orphantoken1", saved["since"]) == orphan, "an ended call is still found"
    assert server.resume(saved | {"token": "nevertoken12"}, found.append) is None
    assert len(found) == 1 and sched.cancelled == [orphan]


def test_the_ledger_reads_a_servers_record_and_the_plain_job_ids_older_runs_kept() -> None:
    record = {"token": "0123456789ab", "job_id": "12345", "since": 1.5}
    assert saved_record(json.dumps(record)) == record
    assert saved_record("12345") == {"job_id": "12345"} and saved_record("123_4") == {"job_id": "123_4"}
    assert saved_record(None) == {}


def test_the_command_gets_the_model_and_gpus(tmp_path: Path) -> None:
    cfg = OmegaConf.structured(ServeConfig(enabled=True, gpus=4))
    server = ModelServer("Qwen/Qwen3-30B-A3B", cfg, scheduler(tmp_path, "local"), tmp_path)
    assert server.command() == ["vllm", "serve", "Qwen/Qwen3-30B-A3B", "--port", "{port}",
                                "--tensor-parallel-size", "4"]  # fmt: skip


FAKE_SERVER = Path(__file__).parent / "fakes" / "llm_server.py"
IDEA_AND_DIFF = (  # one answer serves both roles: the ideator reads the idea, the implementer the diff
    "<idea><title>Raise the learning rate</title><description>Use 0.4 instead of 0.1.</description></idea>\n"
    "```diff\n--- a/params.py\n+++ b/params.py\n@@ -2,1 +2,1 @@\n-LEARNING_RATE = 0.1\n+LEARNING_RATE = 0.4\n```\n"
)


def served_search(tmp_path: Path, *extra: str, epochs: int = 1):
    return run_search(*served_args(tmp_path, *extra, epochs=epochs), cwd=tmp_path)


def served_args(tmp_path: Path, *extra: str, epochs: int = 1) -> tuple[str, ...]:
    reply = tmp_path / "reply.txt"
    reply.write_text(IDEA_AND_DIFF)
    command = [sys.executable, str(FAKE_SERVER), "--host", "0.0.0.0", "--port", "{port}", "--models", "{model}",
               "--reply-text-file", str(reply)]  # fmt: skip
    serve = [f"model.{role}.serve.{key}={value}" for role in ("ideator", "implementer") for key, value in
             {"enabled": "true", "command": "[" + ",".join(f"'{a}'" for a in command) + "]", "gpus": 0, "cpus": 1,
              "mem_gb": 1, "startup_timeout_s": 120}.items()]  # fmt: skip
    fail_fast = [
        f"model.{role}.max_retries=1" for role in ("ideator", "implementer")
    ]  # a broken server shows at once
    return ("+env=quick", "+model=qwen3_vllm", f"strategy.epochs={epochs}", "strategy.batch_size=1",
            "strategy.call_size=1", "model.samples=1", *serve, *fail_fast, *extra)  # fmt: skip


def check_served_run(tmp_path: Path, proc) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert out.count("is up at http://") == 1  # both roles share one server
    url = out.split("is up at ", 1)[1].split()[0]
    assert "cancelled" in out and not answers(url)  # stopped at the end of the run
    frames = ledger_module.load(tmp_path / RUN)
    calls = frames["llm_calls"]
    assert set(calls.provider) == {"openai_compatible"} and set(calls.model) == {"Qwen/Qwen3-30B-A3B"}
    assert list(calls.outcome) == ["ok", "applied"] and (calls.output_tokens > 0).all()
    result = frames["results"].set_index("trial_id").loc["e0-000-t0"]
    assert result.status == "ok" and result.reward > 9.95
    assert frames["trials"].set_index("trial_id").loc["e0-000-t0", "state"] == "done"


def test_a_search_serves_its_open_model_locally_and_stops_it(tmp_path: Path) -> None:
    check_served_run(tmp_path, served_search(tmp_path))


@slurm
def test_a_search_serves_its_open_model_on_slurm_and_stops_it(tmp_path: Path) -> None:
    check_served_run(tmp_path, served_search(tmp_path, "scheduler=slurm", "scheduler.poll_interval_s=0.5",
                                              "scheduler.poll_interval_max_s=1"))  # fmt: skip


RUN = "outputs/quick-qwen3_vllm-evolution-seed0"


def server_jobs(run_dir: Path) -> list[str]:
    """The model-server jobs submitted for the run, started or not: the jobs whose pickled call
    names serve_in_job."""
    pickles = (run_dir / "submitit").glob("*/*_submitted.pkl")
    return sorted(p.parent.name for p in pickles if b"serve_in_job" in p.read_bytes())


@pytest.mark.parametrize("window", ["model_server_before_submit", "model_server_after_submit",
                                    "model_server_after_record"])  # fmt: skip
@pytest.mark.parametrize("backend", ["local", pytest.param("slurm", marks=slurm)])
def test_a_driver_killed_while_its_server_starts_leaves_one_server_and_none_behind(
    tmp_path: Path, window: str, backend: str
) -> None:
    """Killed with its server's token recorded and the job not yet submitted, submitted but its id not
    recorded, or recorded while the server loads: the same command run again adopts the killed
    driver's server (found by its token, or its id) or starts the one that was never submitted, and
    cancels it at the end."""
    fast = ("scheduler.poll_interval_s=0.5", "scheduler.poll_interval_max_s=1") if backend == "slurm" else ()
    args = served_args(tmp_path, f"scheduler={backend}", *fast)
    killed_at(window, args, tmp_path)
    run_dir = tmp_path / RUN
    orphans = server_jobs(run_dir)
    assert len(orphans) == (window != "model_server_before_submit"), orphans

    sched = make_scheduler(OmegaConf.create({"name": backend}), run_dir / "submitit")
    try:
        proc = run_search(*args, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out = proc.stdout + proc.stderr
        jobs = server_jobs(run_dir)
        assert len(jobs) == 1, f"one server job for the run, not {jobs}"
        if orphans:
            assert f"re-using model server job {jobs[0]}" in out and "is up at" not in out
        assert sched.states(jobs) == {jobs[0]: JobState.CANCELLED}, "stopped at the end of the run"
    finally:
        sched.cancel(server_jobs(run_dir))  # what a failing run leaked would hold its node for minutes
    frames = ledger_module.load(run_dir)
    assert frames["results"].set_index("trial_id").loc["e0-000-t0"].status == "ok"


@pytest.mark.parametrize(("keep_alive", "starts"), [(False, 2), (True, 1)])
def test_the_server_is_down_while_trials_run_unless_kept_alive(
    tmp_path: Path, keep_alive: bool, starts: int
) -> None:
    keep = [f"model.{role}.serve.keep_alive={str(keep_alive).lower()}" for role in ("ideator", "implementer")]
    proc = served_search(tmp_path, *keep, epochs=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert out.count("is up at http://") == starts and out.count("cancelled") == starts
    frames = ledger_module.load(tmp_path / RUN)
    assert (frames["results"].status == "ok").sum() == 3  # the baseline and one idea per epoch
