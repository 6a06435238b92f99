"""Ideation: filling a generation's empty idea slots with ideator calls, recorded as they land.

A call is prepared (``ask``: which slots, what it is shown, its id) and recorded (``record``: the
call and its ideas in one transaction) by the thread that owns the ledger; only the LLM request
(``propose``) may run elsewhere. ``round`` is the barrier loop's whole round; the steady loop asks
and records one call at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

from hpc_executor import diversity, ids
from hpc_executor.budget import CostMeter
from hpc_executor.ideator import Ideator, Proposal
from hpc_executor.implementer import Call
from hpc_executor.ledger import Ledger
from hpc_executor.strategies import Slot, Strategy
from hpc_executor.types import CallOutcome, CallPurpose, Idea

log = logging.getLogger(__name__)

IDEATION_ATTEMPTS = 3  # calls per group of empty slots before the generation goes on without them

RecordCall = Callable[[str, int, Call, "str | None"], None]
"""(role, epoch, call, idea id or None) -> the call recorded in the ledger."""


@dataclass
class Ask:
    """One ideator call about to be made: the slots it fills and what its prompt shows."""

    epoch: int
    group: list[Slot]
    attempt: int
    purpose: str  # what is asked: an exploit slot with no winner to show explores instead
    shown: list[dict[str, Any]]
    parents: list[str]  # idea ids an exploit call refines
    seed: str
    call_id: str


class Ideation:
    def __init__(
        self,
        ledger: Ledger,
        ideator: Ideator,
        strategy: Strategy,
        meter: CostMeter,
        novelty: diversity.NoveltyFilter | None,
        *,
        seed: int,
        baseline_bar: Callable[[], float],
        record_call: RecordCall,
        note: Callable[[str], None],
        budget_note: Callable[[str], None],
    ) -> None:
        self.ledger = ledger
        self.ideator = ideator
        self.strategy = strategy
        self.meter = meter
        self.novelty = novelty
        self.seed = seed
        self.baseline_bar = baseline_bar  # the reward an idea must exceed to beat the baseline
        self.record_call = record_call
        self.note = note
        self.budget_note = budget_note

    def empty_groups(self, epoch: int) -> list[list[Slot]]:
        """The epoch's empty slots in groups of ``call_size``, each of one purpose."""
        filled = self.ledger.slots_filled(epoch)
        empty = [slot for slot in self.strategy.plan(epoch) if slot.index not in filled]
        call = self.strategy.cfg.call_size
        groups = [empty[i : i + call] for i in range(0, len(empty), call)]
        return [[s for s in g if s.purpose == g[0].purpose] for g in groups]

    def round(self, epoch: int) -> None:
        """Fill the epoch's empty idea slots, in calls of ``call_size``. Ideate calls go one at a time,
        since each is shown the ideas so far; exploit and explore calls, which are shown only earlier
        epochs, go at once."""
        groups = self.empty_groups(epoch)
        for group in (g for g in groups if g[0].purpose == CallPurpose.IDEATE):
            self._fill(epoch, [group])
        self._fill(epoch, [g for g in groups if g[0].purpose != CallPurpose.IDEATE])

    def _fill(self, epoch: int, groups: list[list[Slot]]) -> None:
        """One ideator call per group, all at once; slots a call left empty are asked for again, up
        to IDEATION_ATTEMPTS calls in all."""
        for attempt in range(IDEATION_ATTEMPTS):
            if not groups:
                return
            if self.meter.exhausted():
                self.budget_note(f"epoch {epoch + 1}: {sum(map(len, groups))} idea slots left empty")
                return
            history = self.ledger.outcomes(until_epoch=epoch)
            asks = [self.ask(epoch, group, attempt, history) for group in groups]
            remaining = []
            with ThreadPoolExecutor(max_workers=len(asks), thread_name_prefix="ideate") as pool:
                futures = {pool.submit(self.propose, ask): ask for ask in asks}
                for future in as_completed(futures):
                    if rest := self.record(futures[future], future.result()):
                        remaining.append(rest)
            groups = remaining
        if groups:
            self.note(f"epoch {epoch + 1}: {sum(map(len, groups))} idea slots stay empty after "
                      f"{IDEATION_ATTEMPTS} calls; the epoch goes on without them")  # fmt: skip

    def ask(self, epoch: int, group: list[Slot], attempt: int, history: list[dict[str, Any]]) -> Ask:
        """The call for ``group``, shown what the strategy picks from ``history`` (one dict per idea,
        as ``Ledger.outcomes`` gives them); exploit prompts show the ideas that beat the baseline by
        more than its noise."""
        purpose = group[0].purpose
        shown = self.strategy.shown(purpose, epoch, history, self.baseline_bar())
        effective = CallPurpose.EXPLORE.value if purpose == CallPurpose.EXPLOIT and not shown else purpose
        parents = [h["idea_id"] for h in shown] if effective == CallPurpose.EXPLOIT else []
        call_id = self.ledger.next_call_id(ids.ideator_call_prefix(epoch, effective, group[0].index))
        seed = f"{self.seed}-{epoch}-{group[0].index}-{attempt}"
        return Ask(epoch, group, attempt, effective, shown, parents, seed, call_id)

    def propose(self, ask: Ask) -> Proposal:
        """The LLM request alone: safe to run on any thread."""
        return self.ideator.propose(ask.purpose, len(ask.group), ask.shown, ask.seed)

    def record(self, ask: Ask, proposal: Proposal) -> list[Slot]:
        """Record the call and its ideas together; returns the slots it left empty."""
        epoch, group, call_id = ask.epoch, ask.group, ask.call_id
        self.meter.add(proposal.response.cost_usd)
        outcome = (
            CallOutcome.ERROR
            if proposal.response.error
            else CallOutcome.OK
            if proposal.ideas
            else CallOutcome.NO_IDEAS
        )
        ideas, dropped = self._screen(epoch, group, proposal.ideas)
        with self.ledger.transaction():  # the call and its ideas land together, or not at all
            self.record_call(
                "ideator", epoch, Call(call_id, proposal.request, proposal.response, outcome), None
            )
            if dropped and self.novelty:
                diversity.record_rejections(
                    self.ledger, call_id, epoch, proposal.ideas, dropped, self.novelty.method
                )
            for slot, (title, description) in zip(group, ideas, strict=False):
                idea = Idea(ids.idea_id(epoch, slot.index), epoch, title, description, proposal.request.purpose,
                            ask.parents, call_id)  # fmt: skip
                self.ledger.add_idea(idea, slot.index)
        rest = group[len(ideas) :]
        if dropped:
            self.note(f"epoch {epoch + 1}: the novelty filter dropped {len(dropped)} ideas of {call_id} as "
                      "too close to earlier ones: " + ", ".join(f"{proposal.ideas[p][0]!r} ~ {n} ({s:.2f})"
                                                             for p, n, s in dropped))  # fmt: skip
        if rest and len(proposal.ideas) < len(group):
            self.note(f"epoch {epoch + 1}: ideator call {call_id} gave {len(proposal.ideas)} of "
                      f"{len(group)} ideas ({proposal.problem or 'short answer'})")  # fmt: skip
        return rest

    def _screen(self, epoch: int, group: list[Slot], ideas: list[tuple[str, str]]
                ) -> tuple[list[tuple[str, str]], list[tuple[int, str, float]]]:  # fmt: skip
        """The ideas of a call the novelty filter keeps (all, when it is off), and those it drops."""
        if self.novelty is None or not ideas:
            return ideas, []
        earlier = [(i.idea_id, diversity.idea_text(i.title, i.description)) for i in self.ledger.ideas()
                   if i.kind != "baseline"]  # fmt: skip
        kept, dropped = self.novelty.screen(
            [diversity.idea_text(t, d) for t, d in ideas],
            [ids.idea_id(epoch, s.index) for s in group],
            earlier,
        )
        return [ideas[i] for i in kept], dropped
