"""One contract suite for the real LLM providers (anthropic, openai, openai_compatible), each plain and
streamed, run against a loopback fake of their APIs.

The real SDKs make real HTTP requests to 127.0.0.1; no internet, no real keys, and the retry sleeps go to
a list instead of the clock."""

from __future__ import annotations

import logging
import random
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from fakes.llm_server import DEFAULT_MODELS, FakeLLMServer, Reply

from hpc_executor.errors import ConfigError, PreflightError
from hpc_executor.llm import make_llm as build_llm
from hpc_executor.llm.anthropic_provider import AnthropicLLM
from hpc_executor.llm.base import LLMRequest, LLMResponse, LLMSpec
from hpc_executor.llm.credentials import required_env_vars
from hpc_executor.llm.limits import limiter_for
from hpc_executor.llm.openai_compatible_provider import OpenAICompatibleLLM, strip_think
from hpc_executor.llm.openai_provider import OpenAILLM
from hpc_executor.llm.retry import RetryingLLM, retry_after

DUMMY_KEY = "sk-test-not-a-real-key"
FAKE_SCRIPT = Path(__file__).parent / "fakes" / "llm_server.py"


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
    system_sent: Callable[[dict[str, Any]], str]
    prompt_sent: Callable[[dict[str, Any]], str]
    thinking_on: dict[str, Any]  # spec fields that turn thinking (reasoning) on
    thinking_sent: tuple[str, Any]  # (body field, value) the request must then carry
    spec_fields: dict[str, Any] = field(default_factory=dict)  # what this provider needs besides


CASES = [
    Case(
        provider="anthropic",
        llm_class=AnthropicLLM,
        model="claude-sonnet-4-6",
        key_env="ANTHROPIC_API_KEY",
        path="/v1/messages",
        url_suffix="",
        max_tokens_field="max_tokens",
        system_sent=lambda body: body["system"],
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
        system_sent=lambda body: body["instructions"],
        prompt_sent=lambda body: body["input"],
        thinking_on={"reasoning_effort": "minimal"},
        thinking_sent=("reasoning", {"effort": "minimal"}),
    ),
    Case(
        provider="openai_compatible",
        llm_class=OpenAICompatibleLLM,
        model="Qwen/Qwen3-8B",
        key_env="VLLM_API_KEY",  # a server started with --api-key; keyless servers are tested below
        path="/v1/chat/completions",
        url_suffix="/v1",
        max_tokens_field="max_tokens",
        system_sent=lambda body: body["messages"][0]["content"],
        prompt_sent=lambda body: body["messages"][-1]["content"],
        thinking_on={"reasoning_effort": "low"},
        thinking_sent=("reasoning_effort", "low"),
        spec_fields={"api_key_env": "VLLM_API_KEY"},
    ),
]

REQUEST = LLMRequest(prompt="Propose one idea.", purpose="ideate", system="You are a researcher.")


class NoJitter(random.Random):
    """Jitter's factor is always 1, so that tests can name each back-off exactly."""

    def random(self) -> float:
        return 1.0


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as fake:
        yield fake


@pytest.fixture(params=CASES, ids=[case.provider for case in CASES])
def case(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Case:
    monkeypatch.setenv(request.param.key_env, DUMMY_KEY)
    return request.param


@pytest.fixture(params=[False, True], ids=["plain", "stream"])
def stream(request: pytest.FixtureRequest) -> bool:
    return request.param


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def make_llm(
    case: Case, server: FakeLLMServer, sleeps: list[float], stream: bool
) -> Callable[..., RetryingLLM]:
    def make(sleep: Callable[[float], None] = sleeps.append, **overrides: Any) -> RetryingLLM:
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
            "stream": stream,
            **case.spec_fields,
        }
        return case.llm_class(LLMSpec(**{**fields, **overrides}), sleep=sleep, rng=NoJitter())

    return make


def closed_port() -> int:
    """A port nothing listens on once the probe is closed."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def assert_failed_at_once(
    case: Case, response: LLMResponse, server: FakeLLMServer, sleeps: list[float], says: str
) -> None:
    """No retry, and a one-line error that names the model and ``says`` what went wrong."""
    assert (response.text, response.attempts, sleeps, len(server.requests)) == ("", 1, [], 1)
    assert response.error.startswith(f"{case.provider}:{case.model}: ")
    assert says in response.error
    assert "\n" not in response.error


def test_ok_returns_text_tokens_and_cost(
    case: Case, server: FakeLLMServer, make_llm, sleeps, stream: bool
) -> None:
    server.script(Reply(text="Use a cosine schedule.", input_tokens=1000, output_tokens=2000))
    response = make_llm(max_tokens=4321).complete(REQUEST)

    assert response.error is None
    assert response.text == "Use a cosine schedule."
    assert (response.input_tokens, response.output_tokens) == (1000, 2000)  # streamed or not
    assert response.cost_usd == pytest.approx((1000 * 3.0 + 2000 * 15.0) / 1e6)
    assert response.attempts == 1
    assert response.model == case.model
    assert not response.truncated
    assert sleeps == []
    (sent,) = server.requests
    assert sent.path == case.path
    assert sent.headers["authorization"] == f"Bearer {DUMMY_KEY}"  # anthropic 2.x sends a bearer token too
    assert sent.body["model"] == case.model
    assert sent.body[case.max_tokens_field] == 4321
    assert case.system_sent(sent.body) == "You are a researcher."
    assert case.prompt_sent(sent.body) == "Propose one idea."
    assert sent.body.get("stream", False) is stream
    if stream and case.provider == "openai_compatible":
        assert sent.body["stream_options"] == {"include_usage": True}


def test_thinking_sent_as_configured_and_left_out_of_text(
    case: Case, server: FakeLLMServer, make_llm
) -> None:
    name, value = case.thinking_sent
    plain = make_llm().complete(REQUEST)
    thinking = make_llm(**case.thinking_on).complete(REQUEST)

    off, on = server.requests
    assert name not in off.body
    assert on.body[name] == value
    # The fake answers a thinking request with a thinking/reasoning item (a <think> block) before the text;
    # its tokens are in the output count.
    assert plain.text == thinking.text == "hello from the fake"
    assert plain.output_tokens == thinking.output_tokens == 45


def test_temperature_sent_only_without_thinking(case: Case, server: FakeLLMServer, make_llm) -> None:
    make_llm(temperature=0.5).complete(REQUEST)
    make_llm(temperature=0.5, **case.thinking_on).complete(REQUEST)
    make_llm(temperature=1.0).complete(REQUEST)

    sampled, thinking, default = server.requests
    assert sampled.body["temperature"] == 0.5
    assert "temperature" not in thinking.body
    assert "temperature" not in default.body


NO_DIFF = "I would raise the learning rate, but I cannot write the diff."
MISCOUNTED = "```diff\n--- a/params.py\n+++ b/params.py\n@@ -1,9 +1,9 @@\n-LEARNING_RATE = 0.1\n+LEARNING_RATE = 0.4\n```"


@pytest.mark.parametrize("text", [NO_DIFF, MISCOUNTED, ""], ids=["no-diff", "miscounted-hunk", "empty"])
def test_any_answer_text_comes_back_verbatim(server: FakeLLMServer, make_llm, text: str) -> None:
    # Judging the answer is the implementer's job: a provider passes on whatever the model wrote.
    server.script(Reply(text=text))
    response = make_llm().complete(REQUEST)

    assert (response.text, response.error, response.attempts) == (text, None, 1)


def test_answer_cut_off_at_max_tokens_is_flagged(server: FakeLLMServer, make_llm, caplog) -> None:
    server.script(Reply(truncated=True))
    with caplog.at_level(logging.WARNING, logger="hpc_executor.llm"):
        response = make_llm().complete(REQUEST)

    assert response.truncated
    assert response.text == "hello from the fake"
    assert response.output_tokens == 45
    assert any("max_" in r.message for r in caplog.records)


@pytest.mark.parametrize(("retry_after_s", "expected_sleep"), [(7, 7.0), (120, 120.0), (None, 2.0)])
def test_rate_limit_then_ok_waits_and_succeeds(
    server: FakeLLMServer, make_llm, sleeps, caplog, retry_after_s, expected_sleep
) -> None:
    # The server's retry-after is honoured exactly, even above backoff_max_s (60): sooner earns another 429.
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

    assert_failed_at_once(case, response, server, sleeps, advice.format(key_env=case.key_env))
    assert response.error.startswith(f"{case.provider}:{case.model}: HTTP {status}")


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
    base_url = f"http://127.0.0.1:{closed_port()}{case.url_suffix}"
    response = make_llm(base_url=base_url, max_retries=1).complete(REQUEST)

    assert response.attempts == 2
    assert "connection failed" in response.error
    assert "check base_url and the network" in response.error
    assert sleeps == [2.0]


def test_connection_dropped_mid_answer_is_retried(server: FakeLLMServer, make_llm, sleeps) -> None:
    server.script("drop", "ok")  # streamed: after half the events; plain: before any answer
    response = make_llm().complete(REQUEST)

    assert response.error is None
    assert response.text == "hello from the fake"
    assert response.attempts == 2
    assert sleeps == [2.0]


def test_overloaded_error_event_mid_stream_is_retried(server: FakeLLMServer, make_llm, sleeps) -> None:
    server.script(Reply(stream_error=529), "ok")  # plain requests get the same error as an HTTP 529
    response = make_llm().complete(REQUEST)

    assert response.error is None
    assert response.text == "hello from the fake"
    assert (response.input_tokens, response.output_tokens) == (120, 45)  # the failed attempt is not billed
    assert response.attempts == 2
    assert sleeps == [2.0]


def test_invalid_request_error_event_mid_stream_is_not_retried(
    case: Case, server: FakeLLMServer, make_llm, sleeps
) -> None:
    server.script(Reply(stream_error=400))
    response = make_llm().complete(REQUEST)

    assert_failed_at_once(case, response, server, sleeps, "(invalid_request_error: ")
    assert "not retried" in response.error


@pytest.mark.parametrize("body", ["malformed", "wrong_shape"])
def test_malformed_answer_is_a_clear_error_not_retried(
    case: Case, server: FakeLLMServer, make_llm, sleeps, body: str
) -> None:
    server.script(body)  # a 200 whose body (streamed: first event) is not JSON, or JSON of another shape
    response = make_llm().complete(REQUEST)

    assert_failed_at_once(case, response, server, sleeps, "not retried: check that base_url serves")


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


# The model check at start-up: the same for a streaming spec, so it runs plain only.
plain_only = pytest.mark.parametrize("stream", [False], ids=["plain"])


@plain_only
def test_check_model_asks_the_models_endpoint(case: Case, server: FakeLLMServer, make_llm) -> None:
    make_llm().check_model()

    (sent,) = server.requests
    assert sent.method == "GET"
    assert sent.path.startswith("/v1/models")


@plain_only
def test_check_model_unknown_model(case: Case, server: FakeLLMServer, make_llm, sleeps) -> None:
    with pytest.raises(PreflightError, match="no-such-model") as raised:
        make_llm(model="no-such-model").check_model()

    assert len(server.requests) == 1 and sleeps == []
    if case.provider == "openai_compatible":  # the server's list says what it does serve
        assert "Qwen/Qwen3-8B" in str(raised.value)
    else:
        assert "set check_model: false" in str(raised.value)


@plain_only
def test_check_model_refused_key_names_the_variable(case: Case, server: FakeLLMServer, make_llm) -> None:
    server.script(401)
    with pytest.raises(PreflightError, match=f"refused, check {case.key_env}"):
        make_llm().check_model()


@plain_only
def test_check_model_unreachable_after_retries(case: Case, make_llm, sleeps) -> None:
    base_url = f"http://127.0.0.1:{closed_port()}{case.url_suffix}"
    with pytest.raises(PreflightError, match=r"gave up after 3 attempts.*check base_url and the network"):
        make_llm(base_url=base_url, max_retries=2).check_model()

    assert sleeps == [2.0, 4.0]


@plain_only
def test_check_model_retries_a_server_error(case: Case, server: FakeLLMServer, make_llm, sleeps) -> None:
    server.script(503)
    make_llm().check_model()

    assert len(server.requests) == 2 and sleeps == [2.0]


@plain_only
def test_check_model_off_asks_nothing(case: Case, server: FakeLLMServer, make_llm) -> None:
    make_llm(model="no-such-model", check_model=False).check_model()

    assert server.requests == []


def test_offline_check_model_does_nothing() -> None:
    build_llm(LLMSpec(provider="offline", model="scripted-stand-in")).check_model()


# The concurrency cap: per endpoint, across LLM objects, held only while an attempt is in flight.


def run_together(calls: list[Callable[[], Any]]) -> list[Any]:
    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(call) for call in calls]]


@plain_only
def test_concurrency_cap_bounds_requests_in_flight(case: Case, make_llm) -> None:
    with FakeLLMServer(latency_s=0.1) as slow:
        llm = make_llm(base_url=slow.url + case.url_suffix, max_concurrency=3)
        responses = run_together([lambda: llm.complete(REQUEST)] * 12)

    assert all(r.error is None for r in responses)
    assert slow.max_in_flight == 3


@plain_only
def test_llms_of_one_endpoint_share_the_smaller_cap(case: Case, make_llm) -> None:
    with FakeLLMServer(latency_s=0.1) as slow:
        base_url = slow.url + case.url_suffix
        ideator = make_llm(base_url=base_url, max_concurrency=4)
        implementer = make_llm(base_url=base_url, max_concurrency=2)
        run_together([lambda: ideator.complete(REQUEST), lambda: implementer.complete(REQUEST)] * 4)

    assert slow.max_in_flight == 2


@plain_only
def test_backoff_sleep_does_not_hold_the_cap(case: Case, server: FakeLLMServer, make_llm) -> None:
    sleeping, other_done, waited = threading.Event(), threading.Event(), []

    def sleep(seconds: float) -> None:
        sleeping.set()
        waited.append(other_done.wait(5))  # False if the other call could not start while we slept

    llm = make_llm(sleep=sleep, max_concurrency=1)
    server.script(Reply(status=429, retry_after=0))
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(llm.complete, REQUEST)
        assert sleeping.wait(5)
        second = llm.complete(REQUEST)
        other_done.set()
        assert first.result().error is None
    assert second.error is None
    assert waited == [True]


def test_limiter_is_keyed_by_provider_and_base_url() -> None:
    def spec(provider: str, base_url: str | None, cap: int = 8) -> LLMSpec:
        return LLMSpec(provider=provider, model="m", base_url=base_url, max_concurrency=cap)

    shared = limiter_for(spec("openai", "http://gpu1:8000/v1", 6))
    same = limiter_for(spec("openai", "http://gpu1:8000/v1/", 3))  # a trailing slash is the same endpoint
    other_url = limiter_for(spec("openai", "http://gpu2:8000/v1"))
    other_provider = limiter_for(spec("openai_compatible", "http://gpu1:8000/v1"))
    default_endpoint = limiter_for(spec("anthropic", None))

    assert same is shared and shared.cap == 3
    assert len({id(shared), id(other_url), id(other_provider), id(default_endpoint)}) == 4
    with pytest.raises(ConfigError, match="max_concurrency"):
        limiter_for(spec("openai", "http://gpu3:8000/v1", 0))


def test_backoff_is_jittered_within_half_to_full_and_seedable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", DUMMY_KEY)

    def llm(seed: int) -> RetryingLLM:
        spec = LLMSpec(
            provider="anthropic", model="m", backoff_s=2.0, backoff_max_s=60.0, base_url="http://x"
        )
        return AnthropicLLM(spec, rng=random.Random(seed))

    jittered = llm(1)
    for retry in range(8):
        full = min(2.0 * 2**retry, 60.0)
        delays = [jittered.backoff(retry, None) for _ in range(50)]
        assert all(full / 2 <= d <= full for d in delays)
        assert len(set(delays)) > 1
    assert jittered.backoff(3, retry_after_s=90.0) == 90.0  # the server's wait: exact, never jittered
    assert [llm(7).backoff(2, None) for _ in range(3)] == [llm(7).backoff(2, None) for _ in range(3)]


# openai_compatible: no key needed, base_url required, <think> stripped.


def test_openai_compatible_needs_no_key(server: FakeLLMServer, monkeypatch, caplog) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    spec = LLMSpec(provider="openai_compatible", model="Qwen/Qwen3-8B", base_url=server.url + "/v1")
    llm = build_llm(spec)
    assert required_env_vars(spec) == []
    llm.check_model()
    server.script(401)
    refused = llm.complete(REQUEST)
    answered = llm.complete(REQUEST)

    assert isinstance(llm, OpenAICompatibleLLM)
    assert {r.headers["authorization"] for r in server.requests} == {"Bearer EMPTY"}
    assert "set api_key_env" in refused.error
    assert answered.text == "hello from the fake"


def test_openai_compatible_without_base_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="needs base_url"):
        build_llm(LLMSpec(provider="openai_compatible", model="Qwen/Qwen3-8B"))


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("<think>\nhmm\n</think>\n\nthe answer", "the answer"),
        ("\n<think>a</think>b <think>kept</think>", "b <think>kept</think>"),  # only a leading block
        ("<think>cut off while thinking", ""),
        ("no thinking here", "no thinking here"),
        ("the answer <think>mid-text</think>", "the answer <think>mid-text</think>"),
    ],
)
def test_strip_think(text: str, answer: str) -> None:
    assert strip_think(text) == answer


# The fake itself: its streams satisfy the SDKs' own accumulators, and it runs as a process.


def test_fake_streams_parse_with_the_sdks_accumulators(server: FakeLLMServer) -> None:
    messages = [{"role": "user", "content": "hi"}]
    claude = anthropic.Anthropic(api_key=DUMMY_KEY, base_url=server.url, max_retries=0)
    gpt = openai.OpenAI(api_key=DUMMY_KEY, base_url=server.url + "/v1", max_retries=0)
    thinking = {"type": "enabled", "budget_tokens": 1024}
    with claude.messages.stream(model="m", max_tokens=2048, messages=messages, thinking=thinking) as events:
        message = events.get_final_message()
    with gpt.responses.stream(model="m", input="hi", reasoning={"effort": "low"}) as events:
        response = events.get_final_response()
    with gpt.chat.completions.stream(
        model="m", messages=messages, stream_options={"include_usage": True}
    ) as events:
        completion = events.get_final_completion()

    assert [block.type for block in message.content] == ["thinking", "text"]
    assert message.content[0].signature == "sig-fake"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (120, 45)
    assert (response.output_text, response.usage.output_tokens) == ("hello from the fake", 45)
    assert completion.choices[0].message.content == "hello from the fake"
    assert completion.usage.completion_tokens == 45


def test_fake_health_and_unknown_routes(server: FakeLLMServer) -> None:
    with urllib.request.urlopen(server.url + "/health") as health:
        assert health.status == 200
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(server.url + "/v2/nothing")
    assert missing.value.code == 404
    assert server.requests[-1].path == "/v2/nothing"  # /health is not recorded: it is polled


def test_fake_runs_as_a_process(tmp_path: Path) -> None:
    answer = tmp_path / "answer.txt"
    answer.write_text("a diff from the stand-in")
    proc = subprocess.Popen(
        [sys.executable, str(FAKE_SCRIPT), "--port", "0", "--reply-text-file", str(answer)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = proc.stdout.readline().split()[-1]
        llm = build_llm(LLMSpec(provider="openai_compatible", model=DEFAULT_MODELS[-1], base_url=url + "/v1"))
        llm.check_model()
        response = llm.complete(REQUEST)
    finally:
        proc.terminate()
        proc.wait(10)

    assert url.startswith("http://127.0.0.1:")
    assert response.text == "a diff from the stand-in"


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
        ("openai_compatible", None, []),
        ("openai_compatible", "VLLM_API_KEY", ["VLLM_API_KEY"]),
        ("offline", None, []),
    ],
)
def test_required_env_vars(provider: str, api_key_env: str | None, expected: list[str]) -> None:
    assert required_env_vars(LLMSpec(provider=provider, model="m", api_key_env=api_key_env)) == expected


def test_required_env_vars_unknown_provider_lists_choices() -> None:
    with pytest.raises(ConfigError, match="anthropic, offline, openai, openai_compatible"):
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
