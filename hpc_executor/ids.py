"""Every id of a run, built in one place, so that a resumed run builds the same ones.

An idea is named by the slot it fills (``e<epoch>-<slot>``), its search trial by the idea
(``<idea>-t0``), an ideator call by its epoch, purpose, first slot and attempt
(``e<epoch>-<purpose>-<slot>-a<n>``), an implementer call by its idea, sample and revision
(``<idea>-s<sample>-r<revision>``). Ids are never parsed back: the ledger stores what they name.
"""

from __future__ import annotations

BASELINE_IDEA = "baseline"  # the unmodified baseline, run like an idea


def idea_id(epoch: int, slot: int) -> str:
    """The idea that fills a slot: one per slot, so a resumed run never asks for it twice."""
    return f"e{epoch}-{slot:03d}"


def search_trial_id(idea: str) -> str:
    """The trial that runs an idea's patch for the search (extra seeds have ids of their own)."""
    return f"{idea}-t0"


def ideator_call_prefix(epoch: int, purpose: str, first_slot: int) -> str:
    """The calls for one group of slots; the ledger appends the attempt number (``next_call_id``)."""
    return f"e{epoch}-{purpose}-{first_slot}-a"


def implementer_call_id(idea: str, sample: int, revision: int) -> str:
    return f"{idea}-s{sample}-r{revision}"


def baseline_repeat_id(epoch: int, repeat: int) -> str:
    """A run of the baseline on a further seed (noise.baseline_repeats): epoch 0's, then every
    ``noise.repeat_every`` epochs'."""
    return f"{BASELINE_IDEA}-r{repeat}" if epoch == 0 else f"{BASELINE_IDEA}-e{epoch}-r{repeat}"


def confirm_trial_id(idea: str, seed_index: int) -> str:
    """A confirmation run of an idea on a fresh seed."""
    return f"{idea}-c{seed_index}"
