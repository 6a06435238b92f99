"""One contract suite for the real LLM providers, run against a loopback fake of both APIs.

The real SDKs make real HTTP requests to 127.0.0.1; no internet, no real keys, and the retry
sleeps go to a list instead of the clock."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fakes.llm_server import FakeLLMServer, Reply

from hpc_executor.errors import ConfigError, PreflightError
from hpc_executor.llm.anthropic_provider import AnthropicLLM
from hpc_executor.llm.base import LLMRequest, LLMSpec
from hpc_executor.llm.credentials import required_env_vars
from hpc_executor.llm.openai_provider import OpenAILLM
from hpc_executor.llm.retry import RetryingLLM, retry_after

DUMMY_KEY = "sk-test-not-a-real-key"


@dataclass(frozen=True)
class Case:
    """How one provider's wire format spells the same things."""

    provider: str
    llm_class: type[RetryingLLM]
    model: str
    key_env: str
    path: str  # the endpoint the SDK posts to
    url_suffix: str  # appended to the fake's URL to form base_url as this SDK expects it
    max_tokens_field: str
    system_field: str
    prompt_sent: Callable[[dict[str, Any]], str]
    thinking_on: dict[str, Any]  # spec fields that turn thinking (reasoning) on
    thinking_sent: tuple[str, Any]  # (body field, value) the request must then carry


CASES = [
    Case(
        provider="anthropic",
        llm_class=AnthropicLLM,
        model="claude-sonnet-4-6",
        key_env="ANTHROPIC_API_KEY",
        path="/v1/messages",
        url_suffix="",
        max_tokens_field="max_tokens",
        system_field="system",
        prompt_sent=lambda body: body["messages"][0]["content"],
        thinking_on={"thinking_budget": 3000},
        thinking_sent=("thinking", {"type": "enabled", "budget_tokens": 3000}),
    ),
    Case(
        provider="openai",
        llm_class=OpenAILLM,
        model="gpt-5",
        key_env="OPENAI_API_KEY",
        path="/v1/responses",
        url_suffix="/v1",
        max_tokens_field="max_output_tokens",
        system_field="instructions",
        prompt_sent=lambda body: body["input"],
        thinking_on={"reasoning_effort": "minimal"},
        thinking_sent=("reasoning", {"effort": "minimal"}),
    ),
]

REQUEST = LLMRequest(prompt="Propose one idea.", purpose="ideate", system="You are a researcher.")


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as fake:
        yield fake


@pytest.fixture(params=CASES, ids=[case.provider for case in CASES])
def case(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Case:
    monkeypatch.setenv(request.param.key_env, DUMMY_KEY)
    return request.param


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def make_llm(case: Case, server: FakeLLMServer, sleeps: list[float]) -> Callable[..., RetryingLLM]:
    def make(**overrides: Any) -> RetryingLLM:
        fields: dict[str, Any] = {
            "provider": case.provider,
            "model": case.model,
            "base_url": server.url + case.url_suffix,
            "timeout_s": 5.0,
            "max_retries": 3,
            "backoff_s": 2.0,
            "backoff_max_s": 60.0,
            "price_in_per_mtok": 3.0,
            "price_out_per_mtok": 15.0,
        }
        return case.llm_class(LLMSpec(**{**fields, **overrides}), sleep=sleeps.append)

    return make


def test_ok_returns_text_tokens_and_cost(case: Case, server: FakeLLMServer, make_llm, sleeps) -> None:
    server.script(Reply(text="Use a cosine schedule.", input_tokens=1000, output_tokens=2000))
    response = make_llm(max_tokens=4321).complete(REQUEST)

    assert response.error is None
    assert response.text == "Use a cosine schedule."
    assert (response.input_tokens, response.output_tokens) == (1000, 2000)
    assert response.cost_usd == pytest.approx((1000 * 3.0 + 2000 * 15.0) / 1e6)
    assert response.attempts == 1
    assert response.model == case.model
    assert sleeps == []
    (sent,) = server.requests
    assert sent.path == case.path
    assert (
        sent.headers["authorization"] == f"Bearer {DUMMY_KEY}"
    )  # anthropic 2.x sends it as a bearer token too
    assert sent.body["model"] == case.model
    assert sent.body[case.max_tokens_field] == 4321
    assert sent.body[case.system_field] == "You are a researcher."
    assert case.prompt_sent(sent.body) == "Propose one idea."


def test_thinking_sent_as_configured_and_left_out_of_text(
    case: Case, server: FakeLLMServer, make_llm
) -> None:
    name, value = case.thinking_sent
    plain = make_llm().complete(REQUEST)
    thinking = make_llm(**case.thinking_on).complete(REQUEST)

    off, on = server.requests
    assert name not in off.body
    assert on.body[name] == value
    # The fake answers a thinking request with a thinking/reasoning item before the text.
    assert plain.text == thinking.text == "hello from the fake"


def test_temperature_sent_only_without_thinking(case: Case, server: FakeLLMServer, make_llm) -> None:
    make_llm(temperature=0.5).complete(REQUEST)
    make_llm(temperature=0.5, **case.thinking_on).complete(REQUEST)
    make_llm(temperature=1.0).complete(REQUEST)

    sampled, thinking, default = server.requests
    assert sampled.body["temperature"] == 0.5
    assert "temperature" not in thinking.body
    assert "temperature" not in default.body


@pytest.mark.parametrize(("retry_after_s", "expected_sleep"), [(7, 7.0), (None, 2.0)])
def test_rate_limit_then_ok_waits_and_succeeds(
    server: FakeLLMServer, make_llm, sleeps, caplog, retry_after_s, expected_sleep
) -> None:
    server.script(Reply(status=429, retry_after=retry_after_s), "ok")
    with caplog.at_level(logging.WARNING, logger="hpc_executor.llm"):
        response = make_llm().complete(REQUEST)

    assert response.error is None
    assert response.text == "hello from the fake"
    assert response.attempts == 2
    assert sleeps == [expected_sleep]
    assert len(server.requests) == 2
    assert any("HTTP 429" in r.message and "retry 1 of 3" in r.message for r in caplog.records)


def test_overloaded_and_server_errors_retried_with_capped_backoff(
    server: FakeLLMServer, make_llm, sleeps
) -> None:
    server.script(529, 500, 503, "ok")
    response = make_llm(backoff_max_s=5.0).complete(REQUEST)

    assert response.error is None
    assert response.attempts == 4
    assert sleeps == [2.0, 4.0, 5.0]


@pytest.mark.parametrize(
    ("status", "advice"),
    [
        (400, "check max_tokens, thinking_budget and reasoning_effort"),
        (401, "check {key_env}"),
        (403, "key in {key_env} may use model"),
        (404, "check the model name"),
    ],
)
def test_client_errors_not_retried_and_say_what_to_do(
    case: Case, server: FakeLLMServer, make_llm, sleeps, status, advice
) -> None:
    server.script(status)
    response = make_llm().complete(REQUEST)

    assert response.text == ""
    assert response.attempts == 1
    assert sleeps == []
    assert len(server.requests) == 1
    assert response.error.startswith(f"{case.provider}:{case.model}: HTTP {status}")
    assert advice.format(key_env=case.key_env) in response.error
    assert "\n" not in response.error


def test_hang_times_out_retries_then_records_error(server: FakeLLMServer, make_llm, sleeps) -> None:
    server.script("hang", "hang", "hang")
    response = make_llm(timeout_s=0.3, max_retries=2).complete(REQUEST)

    assert response.text == ""
    assert response.attempts == 3
    assert "timed out after 0.3 s" in response.error
    assert "gave up after 3 attempts" in response.error
    assert sleeps == [2.0, 4.0]
    assert len(server.requests) == 3


def test_every_attempt_failing_records_error_without_raising(server: FakeLLMServer, make_llm, sleeps) -> None:
    server.script(*[500] * 4)
    response = make_llm(max_retries=3).complete(REQUEST)

    assert response.text == ""
    assert response.attempts == 4
    assert "HTTP 500" in response.error
    assert "gave up after 4 attempts" in response.error
    assert sleeps == [2.0, 4.0, 8.0]


def test_connection_refused_is_retried(case: Case, make_llm, sleeps) -> None:
    with socket.socket() as probe:  # a port nothing listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    response = make_llm(base_url=f"http://127.0.0.1:{port}{case.url_suffix}", max_retries=1).complete(REQUEST)

    assert response.attempts == 2
    assert "connection failed" in response.error
    assert sleeps == [2.0]


def test_missing_key_is_a_preflight_error_naming_the_variable(
    case: Case, make_llm, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(case.key_env)
    with pytest.raises(PreflightError, match=case.key_env):
        make_llm()


def test_custom_key_variable_is_read_and_sent(
    case: Case, server: FakeLLMServer, make_llm, monkeypatch
) -> None:
    monkeypatch.delenv(case.key_env)
    monkeypatch.setenv("TEAM_LLM_KEY", "sk-team")
    make_llm(api_key_env="TEAM_LLM_KEY").complete(REQUEST)

    assert server.requests[0].headers["authorization"] == "Bearer sk-team"


# Provider-specific behaviour.


def test_anthropic_request_thinking_budget_overrides_spec(server: FakeLLMServer, monkeypatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", DUMMY_KEY)
    spec = LLMSpec(provider="anthropic", model="claude-sonnet-4-6", thinking_budget=3000, base_url=server.url)
    llm = AnthropicLLM(spec)
    llm.complete(LLMRequest(prompt="p", purpose="exploit", thinking_budget=1500))
    llm.complete(LLMRequest(prompt="p", purpose="implement", thinking_budget=0))

    exploit, implement = server.requests
    assert exploit.body["thinking"] == {"type": "enabled", "budget_tokens": 1500}
    assert "thinking" not in implement.body


@pytest.mark.parametrize("budget", [500, 10000])
def test_anthropic_rejects_impossible_thinking_budget(budget: int, monkeypatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", DUMMY_KEY)
    with pytest.raises(ConfigError, match="thinking_budget"):
        AnthropicLLM(LLMSpec(provider="anthropic", model="m", max_tokens=10000, thinking_budget=budget))


# Credentials and header parsing.


@pytest.mark.parametrize(
    ("provider", "api_key_env", "expected"),
    [
        ("anthropic", None, ["ANTHROPIC_API_KEY"]),
        ("openai", None, ["OPENAI_API_KEY"]),
        ("openai", "AZURE_KEY", ["AZURE_KEY"]),
        ("offline", None, []),
    ],
)
def test_required_env_vars(provider: str, api_key_env: str | None, expected: list[str]) -> None:
    assert required_env_vars(LLMSpec(provider=provider, model="m", api_key_env=api_key_env)) == expected


def test_required_env_vars_unknown_provider_lists_choices() -> None:
    with pytest.raises(ConfigError, match="anthropic, offline, openai"):
        required_env_vars(LLMSpec(provider="gemini", model="m"))


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "12"}, 12.0),
        ({"retry-after-ms": "1500", "retry-after": "12"}, 1.5),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),  # a date in the past: go now
        ({"retry-after": "soon"}, None),
        ({}, None),
    ],
)
def test_retry_after(headers: dict[str, str], expected: float | None) -> None:
    assert retry_after(headers) == expected
