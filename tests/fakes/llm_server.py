"""A loopback stand-in for three LLM APIs: Anthropic Messages (``POST /v1/messages``), OpenAI Responses
(``POST /v1/responses``) and OpenAI Chat Completions as vLLM, llama.cpp and ollama serve it
(``POST /v1/chat/completions``), each plain or streamed as the real APIs stream (server-sent events), plus
``GET /v1/models[/{id}]`` in the caller's format and vLLM's ``GET /health``. Provider tests run the real
SDKs against it without the internet or real keys.

Tests script it with one reply per request, in order; requests beyond the script get the default reply.
Every request but ``/health`` is recorded (path, headers, JSON body) for assertions on what the SDK sent.
With ``prompt_cache=True`` it counts input tokens from the request and caches prompt prefixes as each
provider does (see prompt_cache.py), reporting cache writes and reads in each API's usage fields.

As a process it stands in for ``vllm serve`` (default replies forever, its URL printed on start)::

    python tests/fakes/llm_server.py --port 8000 [--latency-s 0.2] [--reply-text-file answer.txt]
"""

from __future__ import annotations

import argparse
import copy
import json
import socket
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

try:
    from fakes.loopback import LoopbackServer
    from fakes.prompt_cache import PromptCache, TooManyBreakpoints, Usage
except ImportError:  # run as a script: this directory is on the path, not tests/
    from loopback import LoopbackServer  # type: ignore[no-redef]
    from prompt_cache import PromptCache, TooManyBreakpoints, Usage  # type: ignore[no-redef]


@dataclass
class Reply:
    status: int = 200
    text: str = "hello from the fake"
    input_tokens: int = 120  # all input tokens, the cache's included
    output_tokens: int = 45
    cache_write_tokens: int = 0  # of input_tokens, written to the prompt cache
    cache_read_tokens: int = 0  # of input_tokens, read from it
    retry_after: float | None = None  # sent as the retry-after header
    hang_s: float = 0.0  # wait this long, then close the connection without an answer
    raw_body: str | None = None  # sent instead of a well-formed answer (streaming: as the first event's data)
    stream_error: int | None = None  # streaming: the API's error event for this status, mid-stream;
    # plain: an ordinary error answer with this status
    drop: bool = False  # close the connection mid-stream (plain: before answering)
    truncated: bool = False  # the answer stopped at max_tokens, as each API says so


OK, HANG, MALFORMED, WRONG_SHAPE, DROP = "ok", "hang", "malformed", "wrong_shape", "drop"
SHORTHANDS = {
    OK: Reply(),
    HANG: Reply(hang_s=5.0),  # longer than any test's client timeout
    MALFORMED: Reply(raw_body="{this is not json"),
    WRONG_SHAPE: Reply(raw_body='{"unexpected": "shape"}'),
    DROP: Reply(drop=True),
}


def as_reply(item: Reply | int | str) -> Reply:
    """Shorthands for scripts: one of SHORTHANDS' names, or an HTTP status."""
    if isinstance(item, Reply):
        return item
    if isinstance(item, int):
        return Reply(status=item)
    if item in SHORTHANDS:
        return SHORTHANDS[item]
    raise ValueError(f"unknown scripted reply {item!r}")


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]  # lower-case names
    body: dict[str, Any]
    method: str = "POST"


# (Anthropic error type, OpenAI error type, message) per status, as the real APIs name them.
ERRORS = {
    400: ("invalid_request_error", "invalid_request_error", "max_tokens: 999999 > 64000, the maximum"),
    401: ("authentication_error", "invalid_request_error", "invalid x-api-key"),
    403: ("permission_error", "invalid_request_error", "your key may not use this model"),
    404: ("not_found_error", "invalid_request_error", "model: no-such-model"),
    429: ("rate_limit_error", "requests", "rate limit exceeded: 50 requests per minute"),
    500: ("api_error", "server_error", "internal server error"),
    503: ("api_error", "server_error", "service unavailable"),
    529: ("overloaded_error", "server_error", "Overloaded"),
}
UNLISTED_ERROR = ("api_error", "server_error", "unexpected error")
DEFAULT_MODELS = ("claude-sonnet-4-5", "claude-sonnet-4-6", "claude-opus-4-5", "gpt-5", "Qwen/Qwen3-8B")
THOUGHT = "Let me think this through."
CHUNK_CHARS = 8  # text is streamed in pieces this long

Event = tuple[str | None, dict[str, Any]]  # (SSE event name, data); Chat Completions sends no names


class Api:
    """One wire format: its answers, their streamed form, its errors and its models endpoint."""

    def answer(self, reply: Reply, body: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def events(self, answer: dict[str, Any]) -> list[Event]:
        """The answer as the API streams it; the last event carries the usage."""
        raise NotImplementedError

    def error(self, status: int, message: str | None = None) -> dict[str, Any]:
        _, kind, usual = ERRORS.get(status, UNLISTED_ERROR)
        return {"error": {"message": message or usual, "type": kind, "param": None, "code": None}}

    def error_event(self, status: int, position: int) -> Event:
        """The error event the API sends when generation fails after the stream began."""
        return None, self.error(status)

    def model(self, model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "fake"}

    def models(self, ids: list[str]) -> dict[str, Any]:
        return {"object": "list", "data": [self.model(i) for i in ids]}


class AnthropicApi(Api):
    def answer(self, reply: Reply, body: dict[str, Any]) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if (body.get("thinking") or {}).get("type") == "enabled":
            content.append({"type": "thinking", "thinking": THOUGHT, "signature": "sig-fake"})
        content.append({"type": "text", "text": reply.text})
        return {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": body.get("model", ""),
            "content": content,
            "stop_reason": "max_tokens" if reply.truncated else "end_turn",
            "stop_sequence": None,
            # input_tokens leaves out what the cache wrote and read, as the API counts it
            "usage": {
                "input_tokens": reply.input_tokens - reply.cache_write_tokens - reply.cache_read_tokens,
                "cache_creation_input_tokens": reply.cache_write_tokens,
                "cache_read_input_tokens": reply.cache_read_tokens,
                "output_tokens": reply.output_tokens,
            },
        }

    def events(self, answer: dict[str, Any]) -> list[Event]:
        usage = answer["usage"]
        start = {**answer, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
        events: list[Event] = [("message_start", {"type": "message_start", "message": start})]
        for index, block in enumerate(answer["content"]):
            if block["type"] == "thinking":
                empty = {"type": "thinking", "thinking": "", "signature": ""}
                deltas = [{"type": "thinking_delta", "thinking": p} for p in _pieces(block["thinking"])]
                deltas.append({"type": "signature_delta", "signature": block["signature"]})
            else:
                empty = {"type": "text", "text": ""}
                deltas = [{"type": "text_delta", "text": p} for p in _pieces(block["text"])]
            events.append(
                (
                    "content_block_start",
                    {"type": "content_block_start", "index": index, "content_block": empty},
                )
            )
            events += [
                ("content_block_delta", {"type": "content_block_delta", "index": index, "delta": d})
                for d in deltas
            ]
            events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
        stop = {"stop_reason": answer["stop_reason"], "stop_sequence": None}
        # message_delta's usage is cumulative: the whole answer's output tokens, thinking included.
        events.append(
            (
                "message_delta",
                {"type": "message_delta", "delta": stop, "usage": {"output_tokens": usage["output_tokens"]}},
            )
        )
        events.append(("message_stop", {"type": "message_stop"}))
        return events

    def error(self, status: int, message: str | None = None) -> dict[str, Any]:
        kind, _, usual = ERRORS.get(status, UNLISTED_ERROR)
        return {"type": "error", "error": {"type": kind, "message": message or usual}}

    def error_event(self, status: int, position: int) -> Event:
        return "error", self.error(status)

    def model(self, model_id: str) -> dict[str, Any]:
        return {
            "type": "model",
            "id": model_id,
            "display_name": model_id,
            "created_at": "2025-01-01T00:00:00Z",
        }

    def models(self, ids: list[str]) -> dict[str, Any]:
        first, last = (ids[0], ids[-1]) if ids else (None, None)
        return {"data": [self.model(i) for i in ids], "has_more": False, "first_id": first, "last_id": last}


class ResponsesApi(Api):
    def answer(self, reply: Reply, body: dict[str, Any]) -> dict[str, Any]:
        output: list[dict[str, Any]] = []
        if body.get("reasoning"):
            output.append({"id": "rs_fake", "type": "reasoning", "summary": []})
        text = {"type": "output_text", "text": reply.text, "annotations": [], "logprobs": []}
        output.append(
            {
                "id": "msg_fake",
                "type": "message",
                "role": "assistant",
                "status": "completed",
                "content": [text],
            }
        )
        return {
            "id": "resp_fake",
            "object": "response",
            "created_at": 0,
            "model": body.get("model", ""),
            "status": "incomplete" if reply.truncated else "completed",
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if reply.truncated else None,
            "output": output,
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": [],
            "usage": {
                "input_tokens": reply.input_tokens,
                "input_tokens_details": {
                    "cached_tokens": reply.cache_read_tokens,
                    "cache_write_tokens": reply.cache_write_tokens,
                },
                "output_tokens": reply.output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": reply.input_tokens + reply.output_tokens,
            },
        }

    def events(self, answer: dict[str, Any]) -> list[Event]:
        pending = {**answer, "status": "in_progress", "output": [], "usage": None}
        raw: list[dict[str, Any]] = [
            {"type": "response.created", "response": pending},
            {"type": "response.in_progress", "response": pending},
        ]
        for index, item in enumerate(answer["output"]):
            where = {"output_index": index}
            if item["type"] != "message":
                raw += [
                    {"type": "response.output_item.added", **where, "item": item},
                    {"type": "response.output_item.done", **where, "item": item},
                ]
                continue
            part = {**where, "item_id": item["id"], "content_index": 0}
            (text,) = item["content"]
            raw += [
                {
                    "type": "response.output_item.added",
                    **where,
                    "item": {**item, "status": "in_progress", "content": []},
                },
                {"type": "response.content_part.added", **part, "part": {**text, "text": ""}},
                *(
                    {"type": "response.output_text.delta", **part, "delta": p, "logprobs": []}
                    for p in _pieces(text["text"])
                ),
                {"type": "response.output_text.done", **part, "text": text["text"], "logprobs": []},
                {"type": "response.content_part.done", **part, "part": text},
                {"type": "response.output_item.done", **where, "item": item},
            ]
        raw.append({"type": f"response.{answer['status']}", "response": answer})
        return [(data["type"], {**data, "sequence_number": n}) for n, data in enumerate(raw)]

    def error_event(self, status: int, position: int) -> Event:
        _, kind, message = ERRORS.get(status, UNLISTED_ERROR)
        error = {
            "type": "error",
            "code": kind,
            "message": message,
            "param": None,
            "sequence_number": position,
        }
        return "error", error


class ChatApi(Api):
    """Chat Completions as vLLM serves it; with ``reasoning_effort`` the answer opens with a ``<think>`` block,
    as Qwen3 writes it when the server runs no reasoning parser."""

    def answer(self, reply: Reply, body: dict[str, Any]) -> dict[str, Any]:
        text = f"<think>\n{THOUGHT}\n</think>\n\n{reply.text}" if body.get("reasoning_effort") else reply.text
        usage = {
            "prompt_tokens": reply.input_tokens,
            "completion_tokens": reply.output_tokens,
            "total_tokens": reply.input_tokens + reply.output_tokens,
            "prompt_tokens_details": {"cached_tokens": reply.cache_read_tokens},
        }
        finish = "length" if reply.truncated else "stop"
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 0,
            "model": body.get("model", ""),
            "choices": [{**choice, "logprobs": None}],
            "usage": usage,
        }

    def events(self, answer: dict[str, Any]) -> list[Event]:
        (choice,) = answer["choices"]
        head = {key: answer[key] for key in ("id", "created", "model")} | {"object": "chat.completion.chunk"}

        def chunk(delta: dict[str, Any], finish: str | None = None) -> Event:
            return None, {
                **head,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                "usage": None,
            }

        return [
            chunk({"role": "assistant", "content": ""}),
            *(chunk({"content": p}) for p in _pieces(choice["message"]["content"])),
            chunk({}, choice["finish_reason"]),
            (None, {**head, "choices": [], "usage": answer["usage"]}),  # stream_options.include_usage
        ]


ROUTES: dict[str, Api] = {
    "/v1/messages": AnthropicApi(),
    "/v1/responses": ResponsesApi(),
    "/v1/chat/completions": ChatApi(),
}


class FakeLLMServer(LoopbackServer):
    """Threaded HTTP server, by default on 127.0.0.1 with an OS-chosen port; use as a context manager.

    ``latency_s`` delays every answer (for concurrency benchmarks); ``max_in_flight`` is the most requests
    it ever held at once; ``models`` are the ids its models endpoint knows."""

    def __init__(
        self,
        latency_s: float = 0.0,
        models: tuple[str, ...] = DEFAULT_MODELS,
        default: Reply | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        prompt_cache: bool = False,
    ) -> None:
        self.latency_s = latency_s
        self.cache = PromptCache() if prompt_cache else None
        self.models = list(models)
        self.default = default or Reply()
        self.requests: list[Recorded] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._script: list[Reply] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()  # wakes waiting handlers so close() is quick
        super().__init__(_handler_for(self), host, port, _QuietServer)

    def script(self, *items: Reply | int | str) -> None:
        with self._lock:
            self._script.extend(as_reply(item) for item in items)

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        super().__exit__(*exc)

    def _next(self, recorded: Recorded) -> Reply:
        with self._lock:
            self.requests.append(recorded)
            return self._script.pop(0) if self._script else self.default

    @contextmanager
    def _counted(self) -> Iterator[None]:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= 1


class _QuietServer(ThreadingHTTPServer):
    request_queue_size = 256  # the default backlog (5) drops connections when many threads open them at once

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up on a kept-alive connection (a test ending, a timed-out attempt) is normal.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def _handler_for(server: FakeLLMServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive like the real APIs, and chunked streams
        disable_nagle_algorithm = True  # else headers and body, written apart, wait out delayed ACKs (40 ms)

        def do_GET(self) -> None:
            if self.path == "/health":
                self._send_json(200, {})
            else:
                self._serve({})

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("content-length", 0)))
            self._serve(json.loads(raw or b"{}"))

        def _serve(self, body: dict[str, Any]) -> None:
            headers = {name.lower(): value for name, value in self.headers.items()}
            with server._counted():
                reply = server._next(Recorded(self.path, headers, body, self.command))
                usage = None
                if server.cache is not None and self.command == "POST" and self.path in ROUTES:
                    try:
                        usage = server.cache.usage(self.path, body)
                    except TooManyBreakpoints as exc:
                        self._send_json(400, ROUTES[self.path].error(400, str(exc)))
                        return
                    reply = _with_usage(reply, usage)
                server._closing.wait(server.latency_s)
                if reply.hang_s or (reply.drop and not body.get("stream")):
                    server._closing.wait(reply.hang_s)
                    self.close_connection = True
                    return
                if usage is not None and reply.status == 200:
                    server.cache.commit(usage)  # type: ignore[union-attr]  # the answer begins
                self._answer(reply, body, headers)

        def _answer(self, reply: Reply, body: dict[str, Any], headers: dict[str, str]) -> None:
            api = ROUTES.get(self.path) if self.command == "POST" else None
            # Models endpoints answer in the caller's format; only Anthropic's SDK sends anthropic-version.
            models_api = ROUTES["/v1/messages"] if "anthropic-version" in headers else ROUTES["/v1/responses"]
            streaming = api is not None and bool(body.get("stream"))
            if reply.stream_error and not streaming:
                reply = replace(reply, status=reply.stream_error)
            extra = {} if reply.retry_after is None else {"retry-after": f"{reply.retry_after:g}"}
            if api is None and not self.path.startswith("/v1/models"):
                self._send_json(404, {"error": {"message": f"no route {self.command} {self.path}"}})
            elif reply.status != 200:
                self._send_json(reply.status, (api or models_api).error(reply.status), extra)
            elif reply.raw_body is not None and not streaming:
                self._send(200, "application/json", reply.raw_body.encode())
            elif api is None:
                self._models(models_api)
            elif streaming:
                self._stream(api, reply, api.answer(reply, body))
            else:
                self._send_json(200, api.answer(reply, body))

        def _models(self, api: Api) -> None:
            if self.path.rstrip("/") == "/v1/models":
                self._send_json(200, api.models(server.models))
                return
            model_id = urllib.parse.unquote(self.path.removeprefix("/v1/models/"))
            if model_id in server.models:
                self._send_json(200, api.model(model_id))
            else:
                self._send_json(404, api.error(404, f"model: {model_id}"))

        def _stream(self, api: Api, reply: Reply, answer: dict[str, Any]) -> None:
            events = api.events(copy.deepcopy(answer))
            if reply.raw_body is not None:
                events = [(events[0][0], reply.raw_body)]  # type: ignore[list-item]
            cut = len(events) // 2  # where a dropped connection or an error event interrupts the stream
            if reply.stream_error:
                events = [*events[:cut], api.error_event(reply.stream_error, cut)]
            self.send_response(200)
            self.send_header("content-type", "text/event-stream")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            for index, (name, data) in enumerate(events):
                if reply.drop and index == cut:
                    # No terminating chunk: the client sees the body end early, as when a proxy drops.
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                text = data if isinstance(data, str) else json.dumps(data)
                self._chunk(("" if name is None else f"event: {name}\n") + f"data: {text}\n\n")
            if isinstance(api, ChatApi):
                self._chunk("data: [DONE]\n\n")
            self.wfile.write(b"0\r\n\r\n")

        def _chunk(self, text: str) -> None:
            data = text.encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _send_json(
            self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None
        ) -> None:
            self._send(status, "application/json", json.dumps(payload).encode(), headers)

        def _send(self, status: int, kind: str, data: bytes, headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("content-type", kind)
            self.send_header("content-length", str(len(data)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
            pass

    return Handler


def _with_usage(reply: Reply, usage: Usage) -> Reply:
    return replace(
        reply,
        input_tokens=usage.input,
        cache_write_tokens=usage.cache_write,
        cache_read_tokens=usage.cache_read,
    )


def _pieces(text: str) -> list[str]:
    return [text[i : i + CHUNK_CHARS] for i in range(0, len(text), CHUNK_CHARS)] or [""]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Serve the fake LLM APIs until killed (a stand-in for vllm serve)."
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for other nodes)")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--latency-s", type=float, default=0.0, help="delay before every answer")
    parser.add_argument("--reply-text-file", help="file whose text every answer carries")
    parser.add_argument(
        "--prompt-cache",
        action="store_true",
        help="count input tokens and cache prompt prefixes as the APIs do",
    )
    parser.add_argument(
        "--models", nargs="+", default=list(DEFAULT_MODELS), help="ids the models endpoint knows"
    )
    args = parser.parse_args(argv)
    default = Reply(text=Path(args.reply_text_file).read_text()) if args.reply_text_file else Reply()
    server = FakeLLMServer(
        args.latency_s, tuple(args.models), default, args.host, args.port, prompt_cache=args.prompt_cache
    )
    print(f"fake LLM server listening on {server.url}", flush=True)
    with server:
        threading.Event().wait()  # until the process is killed


if __name__ == "__main__":
    main()
