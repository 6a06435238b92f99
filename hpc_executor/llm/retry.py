"""What the real providers share: one attempt per call of ``_attempt``, retries with jittered backoff around
it under the endpoint's concurrency cap, the start-up model check, and the one-line error a run records
when no attempt succeeded (DESIGN invariant 7)."""

from __future__ import annotations

import abc
import email.utils
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

import httpx2

from hpc_executor.errors import PreflightError
from hpc_executor.llm.base import LLM, LLMRequest, LLMResponse, LLMSpec
from hpc_executor.llm.credentials import api_key
from hpc_executor.llm.limits import limiter_for
from hpc_executor.llm.pricing import TokenCounts, cost_usd, uncached_cost_usd
from hpc_executor.llm.warmup import CacheWarmup

log = logging.getLogger("hpc_executor.llm")

# Rate limits (429), Anthropic's "overloaded" (529), transient server errors and server-side timeouts.
# Everything else is the request's fault: retrying it would fail the same way.
RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504, 529})
# The same causes as the error types (Anthropic) and codes (OpenAI) of an error event inside a stream,
# whose HTTP status was 200 before anything went wrong.
RETRYABLE_KINDS = frozenset(
    {
        "api_error",
        "overloaded_error",
        "rate_limit_error",
        "timeout_error",
        "server_error",
        "rate_limit_exceeded",
    }
)
# What reading a 200 answer raises when it is not what the API promises (invalid JSON, missing fields, stream
# events out of order): a broken gateway or a base_url that serves another API; a retry would not fix it.
MALFORMED = (ValueError, TypeError, AttributeError, KeyError, IndexError, RuntimeError, AssertionError)

T = TypeVar("T")


@dataclass(frozen=True)
class Completion:
    """What one successful attempt produced."""

    text: str
    input_tokens: int  # all of them, the cache's included
    output_tokens: int  # thinking / reasoning included: they are billed as output
    truncated: bool = False
    cache_write_tokens: int = 0
    cache_read_tokens: int = 0

    @property
    def tokens(self) -> TokenCounts:
        return TokenCounts(
            self.input_tokens, self.output_tokens, self.cache_write_tokens, self.cache_read_tokens
        )


@dataclass(frozen=True)
class SdkErrors:
    """The exception classes of one provider SDK (anthropic and openai have the same shape)."""

    api_error: type[Exception]  # base of everything the SDK raises for a request
    # an HTTP error status: an Exception with .status_code, .response, .body (Any: the SDKs share no base)
    status_error: type[Any]
    connection_error: type[Exception]  # no usable response (refused, reset, timed out)
    timeout_error: type[Exception]  # the subclass of connection_error for a timeout


class StreamFailed(Exception):
    """A stream went wrong after its 200: the server sent an error event of type ``kind``, or it ended
    without its final event (``kind`` None)."""

    def __init__(self, kind: str | None, message: str) -> None:
        super().__init__(f"({kind}: {message})" if kind else message)
        self.kind = kind


@dataclass(frozen=True)
class Failure:
    message: str  # one line: what went wrong
    retryable: bool
    retry_after_s: float | None = None
    status: int | None = None  # the HTTP error status, when there was one
    advice: str = ""  # what to do about it

    def describe(self, attempts: int, advice: str = "") -> str:
        """The message, how many attempts were made when that matters, and the advice."""
        text = self.message + (f" (gave up after {_count(attempts, 'attempt')})" if self.retryable else "")
        advice = advice or self.advice
        return f"{text}; {advice}" if advice else text


@dataclass(frozen=True)
class Outcome(Generic[T]):
    value: T | None  # what the call returned; None when every attempt failed
    attempts: int
    failure: Failure | None = None  # why the last attempt failed, when it did


class RetryingLLM(LLM):
    """A provider behind an SDK. The client is built once (one connection pool per run) with the SDK's
    own retries off: ``complete`` retries here, so that every provider follows the same policy."""

    sdk_errors: SdkErrors
    api_name: str  # what base_url must serve, for error messages

    def __init__(
        self, spec: LLMSpec, sleep: Callable[[float], None] = time.sleep, rng: random.Random | None = None
    ) -> None:
        super().__init__(spec)
        key, self.key_env = api_key(spec)
        self._client = self._make_client(key)
        self._limiter = limiter_for(spec)
        self._warmup = CacheWarmup()
        self._sleep = sleep  # injectable so tests own the clock
        self._rng = rng or random.Random()  # injectable so tests can fix the jitter
        errors = self.sdk_errors
        # Mid-stream transport errors come through untranslated from Anthropic's SDK (httpx2's own).
        self._retried_errors = (errors.api_error, StreamFailed, httpx2.TransportError, *MALFORMED)

    @abc.abstractmethod
    def _make_client(self, key: str) -> Any:
        """The SDK client: ``api_key=key``, the spec's base_url and timeout, ``max_retries=0``."""

    @abc.abstractmethod
    def _attempt(self, request: LLMRequest) -> Completion:
        """One request; SDK errors propagate to ``complete``."""

    @abc.abstractmethod
    def _find_model(self) -> None:
        """One look-up of the spec's model; SDK errors propagate, an unknown model raises PreflightError."""

    def complete(self, request: LLMRequest) -> LLMResponse:
        with self._warmup.call(request.cache_key if self.spec.prompt_cache else ""):
            start = time.monotonic()
            outcome = self._call(lambda: self._attempt(request))
            latency = time.monotonic() - start
        if outcome.failure is not None:
            return LLMResponse(
                text="",
                model=self.spec.model,
                latency_s=latency,
                attempts=outcome.attempts,
                error=f"{self.label}: {outcome.failure.describe(outcome.attempts)}",
            )
        done = outcome.value
        assert done is not None  # no failure: the attempt returned
        cost = cost_usd(self.spec, done.tokens)
        return LLMResponse(
            text=done.text,
            model=self.spec.model,
            input_tokens=done.input_tokens,
            output_tokens=done.output_tokens,
            cache_write_tokens=done.cache_write_tokens,
            cache_read_tokens=done.cache_read_tokens,
            cost_usd=cost,
            cache_saved_usd=uncached_cost_usd(self.spec, done.tokens) - cost,
            latency_s=latency,
            attempts=outcome.attempts,
            truncated=done.truncated,
        )

    def point_at(self, base_url: str) -> None:
        """Send calls to ``base_url`` from now on: a model server the run started after this client was made."""
        self.spec = replace(self.spec, base_url=base_url)
        self._client = self._client.with_options(base_url=base_url)
        self._limiter = limiter_for(self.spec)

    def check_model(self) -> None:
        """Raise PreflightError unless the endpoint knows the model and accepts the key; retried like a call."""
        if not self.spec.check_model:
            return
        failure = (outcome := self._call(self._find_model)).failure
        if failure is None:
            return
        advice = ""
        if failure.retryable:
            advice = "check base_url and the network"
        elif failure.status in (404, 405):
            advice = "if this endpoint has no models API, set check_model: false in the model config"
        where = self._client.base_url
        raise PreflightError(
            f"{self.label}: model check at {where} failed: {failure.describe(outcome.attempts, advice)}"
        )

    def _call(self, fn: Callable[[], T]) -> Outcome[T]:
        """``fn`` under the endpoint's cap, retried on what is worth retrying; failures are logged, not raised."""
        attempt = 0
        while True:
            attempt += 1
            try:
                with self._limiter:
                    return Outcome(fn(), attempt)
            except self._retried_errors as exc:
                failure = self._classify(exc)
            if not failure.retryable or attempt > self.spec.max_retries:
                log.error("%s: %s", self.label, failure.describe(attempt))
                return Outcome(None, attempt, failure)
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

    def backoff(self, retry: int, retry_after_s: float | None) -> float:
        """Seconds before retry number ``retry`` (0-based): the server's retry-after exactly when it sent one
        (sooner would only earn another 429), else ``backoff_s * 2**retry`` capped at ``backoff_max_s`` and
        scaled by a random factor in [0.5, 1] so that calls that failed together do not retry together."""
        if retry_after_s is not None:
            return retry_after_s
        return min(self.spec.backoff_s * 2**retry, self.spec.backoff_max_s) * self._rng.uniform(0.5, 1.0)

    def _classify(self, exc: Exception) -> Failure:
        errors = self.sdk_errors
        if isinstance(exc, (errors.timeout_error, httpx2.TimeoutException)):
            return Failure(f"timed out after {self.spec.timeout_s:g} s", retryable=True)
        if isinstance(exc, (errors.connection_error, httpx2.TransportError)):
            return Failure(
                f"connection failed ({_one_line(exc)})", True, advice="check base_url and the network"
            )
        if isinstance(exc, errors.status_error) and exc.status_code >= 400:
            code: int = exc.status_code
            detail = _api_message(exc)
            if code in RETRYABLE_STATUS:
                return Failure(f"HTTP {code} {detail}", True, retry_after(exc.response.headers), code)
            return Failure(f"HTTP {code} {detail}; {self._advice(code)}", False, status=code)
        if isinstance(exc, StreamFailed):
            return self._stream_failure(exc.kind, str(exc))
        if isinstance(exc, errors.api_error):
            # An error event in a stream: Anthropic's SDK raises it with the stream's status (200), OpenAI's
            # Chat Completions stream as a bare APIError; either way the body names the error's type.
            return self._stream_failure(_error_kind(getattr(exc, "body", None)), _api_message(exc))
        log.warning("%s: could not read the answer", self.label, exc_info=exc)
        detail = _one_line(exc)
        return Failure(
            f"malformed answer ({type(exc).__name__}{': ' + detail if detail else ''})",
            retryable=False,
            advice=f"not retried: check that base_url serves {self.api_name}",
        )

    def _stream_failure(self, kind: str | None, detail: str) -> Failure:
        if kind is None:  # the stream ended early but cleanly: the server meant to, a retry would too
            return Failure(detail, False, advice=f"not retried: check that base_url serves {self.api_name}")
        message = f"error event in the stream {detail}"
        if kind in RETRYABLE_KINDS:
            return Failure(message, retryable=True)
        return Failure(message, retryable=False, advice="not retried: the provider rejected the request")

    def _advice(self, code: int) -> str:
        model = self.spec.model
        if self.key_env:
            refused = f"the API key was refused, check {self.key_env}"
            forbidden = f"check that the key in {self.key_env} may use model {model!r}"
        else:  # openai_compatible without a key: the placeholder went
            refused = forbidden = "the server wants an API key: set api_key_env to the variable that holds it"
        advice = {
            400: "check max_tokens, thinking_budget and reasoning_effort in the model config",
            401: refused,
            403: forbidden,
            404: f"check the model name {model!r} and base_url",
        }
        return "not retried: " + advice.get(code, "the provider rejected the request")


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


def _error_body(body: object) -> dict[str, Any] | None:
    """The error object of a provider's JSON error body (both SDKs keep the body in ``.body``)."""
    error = body.get("error", body) if isinstance(body, dict) else None
    return error if isinstance(error, dict) else None


def _error_kind(body: object) -> str | None:
    error = _error_body(body) or {}
    kind = error.get("type") or error.get("code")
    return str(kind) if kind else None


def _api_message(exc: Exception) -> str:
    """``(type: message)`` from the provider's JSON error body, else the exception's own text."""
    error = _error_body(getattr(exc, "body", None))
    if not error or not error.get("message"):
        return f"({_one_line(exc)})"
    kind = _error_kind(error)
    return f"({kind}: {_one_line(error['message'])})" if kind else f"({_one_line(error['message'])})"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _one_line(value: object, limit: int = 300) -> str:
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
