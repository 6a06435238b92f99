"""The offline scripted stand-in goes through the same implementer path as an LLM: revisions,
hunk-header repair, rejections; and its ideas explore, perturb and combine catalog entries."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import quick_env_config

from hpc_executor.environment import Environment
from hpc_executor.ideator import Ideator
from hpc_executor.implementer import Implementer
from hpc_executor.llm import LLMSpec
from hpc_executor.llm.offline import OfflineLLM, recipe_of
from hpc_executor.types import Idea


@pytest.fixture
def env() -> Environment:
    return Environment(quick_env_config())


def offline() -> OfflineLLM:
    return OfflineLLM(LLMSpec(provider="offline", model="scripted-stand-in"))


def idea_for(recipe: str) -> Idea:
    return Idea("e0-000", 0, "t", f"Some idea. (recipe: {recipe})")


def implement(env: Environment, recipe: str, revisions: int = 2):
    return Implementer(offline(), env, samples=1, revisions=revisions, thinking_budget=0).implement(
        idea_for(recipe)
    )


def test_a_stale_diff_is_revised_with_the_error_fed_back(env: Environment) -> None:
    patch, calls = implement(env, "stale_context")
    assert patch.status == "applied" and "+STEPS = 30" in patch.diff
    assert [c.request.purpose for c in calls] == ["implement", "revise"]
    assert "could not be used" in calls[1].request.prompt and calls[1].request.context["error"]


def test_miscounted_hunk_headers_are_repaired(env: Environment) -> None:
    patch, calls = implement(env, "more_steps")
    assert patch.status == "applied" and len(calls) == 1
    assert "@@ -1,3 +1,3 @@" in patch.diff


def test_a_diff_to_the_evaluator_is_rejected_after_its_revisions(env: Environment) -> None:
    patch, calls = implement(env, "edit_evaluator")
    assert patch.status == "patch_rejected" and patch.diff is None
    assert "evaluate.py" in patch.reason and len(calls) == 3


def test_ideas_outside_the_catalog_fail_to_implement_with_a_reason(env: Environment) -> None:
    patch, _ = Implementer(offline(), env, 1, 0, 0).implement(Idea("x", 0, "Free idea", "No recipe here."))
    assert patch.status == "implement_failed"
    assert "non-diff output" in patch.reason and "not from the catalog" in patch.reason


def test_parameters_are_substituted(env: Environment) -> None:
    patch, _ = implement(env, "higher_lr lr=0.4")
    assert "+LEARNING_RATE = 0.4" in patch.diff and "<<" not in patch.diff


def test_combined_ideas_become_one_diff(env: Environment) -> None:
    patch, _ = implement(env, "higher_lr lr=0.3 | momentum beta=0.5")
    assert patch.status == "applied"
    assert "+LEARNING_RATE = 0.3" in patch.diff and "+MOMENTUM = 0.5" in patch.diff


def ideator(env: Environment) -> Ideator:
    return Ideator(offline(), env, 0, 0)


def test_fresh_ideas_are_untried_catalog_entries(env: Environment) -> None:
    first = ideator(env).propose("ideate", 3, [], seed="s").ideas
    shown = [{"title": t, "description": d} for t, d in first]
    second = ideator(env).propose("explore", 3, shown, seed="s").ideas
    ids = [recipe_of(d)[0].entry_id for _, d in first + second]
    assert len(ids) == len(set(ids)) == 6, "six different catalog entries before any repeats"


def test_exploit_refines_and_combines_winners(env: Environment) -> None:
    winners = [{"title": "a", "description": "(recipe: higher_lr lr=0.3)", "status": "ok", "reward": 10.0},
               {"title": "b", "description": "(recipe: momentum beta=0.5)", "status": "ok", "reward": 9.9}]  # fmt: skip
    proposal = ideator(env).propose("exploit", 4, winners, seed="s")
    recipes = [recipe_of(d) for _, d in proposal.ideas]
    assert len(recipes) == 4
    assert any(len(r) == 2 for r in recipes), "some exploit ideas combine two winners"
    assert {s.entry_id for r in recipes for s in r} <= {"higher_lr", "momentum"}


def test_labelled_as_a_scripted_stand_in(env: Environment, tmp_path: Path) -> None:
    assert "not an LLM" in offline().label
    assert "scripted stand-in" in implement(env, "crash")[1][0].response.text


def test_when_the_catalog_is_exhausted_new_parameter_values_are_tried(env: Environment) -> None:
    everything = ideator(env).propose("ideate", 6, [], seed="s").ideas
    shown = [{"title": t, "description": d} for t, d in everything]
    more = ideator(env).propose("ideate", 2, shown, seed="s").ideas
    old = {frozenset(recipe_of(d)) for _, d in everything}
    new = [frozenset(recipe_of(d)) for _, d in more]
    assert len(new) == 2 and not set(new) & old
    assert all(any(step.params for step in recipe) for recipe in new)


def test_a_garbled_recipe_keeps_only_what_parses() -> None:
    # what a tiny sampled model writes: a parameter without a value, an empty part, words that are
    # no parameters; catalog_recipe then corrects the ids and fills the missing values
    assert [s.render() for s in recipe_of("Raise it. (recipe: huge_lr lr ofpo)")] == ["huge_lr"]
    assert recipe_of("(recipe: )") == []
    assert [s.render() for s in recipe_of("(recipe: higher_lr lr=1e-3 | )")] == ["higher_lr lr=1e-3"]
    steps = recipe_of("Combine. (recipe: cosine_schedule lr_max=2e-3 | weight_tying)")
    assert [s.render() for s in steps] == ["cosine_schedule lr_max=2e-3", "weight_tying"]
