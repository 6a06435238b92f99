"""The providers' prompt caches, as the loopback server emulates them.

Tokens are counted as 4 characters each (real tokenizers differ; the fake only needs to be consistent).

Anthropic caches explicitly: each block marked ``cache_control`` (at most 4) ends a prefix that is cached
when it is at least the model's minimum cacheable length; the key is the exact bytes of every block up to
it, in the order tools, system, messages. A change of thinking settings invalidates breakpoints in the
messages, not those in tools or system. A request reads the longest cached prefix and writes the rest up to
its last breakpoint.

OpenAI caches automatically: a prompt of at least 1024 tokens reads the longest earlier prompt's prefix it
shares, in 128-token steps from 1024, among calls with the same ``prompt_cache_key`` (which routes calls to
the same machines). Writes are not reported (models before gpt-5.6 bill none).

For both, an entry exists only once the answer that wrote it has begun (``commit``), and lives 5 minutes
from its last use."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

CHARS_PER_TOKEN = 4
TTL_S = 300.0
MAX_BREAKPOINTS = 4
# Minimum cacheable prompt length per Claude model, from Anthropic's prompt caching page (2026-12-01).
ANTHROPIC_MIN_TOKENS = {
    "claude-opus-4-5": 4096,
    "claude-opus-4-6": 4096,
    "claude-haiku-4-5": 4096,
    "claude-sonnet-4-6": 2048,
    "claude-sonnet-4-5": 1024,
}
ANTHROPIC_DEFAULT_MIN_TOKENS = 1024
OPENAI_MIN_TOKENS = 1024
OPENAI_STEP_TOKENS = 128


class TooManyBreakpoints(ValueError):
    pass


def tokens(text: str) -> int:
    return -(-len(text) // CHARS_PER_TOKEN)


@dataclass
class Usage:
    """What one request's input cost in the cache's terms; ``input`` counts all input tokens."""

    input: int
    cache_write: int = 0
    cache_read: int = 0
    pending: list[str] = field(default_factory=list)  # keys this request writes, once its answer begins


class PromptCache:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._expiry: dict[str, float] = {}
        self._lock = threading.Lock()

    def usage(self, path: str, body: dict[str, Any]) -> Usage:
        if path == "/v1/messages":
            return self._anthropic(body)
        return self._openai(body, _openai_text(path, body))

    def commit(self, usage: Usage) -> None:
        """The answer begins: what the request wrote becomes readable."""
        with self._lock:
            for key in usage.pending:
                self._expiry[key] = self._clock() + TTL_S

    def _hit(self, key: str) -> bool:
        """Whether ``key`` is cached; a hit refreshes its lifetime."""
        with self._lock:
            now = self._clock()
            if self._expiry.get(key, -1.0) <= now:
                return False
            self._expiry[key] = now + TTL_S
            return True

    def _anthropic(self, body: dict[str, Any]) -> Usage:
        minimum = ANTHROPIC_MIN_TOKENS.get(body.get("model", ""), ANTHROPIC_DEFAULT_MIN_TOKENS)
        thinking = json.dumps(body.get("thinking"), sort_keys=True)
        digest = hashlib.sha256(body.get("model", "").encode())
        total = 0
        breakpoints: list[tuple[str, int]] = []  # (key, tokens up to and including the block)
        for section, block in _anthropic_blocks(body):
            marked = isinstance(block, dict) and "cache_control" in block
            plain = (
                {k: v for k, v in block.items() if k != "cache_control"} if isinstance(block, dict) else block
            )
            digest.update(json.dumps(plain, sort_keys=True).encode())
            total += tokens(_block_text(plain))
            if marked:
                key = digest.copy()
                if section == "messages":  # thinking settings are part of a message breakpoint's key
                    key.update(thinking.encode())
                breakpoints.append((key.hexdigest(), total))
        if len(breakpoints) > MAX_BREAKPOINTS:
            raise TooManyBreakpoints(
                f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided"
            )
        cacheable = [(key, n) for key, n in breakpoints if n >= minimum]
        read = next((n for key, n in reversed(cacheable) if self._hit(key)), 0)
        pending = [key for key, n in cacheable if n > read]
        written = max((n for _, n in cacheable), default=0) - read if pending else 0
        return Usage(total, written, read, pending)

    def _openai(self, body: dict[str, Any], text: str) -> Usage:
        total = tokens(text)
        route = f"{body.get('model', '')}|{body.get('prompt_cache_key') or ''}"
        keys = list(_prefix_keys(route, text))
        read = next((n for n, key in reversed(keys) if self._hit(key)), 0)
        return Usage(total, 0, read, [key for n, key in keys if n > read])


def _prefix_keys(route: str, text: str) -> Iterator[tuple[int, str]]:
    """(tokens, key) of each cacheable prefix of ``text``: 1024 tokens, then every 128 more."""
    digest = hashlib.sha256(route.encode())
    done = 0
    n = OPENAI_MIN_TOKENS
    while n * CHARS_PER_TOKEN <= len(text):
        digest.update(text[done : n * CHARS_PER_TOKEN].encode())
        done = n * CHARS_PER_TOKEN
        yield n, digest.hexdigest()
        n += OPENAI_STEP_TOKENS


def _anthropic_blocks(body: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """Every block of the prompt in the cache's order: tools, system, then each message's content."""
    for tool in body.get("tools") or []:
        yield "tools", tool
    system = body.get("system") or []
    yield from (
        ("system", b) for b in ([{"type": "text", "text": system}] if isinstance(system, str) else system)
    )
    for message in body.get("messages") or []:
        content = message.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content or []
        yield from (("messages", {"role": message.get("role"), **b}) for b in blocks)


def _block_text(block: Any) -> str:
    return (
        str(block.get("text", ""))
        if isinstance(block, dict) and block.get("type") == "text"
        else json.dumps(block)
    )


def _openai_text(path: str, body: dict[str, Any]) -> str:
    """The prompt as the model reads it, in order: Responses' instructions and input, or the chat messages."""
    if path == "/v1/responses":
        parts = [
            body.get("instructions") or "",
            json.dumps(body.get("input")) if not isinstance(body.get("input"), str) else body["input"],
        ]
        return "\n".join(p for p in parts if p)
    return "".join(f"<|{m.get('role')}|>{m.get('content')}" for m in body.get("messages") or [])
