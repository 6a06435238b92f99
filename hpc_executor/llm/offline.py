"""The offline model: a scripted stand-in, NOT an LLM.

It lets anyone run the whole pipeline without keys or network. Ideas come from the environment's
idea catalog (``environments/<env>/catalog.yaml``): epoch-0 and explore calls sample entries not yet
tried, exploit calls perturb the parameters of ideas that beat the baseline or combine two of them.
Each idea carries its recipe in its description, e.g. ``(recipe: cosine_schedule lr_max=2e-3 |
weight_tying)``, and the implementer side turns that recipe back into the catalog's diffs, which
then go through the same patching and revision path as an LLM's answer. Some catalog diffs fail on
purpose (crash, time out, tamper with the evaluator, miscount hunk headers) so that every failure
path of the system is exercised.

``latency_s`` makes every call take that long (at most ``max_concurrency`` at once, as at a
provider's endpoint), so that a benchmark's calls take seconds as a thinking model's do; the
answers stay the scripted ones.
"""

from __future__ import annotations

import difflib
import itertools
import random
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from hpc_executor.errors import ConfigError, HpcExecutorError
from hpc_executor.llm.base import LLM, LLMRequest, LLMResponse, LLMSpec
from hpc_executor.llm.limits import limiter_for
from hpc_executor.patching import WorkspacePolicy, apply_diff
from hpc_executor.trial_dir import copy_baseline

_RECIPE = re.compile(r"\(recipe: ([^)]*)\)")
_PARAMS = re.compile(r"\([^)]*\)")  # "Raise the learning rate (lr=0.3)": the bracket is the parameters
MATCH_CUTOFF = 0.8  # difflib's ratio at or above which a sampled title or id names a catalog entry
LABEL = "offline scripted stand-in (not an LLM)"


@dataclass(frozen=True)
class Step:
    """One catalog entry with chosen parameter values."""

    entry_id: str
    params: tuple[tuple[str, str], ...] = ()

    def render(self) -> str:
        return " ".join([self.entry_id, *(f"{k}={v}" for k, v in self.params)])

    @classmethod
    def parse(cls, text: str) -> Step:
        entry_id, *pairs = text.split()
        return cls(entry_id, tuple(tuple(p.split("=", 1)) for p in pairs if p.partition("=")[2]))  # type: ignore[misc]


def recipe_of(description: str) -> list[Step]:
    """The steps of a description's recipe; an empty part or a parameter without a value (sampled
    text garbles them) is left out (``catalog_recipe`` gives it its first value)."""
    match = _RECIPE.search(description or "")
    return [Step.parse(part) for part in match.group(1).split("|") if part.split()] if match else []


def catalog_recipe(title: str, description: str, catalog: dict[str, dict[str, Any]]) -> list[Step]:
    """The catalog entries an idea names, tolerant of sampled text (strategy=rl's policy writes the
    ideas): its recipe, with entry ids a sampler misspelled corrected; else the entries its title
    names, one per part of an "A + B" title, at their first parameter values; [] when it names none."""
    steps = [_known(step, catalog) for step in recipe_of(description)]
    if steps and all(steps):
        return [s for s in steps if s]
    by_title = [_entry_titled(part, catalog) for part in title.split(" + ")]
    if not all(by_title):
        return []
    return [Step(k, OfflineLLM._default_params(catalog[k])) for k in by_title if k]


def _known(step: Step, catalog: dict[str, dict[str, Any]]) -> Step | None:
    """The step with its entry id corrected, and the parameters it lacks at their first values."""
    close = [step.entry_id] if step.entry_id in catalog else difflib.get_close_matches(
        step.entry_id, list(catalog), n=1, cutoff=MATCH_CUTOFF)  # fmt: skip
    if not close:
        return None
    given = dict(step.params)
    missing = tuple(p for p in OfflineLLM._default_params(catalog[close[0]]) if p[0] not in given)
    return Step(close[0], step.params + missing)


def _entry_titled(title: str, catalog: dict[str, dict[str, Any]]) -> str | None:
    """The entry whose title this is, parameters in brackets and case aside, up to a few typos."""
    wanted = _PARAMS.sub("", title).strip().lower()
    titles = {str(e["title"]).lower(): k for k, e in catalog.items()}
    close = difflib.get_close_matches(wanted, list(titles), n=1, cutoff=MATCH_CUTOFF)
    return titles[close[0]] if close else None


@cache
def load_catalog(path: str) -> dict[str, dict[str, Any]]:
    if not path or not Path(path).is_file():
        raise ConfigError(
            f"the offline stand-in needs the environment's idea catalog, and {path or 'env.catalog'} "
            "does not exist; set env.catalog, or use a real model (+model=opus)"
        )
    entries = yaml.safe_load(Path(path).read_text())
    return {e["id"]: e for e in entries}


class OfflineLLM(LLM):
    def __init__(self, spec: LLMSpec, sleep: Callable[[float], None] = time.sleep) -> None:
        super().__init__(spec)
        if spec.latency_s < 0:
            raise ConfigError(f"latency_s is {spec.latency_s}; give the seconds each call takes, 0 or more")
        self._limiter = limiter_for(spec)
        self._sleep = sleep  # injectable so tests own the clock

    @property
    def label(self) -> str:
        return LABEL

    def complete(self, request: LLMRequest) -> LLMResponse:
        start = time.monotonic()
        catalog = load_catalog(request.context.get("catalog", ""))
        if request.purpose in ("ideate", "explore", "exploit"):
            text = self._ideas(request, catalog)
        else:
            text = self._diff(request, catalog)
        if self.spec.latency_s:
            with self._limiter:
                self._sleep(self.spec.latency_s)
        return LLMResponse(text=text, model=LABEL, input_tokens=len(request.user_text) // 4,
                           output_tokens=len(text) // 4, latency_s=time.monotonic() - start)  # fmt: skip

    # -- ideas ----------------------------------------------------------------------------------
    def _ideas(self, request: LLMRequest, catalog: dict[str, dict[str, Any]]) -> str:
        ctx = request.context
        rng = random.Random(f"{ctx.get('seed', 0)}-{request.purpose}-{len(ctx.get('shown', []))}")
        shown = ctx.get("shown", [])
        if request.purpose == "exploit":
            recipes = self._exploit(shown, catalog, rng, ctx["n"])
        else:
            recipes = self._fresh(shown, catalog, rng, ctx["n"])
        return "\n\n".join(self.idea_text(r, catalog) for r in recipes)

    def _fresh(self, shown: list[dict[str, Any]], catalog: dict[str, dict[str, Any]],
               rng: random.Random, n: int) -> list[list[Step]]:  # fmt: skip
        recipes = [recipe_of(idea.get("description", "")) for idea in shown]
        tried = {s.entry_id for recipe in recipes for s in recipe}
        untried = [k for k in catalog if k not in tried]
        rng.shuffle(untried)
        picks = [[Step(k, self._default_params(catalog[k]))] for k in untried[:n]]
        if len(picks) < n:  # catalog exhausted: other parameter values of ideas tried before
            seen = {frozenset(r) for r in recipes}
            variants = [
                v
                for k in catalog
                for v in self._perturbations([Step(k)], catalog)
                if frozenset(v) not in seen
            ]
            rng.shuffle(variants)
            picks += variants[: n - len(picks)]
        return picks

    def _exploit(self, shown: list[dict[str, Any]], catalog: dict[str, dict[str, Any]],
                 rng: random.Random, n: int) -> list[list[Step]]:  # fmt: skip
        """Refine the winners, best first: new parameter values of one winner, or a combination of
        two, taking turns among the winners. Never a recipe already shown; when nothing is left to
        refine, fresh ideas fill the call."""
        winners = [recipe_of(i.get("description", "")) for i in shown]
        winners = [w for w in winners if w and all(s.entry_id in catalog for s in w)]
        per_winner = []
        for i, best in enumerate(winners):
            options = self._perturbations(best, catalog)
            rng.shuffle(options)
            combos = [best + [s for s in other if s.entry_id not in {b.entry_id for b in best}]
                      for other in winners[i + 1 :]]  # fmt: skip
            # alternate refinements and combinations within each winner's list
            per_winner.append([c for pair in itertools.zip_longest(options, combos) for c in pair if c])
        seen = {frozenset(w) for w in winners}
        picks: list[list[Step]] = []
        for candidate in (c for turn in itertools.zip_longest(*per_winner) for c in turn if c):
            if len(picks) == n:
                break
            if frozenset(candidate) not in seen:
                seen.add(frozenset(candidate))
                picks.append(candidate)
        return picks + self._fresh(shown, catalog, rng, n - len(picks))

    def _perturbations(self, recipe: list[Step], catalog: dict[str, dict[str, Any]]) -> list[list[Step]]:
        """The recipe with one parameter of one step set to another value of its range."""
        variants = []
        for i, step in enumerate(recipe):
            space = catalog[step.entry_id].get("params") or {}
            current = dict(step.params) or dict(self._default_params(catalog[step.entry_id]))
            for name, values in sorted(space.items()):
                for value in map(str, values):
                    if value != current.get(name):
                        changed = Step(step.entry_id, tuple(sorted({**current, name: value}.items())))
                        variants.append([*recipe[:i], changed, *recipe[i + 1 :]])
        return variants

    @staticmethod
    def _default_params(entry: dict[str, Any]) -> tuple[tuple[str, str], ...]:
        return tuple((k, str(v[0])) for k, v in (entry.get("params") or {}).items())

    @staticmethod
    def idea_text(recipe: list[Step], catalog: dict[str, dict[str, Any]]) -> str:
        """One idea in the prompt's format, its recipe at the end of the description (what the
        implementer side reads back); the tiny RL policy warms up on these too."""
        titles = []
        for step in recipe:
            title = catalog[step.entry_id]["title"]
            if step.params:
                title += " (" + ", ".join(f"{k}={v}" for k, v in step.params) + ")"
            titles.append(title)
        description = " ".join(" ".join(str(catalog[s.entry_id]["description"]).split()) for s in recipe)
        rendered = " | ".join(s.render() for s in recipe)
        return (f"<idea>\n<title>{' + '.join(titles)}</title>\n<description>{description} "
                f"(recipe: {rendered})</description>\n</idea>")  # fmt: skip

    # -- diffs ----------------------------------------------------------------------------------
    def _diff(self, request: LLMRequest, catalog: dict[str, dict[str, Any]]) -> str:
        ctx = request.context
        recipe = catalog_recipe(ctx["idea"]["title"], ctx["idea"]["description"], catalog)
        if not recipe:
            return "I cannot implement this idea: it is not from the catalog (offline scripted stand-in)."
        revising = ctx.get("revision", 0) > 0
        diffs = [self._entry_diff(catalog[s.entry_id], s, revising) for s in recipe]
        if len(diffs) > 1 and revising:
            diffs = diffs[:1]  # the merged diff failed: fall back to the first idea alone
        diff = diffs[0] if len(diffs) == 1 else self._merge(diffs, Path(ctx["baseline_dir"]))
        return f"Here is the change (offline scripted stand-in):\n\n```diff\n{diff}```\n"

    @staticmethod
    def _entry_diff(entry: dict[str, Any], step: Step, revising: bool) -> str:
        diff: str = entry["revised_diff"] if revising and entry.get("revised_diff") else entry["diff"]
        for name, value in step.params:
            diff = diff.replace(f"<<{name}>>", value)
        return diff

    @staticmethod
    def _merge(diffs: list[str], baseline_dir: Path) -> str:
        """One diff with every step applied in turn, as a model combining ideas would write it; if
        they conflict, the plain concatenation (which then fails and is revised)."""
        allow_all = WorkspacePolicy(editable=("*", "**/*"), protected=())
        with tempfile.TemporaryDirectory(prefix="hpcx-offline-") as tmp:
            before, after = Path(tmp) / "a", Path(tmp) / "b"
            copy_baseline(baseline_dir, before)
            copy_baseline(baseline_dir, after)
            try:
                for diff in diffs:
                    apply_diff(diff, after, allow_all)
            except HpcExecutorError:
                return "".join(diffs)
            return tree_diff(before, after)


def tree_diff(before: Path, after: Path) -> str:
    """A unified diff between two trees with a/ and b/ paths relative to their roots."""
    out: list[str] = []
    for path in sorted(p for p in after.rglob("*") if p.is_file()):
        rel = path.relative_to(after).as_posix()
        old = before / rel
        a = old.read_text().splitlines(keepends=True) if old.exists() else []
        b = path.read_text().splitlines(keepends=True)
        if a != b:
            out.extend(difflib.unified_diff(a, b, f"a/{rel}", f"b/{rel}"))
    return "".join(out)
