"""How many HTTP attempts may be in flight at one provider endpoint, across every LLM object in the process.

The ideator and the implementer often share a provider and a key, whose rate limit is per key: one cap per
endpoint (provider + base_url) keeps their sum under it. A cap is held only during an attempt, never during
a back-off sleep, so a waiting retry does not block the calls that could go now."""

from __future__ import annotations

import threading
import weakref

from hpc_executor.errors import ConfigError
from hpc_executor.llm.base import LLMSpec


class EndpointLimiter:
    """A counting semaphore whose cap can be lowered while in use (a second, stricter LLM joining)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.in_flight = 0
        self._cond = threading.Condition()

    def lower_to(self, cap: int) -> None:
        with self._cond:
            self.cap = min(self.cap, cap)

    def __enter__(self) -> EndpointLimiter:
        with self._cond:
            self._cond.wait_for(lambda: self.in_flight < self.cap)
            self.in_flight += 1
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self.in_flight -= 1
            self._cond.notify()


# Weak values: a limiter lives as long as some LLM object holds it, so a later run (or test) that reuses
# the endpoint starts from its own cap instead of an old, smaller one.
_LIMITERS: weakref.WeakValueDictionary[tuple[str, str], EndpointLimiter] = weakref.WeakValueDictionary()
_REGISTRY_LOCK = threading.Lock()


def endpoint_key(spec: LLMSpec) -> tuple[str, str]:
    """(provider, base_url): the SDK's default endpoint when base_url is unset."""
    return spec.provider, (spec.base_url or "").rstrip("/")


def limiter_for(spec: LLMSpec) -> EndpointLimiter:
    """The limiter shared by every live LLM of this endpoint; the smallest max_concurrency among them wins."""
    if spec.max_concurrency < 1:
        raise ConfigError(f"max_concurrency is {spec.max_concurrency}; it must be at least 1")
    key = endpoint_key(spec)
    with _REGISTRY_LOCK:
        limiter = _LIMITERS.get(key)
        if limiter is None:
            limiter = _LIMITERS[key] = EndpointLimiter(spec.max_concurrency)
        else:
            limiter.lower_to(spec.max_concurrency)
        return limiter
