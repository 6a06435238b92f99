"""A loopback stand-in for ``vllm serve`` with runtime LoRA, for the vLLM policy's tests: ``GET /health``,
``GET /v1/models`` (the base and the loaded adapters), ``POST /tokenize``, ``POST /v1/completions`` with
``n``, ``logprobs`` and ``return_tokens_as_token_ids``, and ``POST /v1/load_lora_adapter`` /
``/v1/unload_lora_adapter`` with vLLM's error answers (404 for an adapter directory that is not there,
400 for a name already loaded).

Its "model" is arithmetic, so tests can check what they get: a prompt's token ids are its characters'
code points; completion ``i`` of a request with seed ``s`` is ``length`` tokens ``97 + (s + i + k +
shift) % 26`` (``k`` the position) with log-prob ``-0.5 - 0.01 * k``, where ``shift`` is the
``shift`` in the adapter directory's ``fake_weights.json`` (0 for the base). ``fake_update`` below
is a stand-in for the peft update that writes such a directory, one shift higher per step.

Tests script failures through ``POST /fake/script`` (``{"empty_completions": true}``: the next
completion answer has no choices; ``{"load_error": [status, message]}``: the next adapter load fails).
``--no-lora-architecture`` makes it exit at startup as vLLM does for a model without LoRA support.

    python tests/fakes/vllm_server.py {model} --port {port} [vLLM's flags, ignored]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from hpc_executor.rl.policy import PolicyVersion, TrainingExample

try:
    from fakes.loopback import LoopbackServer
except ImportError:  # run as the server's command, from this folder
    from loopback import LoopbackServer  # type: ignore[no-redef]

COMPLETION_LENGTH = 5
WEIGHTS_FILE = "fake_weights.json"
NO_LORA_MESSAGE = (
    "ValueError: Model GPT2LMHeadModel does not support LoRA, but LoRA is enabled. Support for this model "
    "may be added in the future. If this is important to you, please open an issue on github."
)


class FakeVllm(LoopbackServer):
    """The fake's state: the base model name, loaded adapters (name -> shift) and scripted failures."""

    def __init__(self, model: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.model = model
        self.adapters: dict[str, int] = {}
        self.script: dict[str, Any] = {}
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()
        super().__init__(_handler_for(self), host, port)

    def answer(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        with self.lock:
            if path != "/health":
                self.requests.append((path, body))
            if method == "GET" and path == "/health":
                return 200, {}
            if method == "GET" and path == "/v1/models":
                ids = [self.model, *self.adapters]
                return 200, {"object": "list", "data": [{"id": i, "object": "model"} for i in ids]}
            if method == "POST" and path == "/fake/script":
                self.script.update(body)
                return 200, {}
            if method == "POST" and path == "/tokenize":
                tokens = [ord(c) for c in body["prompt"]]
                return 200, {"count": len(tokens), "max_model_len": 4096, "tokens": tokens}
            if method == "POST" and path == "/v1/load_lora_adapter":
                return self._load(body)
            if method == "POST" and path == "/v1/unload_lora_adapter":
                if self.adapters.pop(body.get("lora_name", ""), None) is None:
                    return _error(404, f"The lora adapter '{body.get('lora_name')}' cannot be found.")
                return 200, f"Success: LoRA adapter '{body['lora_name']}' removed successfully."
            if method == "POST" and path == "/v1/completions":
                return self._complete(body)
            return _error(404, f"no route {method} {path}")

    def _load(self, body: dict[str, Any]) -> tuple[int, Any]:
        if "load_error" in self.script:
            status, message = self.script.pop("load_error")
            return _error(status, message)
        name, path = body.get("lora_name", ""), Path(body.get("lora_path", ""))
        if name in self.adapters:
            return _error(400, f"The lora adapter '{name}' has already been loaded.")
        if not (path / "adapter_config.json").is_file():
            return _error(404, f"Loading lora {name} failed: No adapter found for {path}")
        self.adapters[name] = int(json.loads((path / WEIGHTS_FILE).read_text())["shift"])
        return 200, f"Success: LoRA adapter '{name}' added successfully."

    def _complete(self, body: dict[str, Any]) -> tuple[int, Any]:
        model = body.get("model")
        if model != self.model and model not in self.adapters:
            return _error(404, f"The model `{model}` does not exist.")
        if self.script.pop("empty_completions", False):
            return 200, {"id": "cmpl-fake", "object": "text_completion", "model": model, "choices": []}
        shift, seed = self.adapters.get(str(model), 0), int(body.get("seed") or 0)
        choices = []
        for index in range(int(body.get("n", 1))):
            ids = [97 + (seed + index + k + shift) % 26 for k in range(COMPLETION_LENGTH)]
            logprobs = None
            if body.get("logprobs") is not None:
                named = body.get("return_tokens_as_token_ids")
                logprobs = {"tokens": [f"token_id:{i}" if named else chr(i) for i in ids],
                            "token_logprobs": [-0.5 - 0.01 * k for k in range(len(ids))],
                            "top_logprobs": [None] * len(ids), "text_offset": list(range(len(ids)))}  # fmt: skip
            choices.append({"index": index, "text": "".join(map(chr, ids)), "logprobs": logprobs,
                            "finish_reason": "length"})  # fmt: skip
        return 200, {"id": "cmpl-fake", "object": "text_completion", "model": model, "choices": choices}


def _error(status: int, message: str) -> tuple[int, Any]:
    return status, {"error": {"message": message, "type": "BadRequestError", "param": None, "code": status}}


def _handler_for(fake: FakeVllm) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._serve({})

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("content-length", 0)))
            self._serve(json.loads(raw or b"{}"))

        def _serve(self, body: dict[str, Any]) -> None:
            status, payload = fake.answer(self.command, self.path, body)
            data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
            self.send_response(status)
            self.send_header("content-type", "text/plain" if isinstance(payload, str) else "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def fake_update(fields: dict[str, Any]) -> PolicyVersion:
    """Stands in for the peft update in a job: writes ``<out_dir>/step_NNNNN`` with an adapter config and
    the fake's weights (the previous shift plus one, plus the examples' mean advantage), and appends to
    ``<out_dir>/runs.log`` so tests count the runs. A file ``<out_dir>/DIE`` makes the job die instead."""
    out_dir = Path(fields["out_dir"])
    with open(out_dir / "runs.log", "a") as runs:
        runs.write(f"{fields['step']}\n")
    if (out_dir / "DIE").exists():
        os._exit(3)  # as a job killed by the OOM killer would: no traceback, no version
    examples = [
        TrainingExample(**json.loads(line)) for line in Path(fields["examples_path"]).read_text().splitlines()
    ]
    previous: PolicyVersion = fields["previous"]
    shift = (
        0 if previous.path is None else json.loads((Path(previous.path) / WEIGHTS_FILE).read_text())["shift"]
    )
    target = out_dir / f"step_{fields['step']:05d}"
    target.mkdir(parents=True, exist_ok=True)
    (target / "adapter_config.json").write_text(json.dumps({"r": fields["train"].lora_rank}))
    mean_advantage = sum(e.advantage for e in examples) / len(examples)
    (target / WEIGHTS_FILE).write_text(json.dumps({"shift": shift + 1 + round(mean_advantage)}))
    (target / "examples.json").write_text(json.dumps([asdict(e) for e in examples]))
    return PolicyVersion(fields["step"], str(target))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve a fake vLLM with runtime LoRA until killed.")
    parser.add_argument("model")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--no-lora-architecture", action="store_true", help="fail at startup as vLLM does")
    args, vllm_flags = parser.parse_known_args(argv)
    if args.no_lora_architecture and "--enable-lora" in vllm_flags:
        sys.exit(NO_LORA_MESSAGE)
    if os.environ.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING") != "True":
        sys.exit("VLLM_ALLOW_RUNTIME_LORA_UPDATING is not True: the load_lora_adapter route is off")
    server = FakeVllm(args.model, args.host, args.port)
    print(f"fake vLLM serving {args.model} on {server.url} with {' '.join(vllm_flags)}", flush=True)
    with server:
        threading.Event().wait()


if __name__ == "__main__":
    main()
