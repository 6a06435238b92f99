"""What the real providers share: one attempt per call of ``_attempt``, retries with backoff around it,
and the one-line error a run records when no attempt succeeded (DESIGN invariant 7)."""

from __future__ import annotations

import abc
import email.utils
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from hpc_executor.llm.base import LLM, LLMRequest, LLMResponse, LLMSpec
from hpc_executor.llm.credentials import api_key

log = logging.getLogger("hpc_executor.llm")

# Rate limits (429), Anthropic's "overloaded" (529), transient server errors and server-side timeouts.
# Everything else is the request's fault: retrying it would fail the same way.
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504, 529})


@dataclass(frozen=True)
class Completion:
    """What one successful attempt produced."""

    text: str
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class SdkErrors:
    """The exception classes of one provider SDK (anthropic and openai have the same shape)."""

    api_error: type[Exception]  # base of everything the SDK raises for a request
    status_error: type[Exception]  # an HTTP error status: has .status_code, .response, .body
    connection_error: type[Exception]  # no usable response (refused, reset, timed out)
    timeout_error: type[Exception]  # the subclass of connection_error for a timeout


@dataclass(frozen=True)
class Failure:
    message: str  # one line
    retryable: bool
    retry_after_s: float | None = None


class RetryingLLM(LLM):
    """A provider behind an SDK. The client is built once (one connection pool per run) with the SDK's
    own retries off: ``complete`` retries here, so that every provider follows the same policy."""

    sdk_errors: SdkErrors

    def __init__(self, spec: LLMSpec, sleep: Callable[[float], None] = time.sleep) -> None:
        super().__init__(spec)
        key, self.key_env = api_key(spec)
        self._client = self._make_client(key)
        self._sleep = sleep  # injectable so tests own the clock

    @abc.abstractmethod
    def _make_client(self, key: str) -> Any:
        """The SDK client: ``api_key=key``, the spec's base_url and timeout, ``max_retries=0``."""

    @abc.abstractmethod
    def _attempt(self, request: LLMRequest) -> Completion:
        """One request; SDK errors propagate to ``complete``."""

    def complete(self, request: LLMRequest) -> LLMResponse:
        start = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            try:
                done = self._attempt(request)
            except self.sdk_errors.api_error as exc:
                failure = self._classify(exc)
            else:
                return LLMResponse(
                    text=done.text,
                    model=self.spec.model,
                    input_tokens=done.input_tokens,
                    output_tokens=done.output_tokens,
                    cost_usd=self._cost(done),
                    latency_s=time.monotonic() - start,
                    attempts=attempt,
                )
            if not failure.retryable or attempt > self.spec.max_retries:
                break
            delay = self.backoff(attempt - 1, failure.retry_after_s)
            log.warning(
                "%s: %s; retry %d of %d in %.1f s",
                self.label,
                failure.message,
                attempt,
                self.spec.max_retries,
                delay,
            )
            self._sleep(delay)
        error = failure.message
        if failure.retryable:
            error += f" (gave up after {attempt} attempts)"
        log.error("%s: %s", self.label, error)
        return LLMResponse(
            text="",
            model=self.spec.model,
            latency_s=time.monotonic() - start,
            attempts=attempt,
            error=f"{self.label}: {error}",
        )

    def backoff(self, retry: int, retry_after_s: float | None) -> float:
        """Seconds before retry number ``retry`` (0-based): the server's retry-after when it sent one,
        else ``backoff_s * 2**retry``; never more than ``backoff_max_s``."""
        wait = self.spec.backoff_s * 2**retry if retry_after_s is None else retry_after_s
        return min(wait, self.spec.backoff_max_s)

    def _cost(self, done: Completion) -> float:
        spec = self.spec
        return (
            done.input_tokens * spec.price_in_per_mtok + done.output_tokens * spec.price_out_per_mtok
        ) / 1e6

    def _classify(self, exc: Exception) -> Failure:
        errors = self.sdk_errors
        if isinstance(exc, errors.timeout_error):
            return Failure(f"timed out after {self.spec.timeout_s:g} s", retryable=True)
        if isinstance(exc, errors.connection_error):
            return Failure(f"connection failed ({_one_line(exc)}); check base_url and the network", True)
        if isinstance(exc, errors.status_error):
            code: int = exc.status_code
            detail = _api_message(exc)
            if code in RETRYABLE_STATUS:
                return Failure(f"HTTP {code} {detail}", True, retry_after(exc.response.headers))
            return Failure(f"HTTP {code} {detail}; {self._advice(code)}", retryable=False)
        # The SDK could not make sense of a response: a broken gateway, not something a retry fixes.
        return Failure(f"{type(exc).__name__}: {_one_line(exc)}", retryable=False)

    def _advice(self, code: int) -> str:
        model = self.spec.model
        advice = {
            400: "not retried: check max_tokens, thinking_budget and reasoning_effort in the model config",
            401: f"not retried: the API key was refused, check {self.key_env}",
            403: f"not retried: check that the key in {self.key_env} may use model {model!r}",
            404: f"not retried: check the model name {model!r} and base_url",
        }
        return advice.get(code, "not retried: the provider rejected the request")


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asked us to wait: ``retry-after-ms``, or ``retry-after`` in seconds or as a date."""
    try:
        return max(0.0, float(headers["retry-after-ms"]) / 1000)
    except (KeyError, ValueError):
        pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _api_message(exc: Exception) -> str:
    """``type: message`` from the provider's JSON error body (both SDKs keep it in ``.body``)."""
    body = getattr(exc, "body", None)
    error = body.get("error", body) if isinstance(body, dict) else None
    if not isinstance(error, dict) or not error.get("message"):
        return f"({_one_line(exc)})"
    kind = error.get("type")
    return f"({kind}: {_one_line(error['message'])})" if kind else f"({_one_line(error['message'])})"


def _one_line(value: object, limit: int = 300) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
