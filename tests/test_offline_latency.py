"""The offline stand-in with a fixed latency per call (a benchmark's thinking model): each call
takes ``latency_s``, at most ``max_concurrency`` at once; it is still labelled a scripted stand-in."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import quick_env_config
from test_config import composed

from hpc_executor.config_checks import bound_problems
from hpc_executor.environment import Environment
from hpc_executor.errors import ConfigError
from hpc_executor.ideator import Ideator
from hpc_executor.llm import LLMRequest, LLMSpec, make_llm, spec_from_config
from hpc_executor.llm.offline import LABEL, OfflineLLM


def spec(**fields: object) -> LLMSpec:
    return LLMSpec(provider="offline", model="scripted-stand-in", **fields)  # type: ignore[arg-type]


def ideate(llm: OfflineLLM) -> list[tuple[str, str]]:
    return Ideator(llm, Environment(quick_env_config()), 0, 0).propose("ideate", 2, [], seed="s").ideas


def implement_request() -> LLMRequest:
    catalog = str(Environment(quick_env_config()).catalog_path())
    return LLMRequest(
        "p",
        "implement",
        context={"catalog": catalog, "idea": {"title": "Untitled", "description": "no recipe"}},
    )


def test_each_call_sleeps_its_latency_and_answers_as_before() -> None:
    slept: list[float] = []
    slow = OfflineLLM(spec(latency_s=2.5), sleep=slept.append)
    assert ideate(slow) == ideate(OfflineLLM(spec())), "the same scripted answers"
    assert slept == [2.5]
    assert slow.label == LABEL and "not an LLM" in LABEL


def test_no_latency_by_default() -> None:
    slept: list[float] = []
    ideate(OfflineLLM(spec(), sleep=slept.append))
    assert slept == []


def test_the_latency_is_measured_in_the_response() -> None:
    llm = OfflineLLM(spec(latency_s=0.2))
    response = llm.complete(implement_request())
    assert response.latency_s >= 0.2 and response.model == LABEL


def test_at_most_max_concurrency_calls_wait_at_once() -> None:
    lock, in_flight, peak = threading.Lock(), [0], [0]

    def sleep(seconds: float) -> None:
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.05)
        with lock:
            in_flight[0] -= 1

    llm = OfflineLLM(spec(latency_s=1.0, max_concurrency=2, base_url="offline-latency-test"), sleep=sleep)
    request = implement_request()
    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(lambda _: llm.complete(request), range(6)))
    assert peak[0] == 2


def test_a_negative_latency_is_rejected_saying_what_to_give() -> None:
    with pytest.raises(ConfigError, match="0 or more"):
        OfflineLLM(spec(latency_s=-1.0))
    cfg = composed("+env=tiny", "+model=offline", "model.implementer.latency_s=-1")
    assert any("model.implementer.latency_s=-1" in p for p in bound_problems(cfg))


def test_the_latency_is_a_config_key_of_the_offline_model() -> None:
    cfg = composed("+env=tiny", "+model=offline", "model.ideator.latency_s=3")
    llm = make_llm(spec_from_config(cfg.model.ideator))
    assert isinstance(llm, OfflineLLM) and llm.spec.latency_s == 3.0
    assert (
        make_llm(spec_from_config(composed("+env=tiny", "+model=offline").model.ideator)).spec.latency_s == 0
    )
