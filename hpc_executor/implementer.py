"""The implementer: turns an idea into a diff that applies, as in the paper.

``samples`` diffs are requested in parallel; each is checked by applying it to a fresh copy of
the baseline and, when it fails, revised up to ``revisions`` times with the error fed back. The
lowest-numbered sample that applies wins (deterministic, whatever order the answers arrive in).
"""

from __future__ import annotations

import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from hpc_executor import prompts
from hpc_executor.environment import Environment
from hpc_executor.errors import NotADiff, PatchFailed, PatchRejected
from hpc_executor.llm import LLM, LLMRequest, LLMResponse
from hpc_executor.patching import apply_diff
from hpc_executor.types import Idea, Patch
from hpc_executor.worker import copy_baseline

RESERVED_NOTE = (
    "Reserved files, not shown: {files}. They hold the frozen evaluator and the data preparation; "
    "they may not be read or changed, and a diff that touches them is rejected."
)


@dataclass
class Call:
    call_id: str
    request: LLMRequest
    response: LLMResponse


@dataclass
class Attempt:
    diff: str | None = None  # the normalised diff that applied
    error: str = ""
    rejected: bool = False
    calls: list[Call] = field(default_factory=list)


class Implementer:
    def __init__(
        self, llm: LLM, env: Environment, samples: int, revisions: int, thinking_budget: int
    ) -> None:
        self.llm = llm
        self.env = env
        self.samples = max(1, samples)
        self.revisions = max(0, revisions)
        self.thinking_budget = thinking_budget
        hidden = [f for f in env.baseline_files() if f not in env.implementer_files()]
        self._codebase = prompts.codebase(env.baseline_dir, env.implementer_files(), numbered=True)
        self._reserved = RESERVED_NOTE.format(files=", ".join(hidden)) if hidden else ""

    def implement(self, idea: Idea) -> tuple[Patch, list[Call]]:
        with ThreadPoolExecutor(max_workers=self.samples) as pool:
            attempts = list(pool.map(lambda k: self._chain(idea, k), range(self.samples)))
        calls = [c for a in attempts for c in a.calls]
        call_ids = [c.call_id for c in calls]
        for attempt in attempts:
            if attempt.diff is not None:
                return Patch(idea.idea_id, attempt.diff, "applied", "", len(calls), call_ids), calls
        last = attempts[0]
        status = "patch_rejected" if any(a.rejected for a in attempts) else "implement_failed"
        reason = next((a.error for a in attempts if a.rejected), last.error)
        return Patch(idea.idea_id, None, status, reason, len(calls), call_ids), calls

    def _chain(self, idea: Idea, sample: int) -> Attempt:
        attempt = Attempt()
        base_prompt = prompts.render(
            "implement",
            idea_title=idea.title,
            idea_description=idea.description,
            codebase=self._codebase,
            reserved_note=self._reserved,
        )
        prompt, purpose = base_prompt, "implement"
        for revision in range(self.revisions + 1):
            request = LLMRequest(
                prompt=prompt,
                purpose=purpose,
                system=prompts.render("implementer_system"),
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
            attempt.calls.append(Call(f"{idea.idea_id}-s{sample}-r{revision}", request, response))
            if response.error:  # the provider failed after its retries: no point revising
                attempt.error = f"LLM call failed: {response.error}"
                return attempt
            try:
                attempt.diff = self.check(response.text)
                return attempt
            except PatchRejected as exc:  # NotADiff is no policy breach: revise, but do not count it as one
                attempt.error, attempt.rejected = str(exc), not isinstance(exc, NotADiff)
            except PatchFailed as exc:
                attempt.error, attempt.rejected = str(exc), False
            prompt = (
                base_prompt
                + "\n\n"
                + prompts.render(
                    "revise", idea_title=idea.title, error=attempt.error, diff=response.text.strip()[-20000:]
                )
            )
            purpose = "revise"
        return attempt

    def check(self, answer: str) -> str:
        """Apply the answer's diff to a scratch copy of the baseline; returns the normalised diff."""
        with tempfile.TemporaryDirectory(prefix="hpcx-check-") as tmp:
            workspace = Path(tmp) / "workspace"
            copy_baseline(self.env.baseline_dir, workspace)
            return apply_diff(answer, workspace, self.env.policy)
