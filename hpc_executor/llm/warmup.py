"""One call first while a prompt cache is cold, so that the calls sent with it read the shared prefix.

A provider's cache entry exists only once the answer that wrote it has begun: the implementer's samples
(or the ideator's exploit and explore calls), sent together to a cold cache, would each write the whole
codebase (1.25x the input price at Anthropic) instead of reading it (0.1x). So per cache key, when no
call with that key ended in the last ``ttl_s`` (the providers keep an entry 5 minutes after its last
use), the first call goes alone and the others wait until it has returned; while the key is warm,
nobody waits."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

CACHE_TTL_S = 300.0


@dataclass
class _KeyState:
    last_end: float = -math.inf  # when the last call with this key returned (monotonic)
    first: threading.Event | None = None  # set when the call that found the key cold returns


class CacheWarmup:
    def __init__(self, ttl_s: float = CACHE_TTL_S) -> None:
        self.ttl_s = ttl_s
        self._keys: dict[str, _KeyState] = {}
        self._lock = threading.Lock()

    @contextmanager
    def call(self, key: str) -> Iterator[None]:
        """Around one call with cache key ``key`` (empty: no shared prefix, never held back)."""
        if not key:
            yield
            return
        with self._lock:
            state = self._keys.setdefault(key, _KeyState())
            cold = time.monotonic() - state.last_end >= self.ttl_s
            lead = cold and state.first is None
            if lead:
                state.first = threading.Event()
            waits_for = state.first if cold and not lead else None
        if waits_for is not None:
            waits_for.wait()
        try:
            yield
        finally:
            with self._lock:
                state.last_end = time.monotonic()
                if lead and state.first is not None:
                    state.first.set()
                    state.first = None
