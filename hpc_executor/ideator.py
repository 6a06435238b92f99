"""The ideator: renders the ideation prompts and parses the ideas out of the model's answer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hpc_executor import prompts
from hpc_executor.environment import Environment
from hpc_executor.idea_parsing import parse_ideas
from hpc_executor.llm import LLM, LLMRequest, LLMResponse

FAILED_MARK = "failed to implement or execute"


@dataclass
class Proposal:
    ideas: list[tuple[str, str]]
    request: LLMRequest
    response: LLMResponse
    problem: str  # why the answer gave no ideas, or ""


class Ideator:
    def __init__(self, llm: LLM, env: Environment, thinking_budget: int, thinking_budget_search: int) -> None:
        self.llm = llm
        self.env = env
        self.budgets = {"ideate": thinking_budget, "exploit": thinking_budget_search,
                        "explore": thinking_budget_search}  # fmt: skip
        r = env.cfg.reward
        # Everything that is the same for every call of the run comes first, for the provider's prompt cache.
        self._prefix = prompts.render(
            "environment",
            env_name=env.name,
            env_description=env.cfg.description or "(no description)",
            budget_s=env.cfg.budget_s,
            reward_desc=f"{r.transform}({r.metric})",
            baseline_reward=f"{r.baseline:.4g}",
            codebase=prompts.codebase(env.baseline_dir, env.implementer_files(), numbered=False),
        )
        self._cache_key = prompts.cache_key(env.name, "ideator", self._prefix)

    def propose(self, purpose: str, n: int, shown: list[dict[str, Any]], seed: str) -> Proposal:
        """Ask for ``n`` ideas. ``purpose``: ideate (epoch 0 / best-of-N), exploit or explore.
        ``shown``: earlier ideas as dicts with title, description, status, reward."""
        request = self.request(purpose, n, shown, seed)
        response = self.llm.complete(request)
        if response.error:
            return Proposal([], request, response, response.error)
        ideas = parse_ideas(response.text)[:n]
        problem = "" if ideas else "no ideas found in the answer (no <idea> blocks, JSON, list or headings)"
        return Proposal(ideas, request, response, problem)

    def request(self, purpose: str, n: int, shown: list[dict[str, Any]], seed: str) -> LLMRequest:
        """The call that asks for ``n`` ideas (strategy=rl samples its policy with the same prompt)."""
        prompt = prompts.render(purpose, shown=format_shown(purpose, shown), n=n)
        return LLMRequest(
            prompt=prompt,
            purpose=purpose,
            system=prompts.render("ideator_system"),
            prefix=self._prefix,
            cache_key=self._cache_key,
            thinking_budget=self.budgets[purpose],
            context={"n": n, "shown": shown, "seed": seed, "catalog": str(self.env.catalog_path() or "")},
        )


def format_shown(purpose: str, shown: list[dict[str, Any]]) -> str:
    if not shown:
        return "(none yet)"
    lines = []
    for idea in shown:
        if purpose == "ideate":
            lines.append(f"- {idea['title']}")
        elif idea.get("status") == "ok" and idea.get("reward") is not None:
            lines.append(f"- [reward {idea['reward']:.4g}] {idea['title']}: {idea['description']}")
        else:
            lines.append(f"- [{FAILED_MARK}] {idea['title']}: {idea['description']}")
    return "\n".join(lines)
