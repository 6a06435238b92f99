"""An open model served for the run: ``vllm serve`` (or any OpenAI-compatible server) as a job.

The job runs ``serve_in_job`` on its node: it picks a free port, writes ``{host, port}`` to an
endpoint file in the run directory (on the shared filesystem), then waits on the server process,
so that cancelling the job stops the server. The driver waits for that file and for the
server's health check, points the role's client at ``http://host:port/v1``, and cancels the job
when the run ends. The job's token is recorded before it is submitted and its id right after,
before the wait: a driver killed at any point finds the job when it runs again (by id, or by
token) and adopts the server once it answers, or cancels it, so neither a second server nor a
leaked one is left.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from hpc_executor.crashpoints import crash_point
from hpc_executor.errors import PreflightError
from hpc_executor.sandbox import tail
from hpc_executor.scheduling import (
    CallRecord,
    Scheduler,
    SchedulerQueryError,
    Shape,
    recorded_call,
    submit_recorded_call,
)
from hpc_executor.trial_dir import write_atomic

log = logging.getLogger(__name__)

ENDPOINT_FILE = "endpoint.json"
POLL_S = 2.0
SUBMITIT_TRACEBACK = "Submitted job triggered an exception"  # submitit logs this line, then the traceback


def serve_in_job(command: list[str], endpoint_file: str) -> None:
    """In the job: choose a port, start the server, publish where it listens, and stay its parent, so
    that cancelling the job (SIGTERM, locally or from Slurm) stops the server too."""
    with socket.socket() as probe:  # the kernel picks a port free on this node
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    argv = [arg.replace("{port}", str(port)) for arg in command]
    server = subprocess.Popen(argv)
    signal.signal(signal.SIGTERM, lambda *_: server.terminate())
    write_atomic(Path(endpoint_file), json.dumps({"host": socket.gethostname(), "port": port}))
    code = server.wait()
    if code not in (0, -signal.SIGTERM):
        raise RuntimeError(f"the model server {argv[0]} exited with status {code}")


class ModelServer:
    """One served model of a run; the caller keeps what ``start`` gives its ``record`` (in the
    ledger, say) so that a restarted driver can ``resume`` the job."""

    def __init__(self, model: str, cfg: DictConfig, scheduler: Scheduler, folder: Path,
                 sleep: Callable[[float], None] = time.sleep) -> None:  # fmt: skip
        self.model = model
        self.cfg = cfg
        self.scheduler = scheduler
        self.folder = folder
        self.endpoint_file = folder / ENDPOINT_FILE
        self.job_id: str | None = None
        self.url: str | None = None  # the OpenAI-compatible base URL (.../v1) while the server is up
        self._sleep = sleep

    @property
    def shape(self) -> Shape:
        return Shape(self.cfg.gpus, self.cfg.cpus, self.cfg.mem_gb, int(self.cfg.time_limit_min) * 60)

    def command(self) -> list[str]:
        values = {"{model}": self.model, "{gpus}": str(self.cfg.gpus)}
        argv = []
        for arg in self.cfg.command:
            for key, value in values.items():
                arg = arg.replace(key, value)
            argv.append(arg)
        return argv

    def resume(self, saved: dict[str, Any], record: CallRecord) -> str | None:
        """The base URL of the server an earlier driver of this run started, from what it recorded
        (see ``start``): its job, or the job found by its token when it was killed before it
        recorded the id. A job still starting is waited for until its own startup deadline; one that
        does not answer by then is cancelled (never two servers for one run), and None returned."""
        since = saved.get("since")
        job_id = recorded_call(self.scheduler, saved, self._sleep, POLL_S)
        if not job_id:
            return None
        if not saved.get("job_id"):  # found by its token: the next driver needs no search
            record({**saved, "job_id": job_id})
        self.job_id = job_id
        # a record without its start time (older runs): the server answers now or never
        remaining = float(since) + float(self.cfg.startup_timeout_s) - time.time() if since else 0.0
        try:
            url = self._await_health(time.monotonic() + remaining)
        except PreflightError as exc:  # it ended: whoever starts the next one reports its own failure
            log.warning("%s", exc)
            return None
        if url is None:
            self.stop()
            return None
        log.info("re-using model server job %s at %s", self.job_id, url)
        return url

    def start(self, record: CallRecord) -> str:
        """Submit the server job and wait until it answers its health check; returns the base URL
        for the OpenAI-compatible client (``.../v1``). ``record`` is given ``{token, job_id, since}``
        before the job is submitted (job_id None: a job with this token may exist) and again with its
        id at once after, before the wait (minutes), so that a killed driver's job is found."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.endpoint_file.unlink(missing_ok=True)
        name = f"serve-{self.model.rsplit('/', 1)[-1]}"
        self.job_id = submit_recorded_call(self.scheduler, serve_in_job, (self.command(), str(self.endpoint_file)),
                                           self.shape, name, record, "model_server")  # fmt: skip
        crash_point("model_server_after_record")
        log.info("model server for %s: job %s, waiting up to %.0f s for it to answer",
                 self.model, self.job_id, self.cfg.startup_timeout_s)  # fmt: skip
        url = self._await_health(time.monotonic() + self.cfg.startup_timeout_s)
        if url is not None:
            log.info("model server for %s is up at %s", self.model, url)
            return url
        job = self.job_id
        self.stop()  # which forgets the job
        raise PreflightError(
            f"the model server for {self.model} (job {job}) did not answer {self.cfg.health_path} within "
            f"serve.startup_timeout_s={self.cfg.startup_timeout_s:g}s; it was cancelled. Its log: "
            f"{self._log_hint(job)}. Raise the timeout if the queue or the weights are slow."
        )

    def _await_health(self, deadline: float) -> str | None:
        """The job's base URL (``.../v1``) once its server answers; None if it has not by ``deadline``
        (looked at once at least); PreflightError if the job ends first."""
        while True:
            url = self._endpoint()
            # sacct lags: a job that started seconds ago may still read pending, or unknown, and answer
            if url and self._healthy(url):
                self.url = url + "/v1"
                return self.url
            self._check_alive()
            if time.monotonic() >= deadline:
                return None
            self._sleep(POLL_S)

    def stop(self) -> None:
        if self.job_id:
            self.scheduler.cancel([self.job_id])
            log.info("model server job %s for %s cancelled", self.job_id, self.model)
            self.job_id = self.url = None

    def _endpoint(self) -> str | None:
        try:
            where = json.loads(self.endpoint_file.read_text())
        except (OSError, ValueError):
            return None
        return f"http://{where['host']}:{where['port']}"

    def _healthy(self, url: str) -> bool:
        try:
            with urllib.request.urlopen(url + self.cfg.health_path, timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _check_alive(self) -> None:
        assert self.job_id is not None
        try:
            state = self.scheduler.states([self.job_id])[self.job_id]
        except SchedulerQueryError as exc:
            log.warning("cannot ask about model server job %s: %s", self.job_id, exc)
            return
        if state.finished:
            job, self.job_id = self.job_id, None
            raise PreflightError(
                f"the model server for {self.model} (job {job}) ended ({state.value}) before it answered; "
                f"its log: {self._log_hint(job)}"
            )

    def _log_hint(self, job_id: str | None = None) -> str:
        log_path = self.scheduler.job_log(job_id or self.job_id or "")
        if log_path is None:
            return f"(no log found under {self.scheduler.folder})"
        text = server_output(tail(log_path, 8000))
        return str(log_path) + (f"\n{text}" if text else "")


def server_output(log_text: str, max_chars: int = 1500) -> str:
    """The end of what the server printed, then the job's exception. submitit appends the job
    function's traceback to the same log; left in, its frames push the server's own error (the
    line that says what to fix) out of a short tail."""
    lines = log_text.strip().splitlines()
    cut = next((i for i, line in enumerate(lines) if SUBMITIT_TRACEBACK in line), len(lines))
    printed = "\n".join(lines[:cut])[-max_chars:]
    raised = lines[-1] if cut < len(lines) else ""
    return "\n".join(part for part in (printed, raised) if part)
