"""The implementer: turns an idea into a diff that applies, as in the paper.

``samples`` diffs are requested per idea; each is checked by applying it to a fresh copy of the
baseline and, when it fails, revised up to ``revisions`` times with the error fed back. The
lowest-numbered sample that applies wins (deterministic, whatever order the answers arrive in), so
once sample k applied, samples above k are not started and stop revising: they could not win.

Every (idea, sample) chain of a batch of ideas goes into one thread pool, so the provider sees as
many requests at once as its ``max_concurrency`` allows, however the ideas and samples split. The
pool holds twice that many chains: the provider's limiter caps the requests, and the spare chains
check their answers (git apply on a scratch copy) while others wait for the model.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from hpc_executor import prompts
from hpc_executor.budget import CostMeter
from hpc_executor.environment import Environment
from hpc_executor.errors import NotADiff, PatchFailed, PatchRejected
from hpc_executor.ids import implementer_call_id
from hpc_executor.llm import LLM, LLMRequest, LLMResponse
from hpc_executor.patching import check_answer_size
from hpc_executor.timed_apply import apply_diff_in_time
from hpc_executor.trial_dir import copy_baseline
from hpc_executor.types import CallOutcome, CallPurpose, Idea, Patch, PatchStatus

log = logging.getLogger("hpc_executor.implementer")

CHAINS_PER_REQUEST = 2  # chains in the pool per request the provider may have in flight
TRUNCATED_NOTE = (
    "Your answer was cut off at the output token limit before it ended, so its diff was not used (a cut-off "
    "diff can apply and silently drop the changes it did not reach). Write a shorter diff: only the hunks "
    "that change, with three lines of context."
)
BUDGET_REACHED = "the run's LLM budget was reached"
RESERVED_NOTE = (
    "Reserved files, not shown: {files}. They hold the frozen evaluator and the data preparation; "
    "they may not be read or changed, and a diff that touches them is rejected."
)


@dataclass
class Call:
    call_id: str
    request: LLMRequest
    response: LLMResponse
    outcome: str = ""  # a CallOutcome: what came of the answer


@dataclass
class Attempt:
    diff: str | None = None  # the normalised diff that applied
    error: str = ""
    rejected: bool = False
    budget_stopped: bool = False  # the budget ran out before this sample's next call
    calls: list[Call] = field(default_factory=list)


class _IdeaState:
    """The samples of one idea: which applied first, and which are done."""

    def __init__(self, idea: Idea, samples: int) -> None:
        self.idea = idea
        self.attempts: list[Attempt | None] = [None] * samples
        self._lock = threading.Lock()
        self._applied = samples  # lowest sample index that applied so far

    def applied(self, sample: int) -> None:
        with self._lock:
            self._applied = min(self._applied, sample)

    def can_win(self, sample: int) -> bool:
        with self._lock:
            return sample < self._applied


class Implementer:
    def __init__(
        self,
        llm: LLM,
        env: Environment,
        samples: int,
        revisions: int,
        thinking_budget: int,
        meter: CostMeter | None = None,
    ) -> None:
        self.llm = llm
        self.env = env
        self.samples = samples  # preflight rejects samples < 1 and revisions < 0
        self.revisions = revisions
        self.thinking_budget = thinking_budget
        self.chains_at_once = CHAINS_PER_REQUEST * max(1, llm.spec.max_concurrency)
        self.meter = meter or CostMeter(None)
        hidden = [f for f in env.baseline_files() if f not in env.implementer_files()]
        # The codebase and the answer format, the same for every sample, revision and idea, go first: the
        # provider's prompt cache serves them; the idea and any error follow.
        self._prefix = prompts.render(
            "implement_codebase",
            codebase=prompts.codebase(env.baseline_dir, env.implementer_files(), numbered=True),
            reserved_note=RESERVED_NOTE.format(files=", ".join(hidden)) if hidden else "",
        )
        self._cache_key = prompts.cache_key(env.name, "implementer", self._prefix)

    def implement(self, idea: Idea) -> tuple[Patch | None, list[Call]]:
        ((_, patch, calls),) = self.implement_all([idea])
        return patch, calls

    def implement_all(self, ideas: Iterable[Idea]) -> Iterator[tuple[Idea, Patch | None, list[Call]]]:
        """Each idea with its patch and calls, as soon as all its samples are done. The patch is None
        when the budget ran out before any call for the idea: it stays unimplemented, to be picked up
        when the run resumes with a larger budget."""
        states = [_IdeaState(idea, self.samples) for idea in ideas]
        pool = ThreadPoolExecutor(max_workers=self.chains_at_once, thread_name_prefix="implement")
        try:
            futures: dict[Future[Attempt], tuple[_IdeaState, int]] = {
                pool.submit(self._chain, state, k): (state, k)
                for state in states
                for k in range(self.samples)
            }
            pending = {id(state): self.samples for state in states}
            for future in as_completed(futures):
                state, k = futures[future]
                state.attempts[k] = future.result()
                pending[id(state)] -= 1
                if pending[id(state)] == 0:
                    yield state.idea, *self._outcome(state)
        finally:  # an interrupted consumer: chains not started are dropped, calls in flight finish
            pool.shutdown(wait=False, cancel_futures=True)

    def _outcome(self, state: _IdeaState) -> tuple[Patch | None, list[Call]]:
        attempts = [a for a in state.attempts if a is not None]
        calls = [c for a in attempts for c in a.calls]
        idea_id = state.idea.idea_id
        call_ids = [c.call_id for c in calls]
        for attempt in attempts:
            if attempt.diff is not None:
                return Patch(idea_id, attempt.diff, PatchStatus.APPLIED, "", len(calls), call_ids), calls
        failed = [a for a in attempts if a.error]
        if not failed:  # the budget ran out before any call: left for a resumed run to implement
            return None, []
        status = (
            PatchStatus.PATCH_REJECTED if any(a.rejected for a in failed) else PatchStatus.IMPLEMENT_FAILED
        )
        reason = next((a.error for a in failed if a.rejected), failed[0].error)
        if any(a.budget_stopped for a in attempts):
            reason += f" ({BUDGET_REACHED}: further samples and revisions were not asked for)"
        return Patch(idea_id, None, status, reason, len(calls), call_ids), calls

    def _chain(self, state: _IdeaState, sample: int) -> Attempt:
        try:
            return self._revise_until_applied(state, sample)
        except Exception as exc:  # a bug must cost this sample only, never the batch
            log.exception("implementing %s, sample %d failed", state.idea.idea_id, sample)
            return Attempt(error=f"internal error: {exc}")

    def _revise_until_applied(self, state: _IdeaState, sample: int) -> Attempt:
        idea, attempt = state.idea, Attempt()
        base_prompt = prompts.render("implement", idea_title=idea.title, idea_description=idea.description)
        prompt, purpose = base_prompt, CallPurpose.IMPLEMENT
        for revision in range(self.revisions + 1):
            if not state.can_win(sample):
                break
            if self.meter.exhausted():
                attempt.budget_stopped = True
                break
            request = LLMRequest(
                prompt=prompt,
                purpose=purpose,
                system=prompts.render("implementer_system"),
                prefix=self._prefix,
                cache_key=self._cache_key,
                thinking_budget=self.thinking_budget,
                context={
                    "idea": idea.__dict__,
                    "sample": sample,
                    "revision": revision,
                    "error": attempt.error,
                    "catalog": str(self.env.catalog_path() or ""),
                    "baseline_dir": str(self.env.baseline_dir),
                },
            )
            response = self.llm.complete(request)
            self.meter.add(response.cost_usd)
            call = Call(implementer_call_id(idea.idea_id, sample, revision), request, response)
            attempt.calls.append(call)
            if response.error:  # the provider failed after its retries: no point revising
                attempt.error, call.outcome = f"LLM call failed: {response.error}", CallOutcome.ERROR
                return attempt
            try:
                if response.truncated:  # a cut-off diff may still apply, minus what it did not reach
                    raise NotADiff(TRUNCATED_NOTE)
                attempt.diff = self.check(response.text)
                call.outcome = CallOutcome.APPLIED
                state.applied(sample)
                return attempt
            except NotADiff as exc:  # no policy breach: revise, but do not count it as one
                outcome = CallOutcome.TRUNCATED if response.truncated else CallOutcome.NOT_A_DIFF
                attempt.error, attempt.rejected, call.outcome = str(exc), False, outcome
            except PatchRejected as exc:
                attempt.error, attempt.rejected, call.outcome = str(exc), True, CallOutcome.REJECTED
            except PatchFailed as exc:
                attempt.error, attempt.rejected, call.outcome = str(exc), False, CallOutcome.FAILED_TO_APPLY
            prompt = (
                base_prompt
                + "\n\n"
                + prompts.render(
                    "revise", idea_title=idea.title, error=attempt.error, diff=response.text.strip()[-20000:]
                )
            )
            purpose = CallPurpose.REVISE
        return attempt

    def check(self, answer: str) -> str:
        """Apply the answer's diff to a scratch copy of the baseline; returns the normalised diff."""
        check_answer_size(answer)
        with tempfile.TemporaryDirectory(prefix="hpcx-check-") as tmp:
            workspace = Path(tmp) / "workspace"
            copy_baseline(self.env.baseline_dir, workspace)
            return apply_diff_in_time(answer, workspace, self.env.policy)
