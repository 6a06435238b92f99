"""A loopback stand-in for the Tinker service, speaking the wire protocol of the ``tinker`` SDK (0.38) for
what the Tinker policy uses: a real ``tinker.ServiceClient`` pointed at it trains and samples as it
would against the service.

Endpoints (all under ``/api/v1``; each checks the ``X-API-Key`` header when ``api_key`` is given, else
401): ``client/config`` and ``client/dynamic_config`` (the SDK's feature flags: API-key auth, no JWT
exchange, per-request future polling), ``create_session``, ``session_heartbeat``,
``sessions/{id}/finish``, ``telemetry``, ``healthz``; the server-side futures ``create_model``,
``load_weights`` (a training client made from a checkpoint), ``forward_backward`` (a protobuf body,
decoded here), ``optim_step``, ``save_weights``, ``save_weights_for_sampler`` and ``asample``, each
answering ``{"request_id": ...}`` whose result ``retrieve_future`` gives: ``try_again`` for the first
``pending_polls`` polls, then the result (JSON, or protobuf for forward_backward and samples), or
``{"error", "category"}`` for a request Tinker would fail (an unknown checkpoint, a name saved twice);
and the plain ``get_info``, ``create_sampling_session`` and ``GET samplers/{id}``.

Its "model" is arithmetic, so tests can check what they get: a model's ``steps`` is the optimiser steps
it has taken (checkpoints keep it, a model loaded from one goes on from it), and sample ``i`` of a
request with seed ``s`` from weights at ``steps`` is ``max_tokens`` (else ``SAMPLE_LENGTH``) tokens
``97 + (s + i + k + steps) % 26`` (``k`` the position) with log-prob ``-0.5 - 0.01 * k``.

Every request is recorded in ``calls`` (method, path, lower-cased headers, body: the JSON, or
forward_backward's protobuf as a dict of plain lists). ``fail(path, status, times)`` makes the next
``times`` requests to ``path`` answer ``status`` before they are handled, as an overloaded service
does (500, 503, 429: the SDK retries them).
"""

from __future__ import annotations

import itertools
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

import numpy as np
from tinker.proto import tinker_public_pb2 as pb

from fakes.loopback import LoopbackServer

SAMPLE_LENGTH = 4
PROTOBUF = "application/x-protobuf"
_instances = itertools.count(1)  # ids differ between fakes: the SDK caches some objects by id per process
_NUMPY_DTYPES = {pb.DTYPE_FLOAT32: np.float32, pb.DTYPE_INT64: np.int64, pb.DTYPE_INT32: np.int32}


@dataclass
class Call:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: Any  # the JSON body; forward_backward's protobuf as a dict (see decode_forward_backward)


@dataclass
class Model:
    """A training model (a LoRA adapter on a base model) and its optimiser steps so far."""

    base_model: str
    rank: int
    steps: int = 0
    origin: str | None = None  # the checkpoint it was loaded from
    optimizer_restored: bool = False  # loaded with the checkpoint's optimiser state


@dataclass
class Checkpoint:
    base_model: str
    rank: int
    steps: int
    kind: str  # "weights" (save_state: weights and optimiser state) or "sampler_weights"


@dataclass
class _Future:
    result: Any  # a JSON dict, or protobuf bytes
    polls_left: int  # try_again answers before the result


@dataclass
class _Failure:
    status: int
    times: int
    headers: dict[str, str] = field(default_factory=dict)


class FakeTinker(LoopbackServer):
    """The fake's state: sessions, models, checkpoints, samplers, pending futures and scripted failures."""

    def __init__(
        self,
        api_key: str | None = None,
        *,
        pending_polls: int = 1,
        client_config: dict[str, Any] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.api_key = api_key
        self.pending_polls = pending_polls
        self.client_config = {"pjwt_auth_enabled": False, **(client_config or {})}
        self.prefix = f"fake{next(_instances)}"
        self.calls: list[Call] = []
        self.models: dict[str, Model] = {}
        self.checkpoints: dict[str, Checkpoint] = {}
        self.samplers: dict[str, tuple[str, str | None, int]] = {}  # id -> (base model, model path, steps)
        self.sessions: set[str] = set()
        self.finished: set[str] = set()
        self.failures: dict[str, list[_Failure]] = {}
        self._futures: dict[str, _Future] = {}
        self._ids = itertools.count(1)
        self.lock = threading.Lock()
        super().__init__(_handler_for(self), host, port)

    def fail(self, path: str, status: int, times: int = 1, headers: dict[str, str] | None = None) -> None:
        """The next ``times`` requests to ``path`` (e.g. ``/api/v1/optim_step``) answer ``status``."""
        with self.lock:
            self.failures.setdefault(path, []).append(_Failure(status, times, dict(headers or {})))

    def requests(self, *names: str) -> list[Call]:
        """The recorded requests to ``/api/v1/<name>`` for each name given (all but polls, if none)."""
        wanted = {f"/api/v1/{n}" for n in names}
        return [c for c in self.calls if (c.path in wanted if names else c.path != "/api/v1/retrieve_future")]

    def _new_id(self, kind: str) -> str:
        return f"{self.prefix}-{kind}-{next(self._ids)}"

    # -- dispatch ---------------------------------------------------------------------------------------

    def answer(
        self, method: str, path: str, headers: dict[str, str], raw: bytes
    ) -> tuple[int, Any, dict[str, str]]:
        """(status, payload: a JSON-able value or protobuf bytes, extra response headers)."""
        with self.lock:
            if headers.get("content-type", "").startswith(PROTOBUF):
                body: Any = decode_forward_backward(_decompressed(raw, headers))
            else:
                body = json.loads(raw) if raw else None
            self.calls.append(Call(method, path, headers, body))
            queued = self.failures.get(path)
            if queued:
                failure = queued[0]
                failure.times -= 1
                if failure.times <= 0:
                    queued.pop(0)
                return failure.status, {"detail": f"scripted failure {failure.status}"}, failure.headers
            if self.api_key is not None and headers.get("x-api-key") != self.api_key:
                return 401, {"detail": "Invalid API key"}, {}
            route = _ROUTES.get((method, path))
            if route is not None:
                return route(self, body)
            if method == "GET" and path.startswith("/api/v1/samplers/"):
                return self._get_sampler(path.rsplit("/", 1)[-1])
            if method == "POST" and path.startswith("/api/v1/sessions/") and path.endswith("/finish"):
                self.finished.add(path.split("/")[4])
                return 200, {}, {}
            return 404, {"detail": f"no route {method} {path}"}, {}

    def _future(
        self, result: Any, model_id: str | None = None, **extra: Any
    ) -> tuple[int, Any, dict[str, str]]:
        request_id = self._new_id("req")
        self._futures[request_id] = _Future(result, self.pending_polls)
        return 200, {"request_id": request_id, "model_id": model_id, **extra}, {}

    def _failed(self, message: str) -> tuple[int, Any, dict[str, str]]:
        return self._future({"error": message, "category": "user"})

    # -- session and config -----------------------------------------------------------------------------

    def _client_config(self, body: Any) -> tuple[int, Any, dict[str, str]]:
        return 200, self.client_config, {}

    def _dynamic_config(self, body: Any) -> tuple[int, Any, dict[str, str]]:
        return 200, {}, {}

    def _create_session(self, body: Any) -> tuple[int, Any, dict[str, str]]:
        session_id = self._new_id("session")
        self.sessions.add(session_id)
        return 200, {"type": "create_session", "session_id": session_id}, {}

    def _heartbeat(self, body: Any) -> tuple[int, Any, dict[str, str]]:
        if body["session_id"] in self.finished:
            return 410, {"detail": "session finished"}, {}
        return 200, {"type": "session_heartbeat"}, {}

    def _telemetry(self, body: Any) -> tuple[int, Any, dict[str, str]]:
        return 200, {"status": "accepted"}, {}

    def _healthz(self, body: Any) -> tuple[int, Any, dict[str, str]]:
        return 200, {"status": "ok"}, {}

    # -- training ---------------------------------------------------------------------------------------

    def _create_model(self, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        if body["session_id"] not in self.sessions:
            return 404, {"detail": f"unknown session {body['session_id']}"}, {}
        model_id = f"{body['session_id']}:train:{body['model_seq_id']}"
        self.models[model_id] = Model(body["base_model"], int(body["lora_config"]["rank"]))
        return self._future({"model_id": model_id, "type": "create_model"}, model_id)

    def _load_weights(self, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        path = body["path"]
        checkpoint = self.checkpoints.get(path)
        if checkpoint is None or checkpoint.kind != "weights":
            return self._failed(f"no training checkpoint at {path}")
        model_id = f"{body['session_id']}:train:{body['model_seq_id']}"
        self.models[model_id] = Model(
            checkpoint.base_model, checkpoint.rank, checkpoint.steps, path, bool(body["optimizer"])
        )
        return self._future({"path": path, "model_id": model_id, "type": "load_weights"}, model_id)

    def _get_info(self, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        model = self.models.get(body["model_id"])
        if model is None:
            return 404, {"detail": f"unknown model {body['model_id']}"}, {}
        info = {"model_name": model.base_model, "arch": "fake", "tokenizer_id": model.base_model}
        return (
            200,
            {
                "type": "get_info",
                "model_id": body["model_id"],
                "model_data": info,
                "is_lora": True,
                "lora_rank": model.rank,
                "model_name": model.base_model,
            },
            {},
        )

    def _forward_backward(self, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        if body["model_id"] not in self.models:
            return 404, {"detail": f"unknown model {body['model_id']}"}, {}
        output = pb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord")
        logprobs = [
            np.full(len(d["loss_fn_inputs"]["target_tokens"]), -1.0, np.float32) for d in body["data"]
        ]
        offsets = np.cumsum([0, *(a.nbytes for a in logprobs)]).astype(np.int64)
        record = output.loss_fn_outputs.add(type_tag="ArrayRecord", num_datums=len(logprobs))
        record.fields["logprobs"].CopyFrom(
            pb.BatchedTensor(
                data=b"".join(a.tobytes() for a in logprobs),
                offsets=offsets.tobytes(),
                dtype=pb.DTYPE_FLOAT32,
            )
        )
        output.metrics["loss:sum"] = float(len(body["data"]))
        return self._future(output.SerializeToString(), body["model_id"])

    def _optim_step(self, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        model = self.models.get(body["model_id"])
        if model is None:
            return 404, {"detail": f"unknown model {body['model_id']}"}, {}
        model.steps += 1
        return self._future({"metrics": {"step:unique": float(model.steps)}}, body["model_id"])

    def _save(self, body: dict[str, Any], kind: str) -> tuple[int, Any, dict[str, str]]:
        model = self.models.get(body["model_id"])
        if model is None:
            return 404, {"detail": f"unknown model {body['model_id']}"}, {}
        if body.get("path") is None:  # an ephemeral sampler: save_weights_and_get_sampling_client
            sampler_id = self._new_id("sampler")
            self.samplers[sampler_id] = (model.base_model, None, model.steps)
            return self._future({"sampling_session_id": sampler_id}, body["model_id"])
        path = f"tinker://{body['model_id']}/{kind}/{body['path']}"
        if path in self.checkpoints and not body.get("overwrite"):
            return self._failed(f"a checkpoint named {body['path']} already exists")
        self.checkpoints[path] = Checkpoint(model.base_model, model.rank, model.steps, kind)
        saved = "save_weights" if kind == "weights" else "save_weights_for_sampler"
        return self._future({"path": path, "type": saved}, body["model_id"])

    def _save_weights(self, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        return self._save(body, "weights")

    def _save_for_sampler(self, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        return self._save(body, "sampler_weights")

    # -- sampling ---------------------------------------------------------------------------------------

    def _create_sampling_session(self, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        path = body.get("model_path")
        if path is not None:
            checkpoint = self.checkpoints.get(path)
            if checkpoint is None or checkpoint.kind != "sampler_weights":
                return 400, {"detail": f"no sampler weights at {path}"}, {}
            base, steps = checkpoint.base_model, checkpoint.steps
        else:
            base, steps = body["base_model"], 0
        sampler_id = self._new_id("sampler")
        self.samplers[sampler_id] = (base, path, steps)
        return 200, {"type": "create_sampling_session", "sampling_session_id": sampler_id}, {}

    def _get_sampler(self, sampler_id: str) -> tuple[int, Any, dict[str, str]]:
        if sampler_id not in self.samplers:
            return 404, {"detail": f"unknown sampler {sampler_id}"}, {}
        base, path, _ = self.samplers[sampler_id]
        return 200, {"sampler_id": sampler_id, "base_model": base, "model_path": path}, {}

    def _asample(self, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        if body.get("sampling_session_id") not in self.samplers:
            return 404, {"detail": f"unknown sampler {body.get('sampling_session_id')}"}, {}
        _, _, steps = self.samplers[body["sampling_session_id"]]
        params = body["sampling_params"]
        seed, n = int(params.get("seed") or 0), int(body["num_samples"])
        length = int(params.get("max_tokens") or SAMPLE_LENGTH)
        response = pb.SampleResponse()
        for i in range(n):
            tokens = [97 + (seed + i + k + steps) % 26 for k in range(length)]
            response.sequences.add(
                stop_reason=pb.STOP_REASON_LENGTH,
                tokens=np.asarray(tokens, np.int32).tobytes(),
                logprobs=np.asarray([-0.5 - 0.01 * k for k in range(length)], np.float32).tobytes(),
            )
        ids = [self._new_id("seq") for _ in range(n)]
        return self._future(response.SerializeToString(), sample_sequence_ids=ids)

    def _retrieve(self, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        future = self._futures.get(body["request_id"])
        if future is None:
            return 404, {"detail": f"unknown request {body['request_id']}"}, {}
        if future.polls_left > 0:
            future.polls_left -= 1
            return 200, {"type": "try_again", "request_id": body["request_id"], "queue_state": "active"}, {}
        return 200, future.result, {}


_ROUTES = {
    ("POST", "/api/v1/client/config"): FakeTinker._client_config,
    ("POST", "/api/v1/client/dynamic_config"): FakeTinker._dynamic_config,
    ("POST", "/api/v1/create_session"): FakeTinker._create_session,
    ("POST", "/api/v1/session_heartbeat"): FakeTinker._heartbeat,
    ("POST", "/api/v1/telemetry"): FakeTinker._telemetry,
    ("GET", "/api/v1/healthz"): FakeTinker._healthz,
    ("POST", "/api/v1/create_model"): FakeTinker._create_model,
    ("POST", "/api/v1/load_weights"): FakeTinker._load_weights,
    ("POST", "/api/v1/get_info"): FakeTinker._get_info,
    ("POST", "/api/v1/forward_backward"): FakeTinker._forward_backward,
    ("POST", "/api/v1/optim_step"): FakeTinker._optim_step,
    ("POST", "/api/v1/save_weights"): FakeTinker._save_weights,
    ("POST", "/api/v1/save_weights_for_sampler"): FakeTinker._save_for_sampler,
    ("POST", "/api/v1/create_sampling_session"): FakeTinker._create_sampling_session,
    ("POST", "/api/v1/asample"): FakeTinker._asample,
    ("POST", "/api/v1/retrieve_future"): FakeTinker._retrieve,
}


def _decompressed(raw: bytes, headers: dict[str, str]) -> bytes:
    if headers.get("content-encoding") == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().decompressobj().decompress(raw)
    return raw


def _tensor(tensor: pb.Tensor) -> list[Any]:
    return np.frombuffer(tensor.dense, dtype=_NUMPY_DTYPES[tensor.dtype]).tolist()


def decode_forward_backward(raw: bytes) -> dict[str, Any]:
    """A forward_backward protobuf as plain values: ``model_id``, ``seq_id``, ``loss_fn``,
    ``loss_fn_config`` (name -> number or text), ``forward_only`` and ``data``, each datum's
    ``model_input`` (token ids, the text chunks joined) and ``loss_fn_inputs`` (name -> list)."""
    message = pb.ForwardBackwardRequest()
    message.ParseFromString(raw)
    config = {k: getattr(v, v.WhichOneof("value") or "number") for k, v in message.loss_fn_config_v2.items()}
    data = [
        {
            "model_input": [
                t
                for chunk in d.model_input
                for t in np.frombuffer(chunk.encoded_text.tokens, np.int32).tolist()
            ],
            "loss_fn_inputs": {name: _tensor(t) for name, t in d.loss_fn_inputs.items()},
        }
        for d in message.data
    ]
    return {
        "model_id": message.model_id,
        "seq_id": message.seq_id,
        "loss_fn": message.loss_fn,
        "loss_fn_config": config or dict(message.loss_fn_config),
        "forward_only": message.forward_only,
        "data": data,
    }


def _handler_for(fake: FakeTinker) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as the SDK's clients expect

        def do_GET(self) -> None:
            self._serve()

        def do_POST(self) -> None:
            self._serve()

        def _read_body(self) -> bytes:
            if self.headers.get("transfer-encoding", "").lower() == "chunked":
                parts = []
                while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            return self.rfile.read(int(self.headers.get("content-length", 0)))

        def _serve(self) -> None:
            raw = self._read_body()
            headers = {k.lower(): v for k, v in self.headers.items()}
            status, payload, extra = fake.answer(self.command, self.path, headers, raw)
            is_proto = isinstance(payload, bytes)
            data = payload if is_proto else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", PROTOBUF if is_proto else "application/json")
            self.send_header("content-length", str(len(data)))
            for name, value in extra.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
