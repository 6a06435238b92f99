"""The steady-state loop (``strategy.schedule=steady``): no epoch barrier, every trial slot busy.

When a trial ends, the next ready patch takes its slot at the next poll. Ideation and
implementation run ahead on threads and keep ``strategy.ready_buffer`` patches waiting beyond the
free slots: enough that a slot never waits for the LLM, few enough that what is asked next has
seen the latest results. Only this thread touches the ledger: the threads make LLM calls, and
their answers are recorded here, call and ideas (or calls and patch) in one transaction, as in the
barrier loop; a driver killed at any point loses at most the calls in flight, and running the same
command again asks only for the slots still empty.

The run's ideas are the same ``epochs x batch_size`` slots as in barrier mode, filled in order; an
idea's epoch is its label (the position of its batch), kept for analysis. Evolution counts
generations of ``batch_size`` completed trials instead of epochs: a call's purposes (the exploit
share) come from the generation reached when it is made, and every prompt is shown only ideas whose
trial has completed. Best-of-N is plain sampling at the same budget.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any

from hpc_executor import ids, utilisation
from hpc_executor.ideation import IDEATION_ATTEMPTS, Ask
from hpc_executor.ideator import Proposal
from hpc_executor.implementer import Call
from hpc_executor.strategies import Slot
from hpc_executor.types import Idea, Patch, PatchStatus

if TYPE_CHECKING:
    from hpc_executor.search import Search

log = logging.getLogger("hpc_executor.search")


def trial_limits(in_flight_limit: int, capacity: int | None, ready_buffer: int) -> tuple[int, int]:
    """(slots, trials submitted at most). Where the scheduler queues what it gets (capacity None:
    Slurm), the ready buffer waits in its queue rather than in the driver, so a freed GPU starts the
    next trial at once instead of after a poll and an sbatch; a local scheduler runs what it is
    given, so it gets no more than its slots."""
    if capacity is None:
        return in_flight_limit, in_flight_limit + ready_buffer
    slots = min(capacity, in_flight_limit)
    return slots, slots


class SteadyLoop:
    def __init__(self, search: Search) -> None:
        self.search = search
        s = search.cfg.strategy
        self.epochs, self.batch_size, self.call_size = int(s.epochs), int(s.batch_size), int(s.call_size)
        self.ready_buffer = int(s.ready_buffer)
        # trials in flight at once where the scheduler sets no capacity (Slurm queues what it gets)
        self.in_flight_limit = int(search.cfg.scheduler.max_parallel) or self.batch_size
        self.slots, self.submit_limit = trial_limits(
            self.in_flight_limit, search.scheduler.capacity(search.shape), self.ready_buffer
        )
        self.asking: dict[Future[Proposal], Ask] = {}
        self.implementing: dict[Future[tuple[Patch | None, list[Call]]], Idea] = {}
        self.calls_made: dict[tuple[int, int], int] = {}  # (label, slot) -> ideator calls this session
        self.unimplemented: set[str] = set()  # ideas the LLM budget left without a patch
        self.served = False
        self.created = 0  # trials created in this step

    def run(self) -> bool:
        """Until every idea is asked for, implemented and run; False when a budget stopped it early."""
        search = self.search
        poll_s = float(search.cfg.scheduler.result_poll_s)
        ideate = ThreadPoolExecutor(
            int(search.cfg.model.ideator.max_concurrency), thread_name_prefix="ideate"
        )
        implement = ThreadPoolExecutor(
            self.in_flight_limit + self.ready_buffer, thread_name_prefix="implement"
        )
        try:
            while True:
                self.created = 0
                changed = self._collect() + search.dispatcher.poll() + self._start_trials()
                self._serve()
                self._ask_ahead(ideate, implement)
                self._show(changed)
                busy = bool(self.asking or self.implementing)
                if not (busy or changed) and search.dispatcher.done() and not self._can_go_on():
                    return self._complete()
                if busy:  # wake as soon as an answer is back, or at the next poll
                    futures: list[Future[Any]] = [*self.asking, *self.implementing]
                    wait(futures, timeout=poll_s, return_when=FIRST_COMPLETED)
                else:
                    time.sleep(poll_s)
        finally:  # calls in flight finish on their threads; nothing of them is recorded
            ideate.shutdown(wait=False, cancel_futures=True)
            implement.shutdown(wait=False, cancel_futures=True)

    # -- what is left ----------------------------------------------------------------------------
    def _held(self) -> bool:
        return self.search.gpu_budget.exhausted(self.search.ledger)

    def _askable(self) -> list[tuple[int, int]]:
        """(label, slot) of the empty slots, in order, that no call is filling and that have calls left."""
        busy = {(a.epoch, slot.index) for a in self.asking.values() for slot in a.group}
        ledger = self.search.ledger
        slots = []
        for label in range(self.epochs):
            filled = ledger.slots_filled(label)
            slots += [
                (label, index)
                for index in range(self.batch_size)
                if index not in filled
                and (label, index) not in busy
                and self.calls_made.get((label, index), 0) < IDEATION_ATTEMPTS
            ]
        return slots

    def _to_implement(self) -> list[Idea]:
        busy = {i.idea_id for i in self.implementing.values()}
        ledger = self.search.ledger
        return [
            i
            for i in ledger.ideas()
            if i.idea_id not in self.unimplemented
            and i.idea_id not in busy
            and ledger.patch_for(i.idea_id) is None
        ]

    def _ready(self) -> list[tuple[Idea, Patch]]:
        """Ideas with a patch and no trial yet, in order (the baseline first)."""
        ledger = self.search.ledger
        ready = []
        for idea in ledger.ideas():
            patch = ledger.patch_for(idea.idea_id)
            if patch is not None and not ledger.has_trial(idea.idea_id):
                ready.append((idea, patch))
        return ready

    def _llm_work_left(self) -> bool:
        if self.search.meter.exhausted() or self._held():
            return False
        return bool(self._askable() or self._to_implement())

    def _can_go_on(self) -> bool:
        return self._llm_work_left() or (not self._held() and bool(self._ready()))

    def _complete(self) -> bool:
        search = self.search
        if search.meter.exhausted() and (self._askable() or self.unimplemented):
            search.progress.note(f"stopping: the LLM budget is spent ({search.meter.describe()}); raise "
                                 "budget_usd and run the same command to go on")  # fmt: skip
            return False
        if self._held():
            search.progress.note(f"stopping: the GPU budget is spent ({search.gpu_budget.describe(search.ledger)}); "
                                 "raise budget_gpu_hours and run the same command to go on")  # fmt: skip
            return False
        if empty := sum(n >= IDEATION_ATTEMPTS for n in self.calls_made.values()):
            search.progress.note(f"{empty} idea slots stay empty after {IDEATION_ATTEMPTS} calls each")
        return True

    # -- one step ---------------------------------------------------------------------------------
    def _collect(self) -> int:
        """Record what the threads brought back; returns how many answers."""
        search = self.search
        asked = [f for f in self.asking if f.done()]
        for answer in asked:
            search.ideation.record(self.asking.pop(answer), answer.result())
        finished = [f for f in self.implementing if f.done()]
        for future in finished:
            idea = self.implementing.pop(future)
            patch, calls = future.result()
            if patch is None:  # the LLM budget ran out before any call for it
                self.unimplemented.add(idea.idea_id)
                search.budget_note(f"{len(self.unimplemented)} ideas left unimplemented")
                continue
            search.record_patch(idea.epoch, patch, calls)
        return len(asked) + len(finished)

    def _start_trials(self) -> int:
        """A trial for each ready patch while a slot is free (a patch that did not apply needs none);
        returns how many were created."""
        search = self.search
        if self._held():
            return 0
        room = search.dispatcher.free_slots(self.submit_limit) or 0
        for idea, patch in self._ready():
            applied = patch.status == PatchStatus.APPLIED
            if applied and room <= 0:
                continue
            search.create_baseline_repeats(idea.epoch)  # a label's repeats, once, with its first trial
            search.dispatcher.create(ids.search_trial_id(idea.idea_id), idea.idea_id, idea.epoch, patch,
                                     search.cfg.seed)  # fmt: skip
            room -= applied
            self.created += 1
        return self.created

    def _serve(self) -> None:
        """Served models are up while there is something to ask them, and stopped when nothing is."""
        search = self.search
        if not search.servers.roles_served():
            return
        needed = bool(self.asking or self.implementing) or self._llm_work_left()
        if needed and not self.served:
            search.start_servers()
        elif not needed and self.served:
            search.stop_servers()
        self.served = needed

    def _ask_ahead(self, ideate: ThreadPoolExecutor, implement: ThreadPoolExecutor) -> None:
        """Implement every idea that has no patch, and ask for more ideas, a call of up to
        ``call_size`` at a time, while the patches on their way fall short of the free slots plus
        the buffer."""
        search = self.search
        if search.meter.exhausted() or self._held():
            return
        for idea in self._to_implement():
            self.implementing[implement.submit(search.implementer.implement, idea)] = idea
        # the trials created since the last poll hold slots the dispatcher does not count yet
        free = max(0, (search.dispatcher.free_slots(self.submit_limit) or 0) - self.created)
        coming = len(self._ready()) + len(self.implementing) + sum(len(a.group) for a in self.asking.values())
        want = free + self.ready_buffer - coming
        askable = self._askable() if want > 0 else []
        if not askable:
            return
        history = [h for h in search.ledger.outcomes() if h["status"] is not None]  # what has completed
        generation = min(self.epochs - 1, sum(h["kind"] != "baseline" for h in history) // self.batch_size)
        purposes = {slot.index: slot.purpose for slot in search.strategy.plan(generation)}
        while want > 0 and askable:
            label, first = askable[0]
            same = [
                i for lab, i in askable[: self.call_size] if lab == label and purposes[i] == purposes[first]
            ]
            group = [Slot(i, purposes[i]) for i in same]
            ask = search.ideation.ask(label, group, self.calls_made.get((label, first), 0), history)
            for i in same:
                self.calls_made[(label, i)] = self.calls_made.get((label, i), 0) + 1
            self.asking[ideate.submit(search.ideation.propose, ask)] = ask
            askable = [key for key in askable if key[0] != label or key[1] not in same]
            want -= len(group)

    def _show(self, changed: int) -> None:
        search = self.search
        counts = search.ledger.epoch_progress(None)
        in_flight = sum(len(a.group) for a in self.asking.values()) + len(self.implementing)
        ready = sum(1 for _, p in self._ready() if p.status == PatchStatus.APPLIED)
        spans = search.ledger.db.execute(
            "SELECT started_at, ended_at FROM trials WHERE started_at IS NOT NULL"
        )
        busy = utilisation.from_intervals(spans.fetchall(), self.slots, until=time.time()).busy_share
        search.progress.steady_line(counts["ideas"], self.epochs * self.batch_size, in_flight, ready,
                                    counts["trials"], counts["best"], busy)  # fmt: skip
        search.snapshot_after(changed)
