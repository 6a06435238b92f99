"""A loopback stand-in for the Anthropic Messages API (``POST /v1/messages``) and the OpenAI Responses API
(``POST /v1/responses``), so that provider tests run the real SDKs without the internet or real keys.

Tests script it with one reply per request, in order; requests beyond the script get ``Reply()``.
Every request is recorded (path, headers, JSON body) for assertions on what the SDK sent."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    status: int = 200
    text: str = "hello from the fake"
    input_tokens: int = 120
    output_tokens: int = 45
    retry_after: float | None = None  # sent as the retry-after header
    hang_s: float = 0.0  # wait this long, then close the connection without an answer


HANG = "hang"
OK = "ok"


def as_reply(item: Reply | int | str) -> Reply:
    """Shorthands for scripts: ``"ok"``, ``"hang"`` (longer than any test's client timeout), or a status."""
    if isinstance(item, Reply):
        return item
    if item == OK:
        return Reply()
    if item == HANG:
        return Reply(hang_s=5.0)
    if isinstance(item, int):
        return Reply(status=item)
    raise ValueError(f"unknown scripted reply {item!r}")


@dataclass
class Recorded:
    path: str
    headers: dict[str, str]  # lower-case names
    body: dict[str, Any]


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


class FakeLLMServer:
    """Threaded HTTP server on 127.0.0.1 with an OS-chosen port; use as a context manager."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self._script: list[Reply] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()  # wakes hanging handlers so close() is quick
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._httpd.daemon_threads = True
        # A short poll interval keeps shutdown (and so each test) quick.
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def script(self, *items: Reply | int | str) -> None:
        with self._lock:
            self._script.extend(as_reply(item) for item in items)

    def __enter__(self) -> FakeLLMServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()

    def _next(self, recorded: Recorded) -> Reply:
        with self._lock:
            self.requests.append(recorded)
            return self._script.pop(0) if self._script else Reply()


def _handler_for(server: FakeLLMServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("content-length", 0)))
            body = json.loads(raw or b"{}")
            headers = {name.lower(): value for name, value in self.headers.items()}
            reply = server._next(Recorded(self.path, headers, body))
            if reply.hang_s:
                server._closing.wait(reply.hang_s)
                self.close_connection = True
                return
            if self.path == "/v1/messages":
                payload = _anthropic_payload(reply, body)
            elif self.path == "/v1/responses":
                payload = _openai_payload(reply, body)
            else:
                reply, payload = Reply(status=404), {"error": {"message": f"no route {self.path}"}}
            data = json.dumps(payload).encode()
            self.send_response(reply.status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            if reply.retry_after is not None:
                self.send_header("retry-after", f"{reply.retry_after:g}")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
            pass

    return Handler


def _anthropic_payload(reply: Reply, body: dict[str, Any]) -> dict[str, Any]:
    if reply.status != 200:
        kind, _, message = ERRORS.get(reply.status, UNLISTED_ERROR)
        return {"type": "error", "error": {"type": kind, "message": message}}
    content: list[dict[str, Any]] = []
    if (body.get("thinking") or {}).get("type") == "enabled":
        content.append({"type": "thinking", "thinking": "Let me think this through.", "signature": "sig"})
    content.append({"type": "text", "text": reply.text})
    return {
        "id": "msg_fake",
        "type": "message",
        "role": "assistant",
        "model": body.get("model", ""),
        "content": content,
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": reply.input_tokens, "output_tokens": reply.output_tokens},
    }


def _openai_payload(reply: Reply, body: dict[str, Any]) -> dict[str, Any]:
    if reply.status != 200:
        _, kind, message = ERRORS.get(reply.status, UNLISTED_ERROR)
        return {"error": {"message": message, "type": kind, "param": None, "code": None}}
    output: list[dict[str, Any]] = []
    if body.get("reasoning"):
        output.append({"id": "rs_fake", "type": "reasoning", "summary": []})
    output.append(
        {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": reply.text, "annotations": []}],
        }
    )
    return {
        "id": "resp_fake",
        "object": "response",
        "created_at": 0,
        "model": body.get("model", ""),
        "status": "completed",
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": reply.input_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": reply.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": reply.input_tokens + reply.output_tokens,
        },
    }
