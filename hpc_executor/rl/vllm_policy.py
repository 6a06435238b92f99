"""The local GPU policy: the base model served by vLLM with LoRA, adapters loaded at run time, and
the update as a short GPU job through the scheduler.

Serving. The base model runs as the run's served-model job (``model_server.ModelServer``), started
with runtime LoRA loading (``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``, ``--enable-lora``,
``--max-lora-rank`` = ``train.lora_rank``, ``--max-loras``). ``use(version)`` loads the version's
adapter under the name ``step_NNNNN`` (``POST /v1/load_lora_adapter``) and unloads the one before;
``sample`` tokenizes the prompt (``POST /tokenize``), sends its token ids to ``/v1/completions`` with
``n`` completions, ``logprobs=0`` and ``return_tokens_as_token_ids``, and reads each completion's
token ids and sampling log-probs from the answer. Plain temperature sampling (top_p 1, top_k off)
and ``--logprobs-mode processed_logprobs`` (in the default command) make the log-probs those of the
distribution the tokens were drawn from, which the update's importance ratio divides by.

GPUs while trials run. ``serve_during_execution: false`` (the default) stops the server when the
loop ``suspend``s the policy to execute trials and before an update, and starts it again at the
next ``sample`` (a restart costs the weights' load time, minutes, against hours of idle GPUs);
``true`` keeps it up between steps.

Update. ``train_step`` writes the examples as JSON lines and runs the update function (default:
``hpc_executor.rl.update.run_update``, peft + transformers) as a job of the ``update_*`` shape.
Crash consistency: the job goes to ``<work_dir>/vllm/updates/step_NNNNN.json`` (an intent with the
job's token before submitting, its id after), and the job writes ``step_NNNNN.done.json`` once the
version is complete; a resumed driver takes a finished version, waits on a job that still runs
(found by its token when only the intent was recorded), and resubmits one that ended without a
version, or none that was submitted (the update returns a completed version untouched, so a
repeat is harmless). The server goes to ``<work_dir>/vllm/server.json`` the same way (see
``ModelServer.start``), so a restarted driver adopts a server that still answers instead of
starting a second one.

``policy_cfg`` keys: see ``VllmPolicyConfig``.
"""

from __future__ import annotations

import importlib
import json
import logging
import re
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hpc_executor.errors import ConfigError, HpcExecutorError, PreflightError
from hpc_executor.model_server import ModelServer
from hpc_executor.rl.policy import Policy, PolicyVersion, Sample, TrainingExample, TrainSettings
from hpc_executor.rl.policy_config import read_policy_config
from hpc_executor.rl.state_file import read_state
from hpc_executor.sandbox import tail
from hpc_executor.scheduling import (
    JobState,
    Scheduler,
    SchedulerQueryError,
    Shape,
    recorded_call,
    submit_recorded_call,
)
from hpc_executor.trial_dir import write_atomic

log = logging.getLogger(__name__)

RUNTIME_LORA_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"
TOKEN_ID = re.compile(r"^token_id:(\d+)$")  # how return_tokens_as_token_ids spells a token
# What vLLM says at startup for an architecture without LoRA support, and for a rank it rejects.
LORA_UNSUPPORTED = re.compile(r"does not support LoRA|LoRA is not supported", re.IGNORECASE)
LORA_RANK_REJECTED = re.compile(r"max_lora_rank.{0,80}must be", re.IGNORECASE | re.DOTALL)
POLL_S = 2.0
STOP_WAIT_S = 300.0  # a cancelled server's job is given this long to end and free its GPUs
UNKNOWN_GRACE_S = 120.0  # sacct may not know a job for a while after it was submitted

UpdateFn = Callable[[dict[str, Any]], PolicyVersion]


@dataclass
class VllmServeConfig:
    """The served-model job (what ``ModelServer`` reads); the policy adds the LoRA flags."""

    # argv; {model}, {port} and {gpus} are substituted (see ModelServer)
    command: list[str] = field(default_factory=lambda: ["vllm", "serve", "{model}", "--port", "{port}",
                                                        "--tensor-parallel-size", "{gpus}",
                                                        "--logprobs-mode", "processed_logprobs"])  # fmt: skip
    gpus: int = 1
    cpus: int = 8
    mem_gb: int = 64
    time_limit_min: int = 1440
    startup_timeout_s: float = 1800.0  # queueing plus loading the weights
    health_path: str = "/health"


@dataclass
class VllmPolicyConfig:
    """The model group's ``policy:`` section for ``backend: vllm``."""

    backend: str = "vllm"
    model: str = ""  # a Hugging Face model directory or hub id that vLLM serves with LoRA
    serve: VllmServeConfig = field(default_factory=VllmServeConfig)
    max_loras: int = 2  # adapters resident at once: the current one and the one being swapped in
    # false: the server is stopped while trials execute and during the update, started again to sample
    serve_during_execution: bool = False
    request_timeout_s: float = 3600.0  # one sampling request (a whole group) may take this long
    # the update job's shape: GPUs are held for the update only (minutes)
    update_gpus: int = 1
    update_cpus: int = 8
    update_mem_gb: int = 64
    update_time_limit_min: int = 60


class PolicyServeError(HpcExecutorError):
    """The served policy answered something the RL loop cannot use (an adapter it cannot load, a
    group without completions), or its update job ended without a version."""


def run_peft_update(fields: dict[str, Any]) -> PolicyVersion:
    """The default update: ``hpc_executor.rl.update.run_update`` on an ``UpdateSpec`` of ``fields``
    (imported in the job, so the driver needs neither torch nor peft)."""
    update = importlib.import_module("hpc_executor.rl.update")  # rltrain's module; by name until it lands
    version: PolicyVersion = update.run_update(update.UpdateSpec(**fields))
    return version


def update_in_job(update: UpdateFn, fields: dict[str, Any], done_file: str) -> PolicyVersion:
    """In the update job: take the step, then record the finished version for the driver."""
    version = update(fields)
    write_atomic(Path(done_file), json.dumps(asdict(version)))
    return version


def adapter_name(version: PolicyVersion) -> str:
    return f"step_{version.step:05d}"


class VllmLoraPolicy(Policy):
    def __init__(
        self,
        policy_cfg: DictConfig,
        train: TrainSettings,
        work_dir: Path,
        scheduler: Scheduler | None,
        *,
        update: UpdateFn = run_peft_update,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if scheduler is None:
            raise ConfigError(
                "the vllm policy serves its model and runs its update as scheduler jobs: give it a scheduler"
            )
        self.cfg = read_policy_config(
            policy_cfg, VllmPolicyConfig, "the Hugging Face model directory or hub id to serve"
        )
        self.train = train
        self.work_dir = Path(work_dir)
        self.scheduler = scheduler
        self.model = str(self.cfg.model)
        self.label = f"vllm:{self.model}"
        self.version = PolicyVersion(0, None)
        self._update = update
        self._sleep = sleep
        self._state_dir = self.work_dir / "vllm"
        self._state_dir.mkdir(parents=True, exist_ok=True)
        self._server_record = self._state_dir / "server.json"
        self.server = ModelServer(self.model, self._serve_cfg(), scheduler, self._state_dir / "server", sleep)
        self._loaded: str | None = None  # the adapter name the server samples from, once loaded

    def _serve_cfg(self) -> DictConfig:
        serve = OmegaConf.to_container(self.cfg.serve)
        assert isinstance(serve, dict)
        command = list(serve["command"])
        if "--enable-lora" not in command:
            command += ["--enable-lora", "--max-lora-rank", str(self.train.lora_rank),
                        "--max-loras", str(self.cfg.max_loras)]  # fmt: skip
        serve["command"] = ["env", RUNTIME_LORA_ENV, *command]
        return OmegaConf.create(serve)

    # -- serving ---------------------------------------------------------------------------------
    def _ensure_server(self) -> str:
        """The server's root URL, starting it (or adopting the one an earlier driver left) if needed."""
        if self.server.url is None:
            if not self.server.resume(read_state(self._server_record), self._record_server):
                self._start_server()
            self._loaded = None
        assert self.server.url is not None
        return self.server.url.removesuffix("/v1")

    def _record_server(self, record: dict[str, Any]) -> None:
        write_atomic(self._server_record, json.dumps(record))

    def _start_server(self) -> None:
        try:
            self.server.start(self._record_server)
        except PreflightError as exc:
            text = str(exc)
            if LORA_UNSUPPORTED.search(text):
                raise PreflightError(
                    f"model.policy.model={self.model}: vLLM cannot serve this model with LoRA adapters (its "
                    "architecture has no LoRA support in this vLLM version). Choose a model whose architecture "
                    "vLLM lists with LoRA support, or policy.backend=transformers. The server said:\n" + text
                ) from exc
            if LORA_RANK_REJECTED.search(text):
                raise PreflightError(
                    f"vLLM rejected --max-lora-rank {self.train.lora_rank}: set strategy.lora_rank to a rank it "
                    "accepts (8, 16, 32, 64, 128 or 256). The server said:\n" + text
                ) from exc
            raise

    def _stop_server(self) -> None:
        """Cancel the server and wait (up to STOP_WAIT_S) until its job is gone: the update or the
        trials that take its GPUs next would otherwise find their memory still held."""
        job_id = self.server.job_id
        self.server.stop()
        self._loaded = None
        write_atomic(self._server_record, json.dumps({"job_id": None}))
        deadline = time.monotonic() + STOP_WAIT_S
        while job_id and time.monotonic() < deadline:
            try:
                if self.scheduler.states([job_id])[job_id] not in (JobState.PENDING, JobState.RUNNING):
                    return
            except SchedulerQueryError:
                pass
            self._sleep(POLL_S / 4)

    def _ensure_adapter(self, root: str) -> str:
        """The model name to sample the current version from: the base, or its adapter, loaded now
        unless the server has it already (an adopted server keeps what it had loaded)."""
        if self.version.path is None:
            return self.model
        name = adapter_name(self.version)
        if self._loaded == name:
            return name
        served = self._served_models(root)
        if name not in served:
            status, body = _http("POST", root + "/v1/load_lora_adapter",
                                 {"lora_name": name, "lora_path": self.version.path})  # fmt: skip
            if status != 200:
                raise PolicyServeError(
                    f"vLLM could not load policy version {self.version.step}'s adapter {self.version.path} "
                    f"(HTTP {status}: {_error_message(body)}). Check that the directory holds the adapter the "
                    "update wrote (adapter_config.json and its weights), that the server's node can read it "
                    f"(a shared filesystem), and that its rank is at most {self.train.lora_rank}; delete the "
                    "directory to have the update redo it."
                )
            log.info("policy version %d loaded as %s", self.version.step, name)
        for stale in served:  # free the slot: only the current version is sampled from
            if stale.startswith("step_") and stale != name:
                _http("POST", root + "/v1/unload_lora_adapter", {"lora_name": stale})
        self._loaded = name
        return name

    def _served_models(self, root: str) -> list[str]:
        status, body = _http("GET", root + "/v1/models", None)
        if status != 200:
            raise PolicyServeError(
                f"the policy server at {root} did not list its models (HTTP {status}: {body[:300]})"
            )
        return [entry["id"] for entry in json.loads(body).get("data", [])]

    # -- Policy ----------------------------------------------------------------------------------
    def sample(self, prompt: str, n: int, *, temperature: float, max_tokens: int, seed: int) -> list[Sample]:
        if temperature <= 0:
            raise ConfigError(f"RL sampling needs a temperature above 0, got {temperature}")
        root = self._ensure_server()
        model = self._ensure_adapter(root)
        prompt_tokens = self._tokenize(root, prompt)
        request = {"model": model, "prompt": prompt_tokens, "n": n, "temperature": temperature,
                   "max_tokens": max_tokens, "seed": seed, "top_p": 1.0, "top_k": -1,
                   "logprobs": 0, "return_tokens_as_token_ids": True}  # fmt: skip
        status, body = _http("POST", root + "/v1/completions", request, timeout=self.cfg.request_timeout_s)
        if status != 200:
            raise PolicyServeError(
                f"the policy server refused a sampling request for {model} (HTTP {status}: {_error_message(body)})"
            )
        return parse_completions(json.loads(body), prompt_tokens, n, model)

    def _tokenize(self, root: str, prompt: str) -> list[int]:
        status, body = _http("POST", root + "/tokenize", {"model": self.model, "prompt": prompt})
        if status != 200:
            raise PolicyServeError(
                f"the policy server could not tokenize the prompt (HTTP {status}: {_error_message(body)})"
            )
        tokens = [int(t) for t in json.loads(body).get("tokens", [])]
        if not tokens:
            raise ConfigError("the ideation prompt encodes to no tokens; give the policy a non-empty prompt")
        return tokens

    def use(self, version: PolicyVersion) -> None:
        """Sample from ``version``: loaded at once when the server is up, else when it next starts.
        An adapter that fails to load leaves the version before it current."""
        previous, self.version = self.version, version
        if self.server.url is not None:
            try:
                self._ensure_adapter(self.server.url.removesuffix("/v1"))
            except PolicyServeError:
                self.version = previous
                raise

    def suspend(self) -> None:
        if not self.cfg.serve_during_execution:
            self._stop_server()

    def close(self) -> None:
        self._stop_server()

    def train_step(self, examples: list[TrainingExample], *, step: int, out_dir: Path) -> PolicyVersion:
        updates = self._state_dir / "updates"
        updates.mkdir(parents=True, exist_ok=True)
        record, done_file = updates / f"step_{step:05d}.json", updates / f"step_{step:05d}.done.json"
        version = _finished(done_file)
        if version is None:
            if not self.cfg.serve_during_execution:
                self._stop_server()  # the update takes the GPUs; the server comes back to sample
            job_id = recorded_call(self.scheduler, read_state(record), self._sleep, POLL_S)
            if not (job_id and self._still_running(job_id)):
                job_id = self._submit_update(examples, step, Path(out_dir), record, done_file)
            version = self._wait_for_update(str(job_id), step, done_file)
        self.use(version)
        return version

    # -- the update job --------------------------------------------------------------------------
    def _submit_update(self, examples: list[TrainingExample], step: int, out_dir: Path,
                       record: Path, done_file: Path) -> str:  # fmt: skip
        out_dir.mkdir(parents=True, exist_ok=True)
        examples_path = out_dir / f"examples_{step:05d}.jsonl"
        write_atomic(examples_path, "".join(json.dumps(asdict(e)) + "\n" for e in examples))
        fields = {"base_model": self.model, "previous": self.version, "examples_path": str(examples_path),
                  "out_dir": str(out_dir), "step": step, "train": self.train}  # fmt: skip
        shape = Shape(self.cfg.update_gpus, self.cfg.update_cpus, self.cfg.update_mem_gb,
                      int(self.cfg.update_time_limit_min) * 60)  # fmt: skip

        def keep(call: dict[str, Any]) -> None:  # the record names its step too
            write_atomic(record, json.dumps(call | {"step": step}))

        job_id = submit_recorded_call(self.scheduler, update_in_job, (self._update, fields, str(done_file)), shape,
                                      f"rl-update-{step}", keep, "rl_update")  # fmt: skip
        log.info("policy update for step %d: job %s", step, job_id)
        return job_id

    def _still_running(self, job_id: str) -> bool:
        """Whether a recorded update job can still finish (and should be waited on, not resubmitted)."""
        try:
            state = self.scheduler.states([job_id])[job_id]
        except SchedulerQueryError:
            return True  # cannot tell: wait, and ask again
        return state in (JobState.PENDING, JobState.RUNNING)

    def _wait_for_update(self, job_id: str, step: int, done_file: Path) -> PolicyVersion:
        unknown_since: float | None = None
        while True:
            version = _finished(done_file)
            if version is not None:
                return version
            try:
                state = self.scheduler.states([job_id])[job_id]
            except SchedulerQueryError as exc:
                log.warning("cannot ask about update job %s: %s", job_id, exc)
                state = JobState.RUNNING
            if state == JobState.UNKNOWN:
                unknown_since = time.monotonic() if unknown_since is None else unknown_since
                gone = time.monotonic() - unknown_since > UNKNOWN_GRACE_S
            else:
                unknown_since, gone = None, state.finished
            if gone:
                version = _finished(done_file)  # it may have finished between the two looks
                if version is not None:
                    return version
                log_path = self.scheduler.job_log(job_id)
                where = f"{log_path}\n{tail(log_path, 1500).strip()}" if log_path else "(no log found)"
                raise PolicyServeError(
                    f"the policy update job {job_id} for step {step} ended ({state.value}) without writing "
                    f"version {step}; running the step again resubmits it. Its log: {where}"
                )
            self._sleep(POLL_S)


def parse_completions(answer: dict[str, Any], prompt_tokens: list[int], n: int, model: str) -> list[Sample]:
    """``n`` Samples from a ``/v1/completions`` answer asked with ``logprobs=0`` and
    ``return_tokens_as_token_ids``; anything short of that is a PolicyServeError saying what was missing."""
    choices = sorted(answer.get("choices") or [], key=lambda c: int(c.get("index", 0)))
    if len(choices) != n:
        raise PolicyServeError(
            f"the policy server answered {len(choices)} completions for {model}, not the {n} asked for; "
            "check its log for requests it dropped (out of memory, a too long prompt)"
        )
    samples = []
    for choice in choices:
        logprobs = choice.get("logprobs") or {}
        tokens, values = logprobs.get("tokens"), logprobs.get("token_logprobs")
        if tokens is None or values is None or len(tokens) != len(values) or None in values:
            raise PolicyServeError(
                f"completion {choice.get('index')} from {model} has no per-token log-probs; the policy needs a "
                "vLLM server (it asks for logprobs=0 and return_tokens_as_token_ids)"
            )
        ids = []
        for token in tokens:
            match = TOKEN_ID.match(str(token))
            if match is None:
                raise PolicyServeError(
                    f"completion {choice.get('index')} from {model} names token {token!r}, not token_id:N; the "
                    "server ignored return_tokens_as_token_ids (a vLLM older than 0.5.4?)"
                )
            ids.append(int(match.group(1)))
        samples.append(
            Sample(list(prompt_tokens), ids, [float(v) for v in values], str(choice.get("text", "")))
        )
    return samples


def _finished(done_file: Path) -> PolicyVersion | None:
    """The version an update job recorded, if it finished and its directory is still there."""
    done = read_state(done_file)
    if "step" not in done or not (done.get("path") and Path(done["path"]).exists()):
        return None
    return PolicyVersion(int(done["step"]), str(done["path"]))


def _http(method: str, url: str, body: dict[str, Any] | None, timeout: float = 120.0) -> tuple[int, str]:
    """(status, body text) of one JSON request; a server that cannot be reached is a PolicyServeError."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode("utf-8", errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError) as exc:
        raise PolicyServeError(
            f"the policy server at {url} cannot be reached ({exc}); is its job still running?"
        ) from exc


def _error_message(body: str) -> str:
    """The message of a vLLM error answer (``{"error": {"message": ...}}``, or older ``{"message": ...}``)."""
    try:
        data = json.loads(body)
    except ValueError:
        return body[:500]
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if data.get("message"):
            return str(data["message"])
    return body[:500]
