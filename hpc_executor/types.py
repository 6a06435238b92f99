"""The vocabulary: an Idea becomes a Patch, a Patch runs as a Trial, a Trial ends in one Result.

These are plain dataclasses so that the ledger, the worker and the strategies share one
meaning of each word, and so that each can be written to and read from JSON unchanged.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass, field
from typing import Any


class Status(str, enum.Enum):
    """How a trial ended. Only ``ok`` carries a reward."""

    OK = "ok"
    IMPLEMENT_FAILED = "implement_failed"  # no diff sample applied, even after revisions
    PATCH_REJECTED = "patch_rejected"  # a diff broke the workspace policy (frozen file, `..`, ...)
    CRASHED = "crashed"  # training or evaluation exited non-zero
    TIMEOUT = "timeout"  # killed at the hard limit
    INVALID_RESULT = "invalid_result"  # ran, but the metrics are missing, not finite or tampered with
    CANCELLED = "cancelled"  # cancelled by the user or the scheduler
    DISK_FULL = "disk_full"  # its files (a checkpoint) could not be written: not the idea's fault; runs again on resume

    def __str__(self) -> str:
        return self.value


class TrialState(str, enum.Enum):
    """Where a trial is, from creation to its result."""

    PENDING = "pending"  # created, not submitted
    QUEUED = "queued"  # submitted, its job has not started it (yet, or again after a requeue)
    RUNNING = "running"  # its job started it
    DONE = "done"  # its result is in the ledger

    def __str__(self) -> str:
        return self.value


OPEN_STATES = (TrialState.PENDING, TrialState.QUEUED, TrialState.RUNNING)


class PatchStatus(str, enum.Enum):
    """What the implementer made of an idea (the last two are also the trial's Status)."""

    APPLIED = "applied"
    IMPLEMENT_FAILED = "implement_failed"
    PATCH_REJECTED = "patch_rejected"

    def __str__(self) -> str:
        return self.value


class CallPurpose(str, enum.Enum):
    """What an LLM call was asked for."""

    IDEATE = "ideate"  # sample ideas, shown the ideas so far (epoch 0, best-of-N)
    EXPLOIT = "exploit"  # refine ideas that beat the baseline
    EXPLORE = "explore"  # new directions, shown a random sample of earlier ideas
    IMPLEMENT = "implement"
    REVISE = "revise"  # implement again, told why the last diff failed

    def __str__(self) -> str:
        return self.value


class CallOutcome(str, enum.Enum):
    """What came of an LLM call's answer."""

    OK = "ok"  # an ideator call that gave ideas
    NO_IDEAS = "no_ideas"
    ERROR = "error"  # the provider failed after its retries
    APPLIED = "applied"
    REJECTED = "rejected"  # the diff broke the workspace policy
    FAILED_TO_APPLY = "failed_to_apply"
    NOT_A_DIFF = "not_a_diff"
    TRUNCATED = "truncated"  # cut off at max_tokens

    def __str__(self) -> str:
        return self.value


@dataclass
class Idea:
    """A research idea in plain language, as the ideator wrote it."""

    idea_id: str
    epoch: int
    title: str
    description: str
    kind: str = "sample"  # "sample" (epoch 0 / best-of-N), "exploit" or "explore"
    parents: list[str] = field(default_factory=list)  # idea ids shown as inspiration (exploit)
    llm_call_id: str | None = None


@dataclass
class Patch:
    """The implementer's answer for one idea: the diff that applied, or why none did."""

    idea_id: str
    diff: str | None  # None when no sample applied
    status: str  # a PatchStatus
    reason: str = ""  # the last error, fed back to revisions and shown to the user
    attempts: int = 0  # samples x revisions tried
    llm_call_ids: list[str] = field(default_factory=list)


@dataclass
class Trial:
    """One execution of one patch, as the ledger tracks it from creation to its result."""

    trial_id: str
    idea_id: str
    epoch: int
    trial_dir: str
    state: str = TrialState.PENDING  # a TrialState
    job_id: str | None = None  # scheduler job id, "<array job>_<index>" on Slurm
    array_index: int | None = None
    job_state: str | None = None  # last JobState seen while the trial was open (pending, running, ...)
    submissions: int = 0  # a vanished or preempted job is resubmitted, at most once


def array_index(job_id: str) -> int | None:
    """The array task of a Slurm job id ("123_4" -> 4); None for a plain job."""
    _, sep, index = job_id.partition("_")
    return int(index) if sep and index.isdigit() else None


@dataclass
class Result:
    """What one trial produced. Written once per trial, atomically, by the worker."""

    trial_id: str
    status: Status
    reward: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    runtime_s: float = 0.0
    log_path: str = ""
    log_tail: str = ""
    reason: str = ""  # one line a person can act on when status is not ok
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.status = Status(self.status)
        if self.status is Status.OK and self.reward is None:
            raise ValueError(f"trial {self.trial_id}: an ok result needs a reward")

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["status"] = self.status.value
        return json.dumps(data, sort_keys=True, allow_nan=False, default=str)

    @classmethod
    def from_json(cls, text: str) -> Result:
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})
