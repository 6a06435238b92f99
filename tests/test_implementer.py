"""The implementer's bookkeeping over many ideas and samples: the lowest sample that applies wins,
samples that can no longer win are not asked for, every call has an outcome, and the budget stops
new calls without losing ideas. The model is a scripted in-process LLM: what is tested here is the
scheduling around it (the real SDKs are tested against the loopback server elsewhere)."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import quick_env_config

from hpc_executor.budget import CostMeter
from hpc_executor.environment import Environment
from hpc_executor.errors import ConfigError
from hpc_executor.implementer import Implementer
from hpc_executor.llm import LLM, LLMRequest, LLMResponse, LLMSpec
from hpc_executor.patching import MAX_ANSWER_CHARS
from hpc_executor.types import Idea

GOOD = "--- a/params.py\n+++ b/params.py\n@@ -2,1 +2,1 @@\n-LEARNING_RATE = 0.1\n+LEARNING_RATE = 0.4\n"
OTHER_GOOD = "--- a/params.py\n+++ b/params.py\n@@ -2,1 +2,1 @@\n-LEARNING_RATE = 0.1\n+LEARNING_RATE = 0.3\n"
STALE = "--- a/params.py\n+++ b/params.py\n@@ -2,1 +2,1 @@\n-LEARNING_RATE = 0.7\n+LEARNING_RATE = 0.4\n"
CUT = "<cut off>"  # an answer ending in this comes back truncated at max_tokens, without it
EVALUATOR = "--- a/evaluate.py\n+++ b/evaluate.py\n@@ -1,1 +1,1 @@\n-x\n+y\n"


class ScriptedLLM(LLM):
    """Answers by (idea, sample, revision); each call costs ``cost`` and takes ``delay(sample)`` s."""

    def __init__(
        self,
        answers: dict[tuple[str, int, int], str],
        cost: float = 0.01,
        delay=lambda k: 0.0,
        max_concurrency: int = 8,  # the implementer keeps twice as many chains in its pool
    ) -> None:
        super().__init__(LLMSpec(provider="offline", model="scripted", max_concurrency=max_concurrency))
        self.answers, self.cost, self.delay = answers, cost, delay
        self.asked: list[tuple[str, int, int]] = []
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()

    def complete(self, request: LLMRequest) -> LLMResponse:
        ctx = request.context
        key = (ctx["idea"]["idea_id"], ctx["sample"], ctx["revision"])
        with self._lock:
            self.asked.append(key)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        time.sleep(self.delay(ctx["sample"]))
        with self._lock:
            self.in_flight -= 1
        text = self.answers.get(key, "no diff here")
        return LLMResponse(
            text=text.removesuffix(CUT), model="scripted", cost_usd=self.cost, truncated=text.endswith(CUT)
        )


@pytest.fixture
def env() -> Environment:
    return Environment(quick_env_config())


def idea(n: int) -> Idea:
    return Idea(f"e0-{n:03d}", 0, f"idea {n}", "Raise the learning rate.")


def test_the_lowest_sample_that_applies_wins_whatever_answers_first(env: Environment) -> None:
    # sample 2 answers at once with a good diff; sample 1 answers later with another good diff
    llm = ScriptedLLM({("e0-000", 1, 0): OTHER_GOOD, ("e0-000", 2, 0): GOOD, ("e0-000", 0, 0): STALE},
                      delay=lambda k: {0: 0.05, 1: 0.3, 2: 0.0}[k])  # fmt: skip
    patch, calls = Implementer(llm, env, samples=3, revisions=1, thinking_budget=0).implement(idea(0))
    assert patch.status == "applied" and "LEARNING_RATE = 0.3" in patch.diff
    outcomes = {c.call_id: c.outcome for c in calls}
    assert outcomes["e0-000-s1-r0"] == "applied" and outcomes["e0-000-s2-r0"] == "applied"
    assert outcomes["e0-000-s0-r0"] == "failed_to_apply"  # and its revision may still win
    assert patch.llm_call_ids == [c.call_id for c in calls] and patch.attempts == len(calls)


def test_samples_that_cannot_win_are_not_asked_for(env: Environment) -> None:
    # max_concurrency 1: two chains in the pool; sample 0 applies at once, sample 1 is already asking
    llm = ScriptedLLM({("e0-000", 0, 0): GOOD}, delay=lambda k: 1.0 * k, max_concurrency=1)
    patch, calls = Implementer(llm, env, samples=10, revisions=2, thinking_budget=0).implement(idea(0))
    assert patch.status == "applied" and "LEARNING_RATE = 0.4" in patch.diff
    assert sorted(llm.asked) == [("e0-000", 0, 0), ("e0-000", 1, 0)]  # no revision of 1, no sample 2-9
    assert [c.outcome for c in calls] == ["applied", "not_a_diff"]


def test_failures_are_revised_with_outcomes_recorded_and_the_last_answer_decides(env: Environment) -> None:
    llm = ScriptedLLM({("e0-000", 0, 0): STALE, ("e0-000", 0, 2): EVALUATOR})
    patch, calls = Implementer(llm, env, samples=1, revisions=2, thinking_budget=0).implement(idea(0))
    assert [c.outcome for c in calls] == ["failed_to_apply", "not_a_diff", "rejected"]
    assert [c.request.purpose for c in calls] == ["implement", "revise", "revise"]
    assert patch.status == "patch_rejected" and "evaluate.py" in patch.reason


def test_all_chains_of_all_ideas_share_one_pool(env: Environment) -> None:
    answers = {(f"e0-{n:03d}", k, 0): GOOD for n in range(4) for k in range(3)}
    llm = ScriptedLLM(answers, delay=lambda k: 0.1, max_concurrency=6)  # a pool of 2 x 6 chains
    done = list(Implementer(llm, env, samples=3, revisions=0, thinking_budget=0)
                .implement_all([idea(n) for n in range(4)]))  # fmt: skip
    assert sorted(i.idea_id for i, _, _ in done) == [f"e0-{n:03d}" for n in range(4)]
    assert all(p.status == "applied" for _, p, _ in done)
    assert llm.max_in_flight == 12  # every sample of every idea at once, as many as allowed


def test_the_budget_stops_new_calls_and_leaves_unstarted_ideas_unimplemented(env: Environment) -> None:
    meter = CostMeter(budget_usd=0.025)
    # every answer is "no diff here", so each sample would revise twice; two chains at once
    llm = ScriptedLLM({}, cost=0.01, delay=lambda k: 0.05, max_concurrency=1)
    implementer = Implementer(llm, env, samples=1, revisions=2, thinking_budget=0, meter=meter)
    done = {i.idea_id: (p, c) for i, p, c in implementer.implement_all([idea(0), idea(1), idea(2)])}
    assert done["e0-002"] == (None, [])  # never started: left for a resumed run
    for patch, calls in (done["e0-000"], done["e0-001"]):
        assert patch.status == "implement_failed" and "budget was reached" in patch.reason and calls
    # no call starts once $0.025 is spent; the two chains may both have started one at $0.02
    assert meter.exhausted() and meter.spent_usd in (pytest.approx(0.03), pytest.approx(0.04))
    assert len(llm.asked) == round(meter.spent_usd / 0.01)


def test_a_budget_reached_mid_idea_says_so(env: Environment) -> None:
    meter = CostMeter(budget_usd=0.015)
    llm = ScriptedLLM({}, cost=0.01)
    patch, calls = Implementer(llm, env, samples=1, revisions=2, thinking_budget=0, meter=meter).implement(
        idea(0)
    )
    assert len(calls) == 2 and patch.status == "implement_failed" and "budget was reached" in patch.reason


@pytest.mark.parametrize("budget", [0, -1.0])
def test_a_budget_must_be_positive(budget: float) -> None:
    with pytest.raises(ConfigError, match="positive"):
        CostMeter(budget)


def test_a_cut_off_answer_is_never_applied_and_is_revised_with_the_reason(env: Environment) -> None:
    half = GOOD.split("+LEARNING_RATE")[0]  # stops before its added line: as a diff, it deletes the line
    llm = ScriptedLLM({("e0-000", 0, 0): half + CUT, ("e0-000", 0, 1): GOOD})
    patch, calls = Implementer(llm, env, samples=1, revisions=1, thinking_budget=0).implement(idea(0))
    assert [c.outcome for c in calls] == ["truncated", "applied"]
    assert patch.status == "applied" and "+LEARNING_RATE = 0.4" in patch.diff
    assert calls[1].request.context["error"].startswith("Your answer was cut off at the output token limit")
    assert "cut off at the output token limit" in calls[1].request.prompt


def test_a_runaway_answer_is_rejected_unread_and_revised_with_the_limit(env: Environment) -> None:
    runaway = GOOD + "\nThat is the diff." * (MAX_ANSWER_CHARS // 10)  # applies, were it read
    llm = ScriptedLLM({("e0-000", 0, 0): runaway, ("e0-000", 0, 1): OTHER_GOOD})
    patch, calls = Implementer(llm, env, samples=1, revisions=1, thinking_budget=0).implement(idea(0))
    assert [c.outcome for c in calls] == ["rejected", "applied"]
    assert "LEARNING_RATE = 0.3" in patch.diff
    assert f"over the limit of {MAX_ANSWER_CHARS:,}" in calls[1].request.context["error"]
