"""strategy=rl's tables in the ledger: one row per RL step and one per sample.

A step moves through ``sampled`` (its samples and their ideas recorded in one transaction),
``executed`` (every sample rewarded, with its shaped reward and advantage), ``updating`` (the policy
update is about to run: recorded before it starts, so that a resumed driver adopts a finished
version instead of taking the step twice) and ``updated`` (the version the step produced). The
prompt and its token ids are the same for every sample of a step, so they are kept once, with the
step. Token ids and log-probs are packed arrays (int32, float64) so that a paper-sized run (128
samples of 2,000 tokens for 70 steps) stays a few hundred megabytes.
"""

from __future__ import annotations

import json
import time
from array import array
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pandas as pd

from hpc_executor.rl.policy import PolicyVersion, Sample

if TYPE_CHECKING:  # the ledger includes this module's schema
    from hpc_executor.ledger import Ledger

SAMPLED, EXECUTED, UPDATING, UPDATED = "sampled", "executed", "updating", "updated"

SCHEMA = """
CREATE TABLE IF NOT EXISTS rl_steps (
    step INTEGER PRIMARY KEY, state TEXT NOT NULL, policy_step INTEGER NOT NULL, policy_path TEXT,
    prompt TEXT, prompt_tokens BLOB, version_step INTEGER, version_path TEXT, update_note TEXT,
    update_attempts INTEGER NOT NULL DEFAULT 0, error TEXT, metrics TEXT, created_at REAL, updated_at REAL);
CREATE TABLE IF NOT EXISTS rl_samples (
    step INTEGER NOT NULL REFERENCES rl_steps, sample_index INTEGER NOT NULL, policy_step INTEGER NOT NULL,
    policy_path TEXT, tokens BLOB, logprobs BLOB, text TEXT, thinking_chars INTEGER, answer_chars INTEGER,
    idea_id TEXT, no_idea_reason TEXT, reward REAL, shaped_reward REAL, advantage REAL,
    PRIMARY KEY (step, sample_index));
"""

# The samples frame the RL metrics read (hpc_executor.rl.metrics): exactly these columns.
SAMPLES_FRAME_SQL = """
    SELECT s.step, s.sample_index, s.text, s.thinking_chars, s.answer_chars, s.idea_id, i.title,
           i.description, coalesce(r.status = 'ok', 0) AS executed, s.reward
    FROM rl_samples s LEFT JOIN ideas i ON i.idea_id = s.idea_id
                      LEFT JOIN trials t ON t.idea_id = s.idea_id AND t.purpose IS NULL
                      LEFT JOIN results r ON r.trial_id = t.trial_id
    ORDER BY s.step, s.sample_index
"""


def pack_ints(values: list[int]) -> bytes:
    return array("i", values).tobytes()


def pack_floats(values: list[float]) -> bytes:
    return array("d", values).tobytes()


def unpack_ints(blob: bytes | None) -> list[int]:
    out = array("i")
    out.frombytes(blob or b"")
    return out.tolist()


def unpack_floats(blob: bytes | None) -> list[float]:
    out = array("d")
    out.frombytes(blob or b"")
    return out.tolist()


@dataclass(frozen=True)
class ParsedSample:
    """A drawn sample and what it became: an idea (title, description) or the reason it became none."""

    sample: Sample
    thinking_chars: int
    answer_chars: int
    idea: tuple[str, str] | None
    no_idea_reason: str | None
    idea_id: str | None


@dataclass(frozen=True)
class StepRow:
    step: int
    state: str
    drawn_by: PolicyVersion  # the version that sampled the step
    produced: PolicyVersion | None  # the version the update made (or kept), once intended
    update_attempts: int
    error: str | None


def insert_step(ledger: Ledger, step: int, drawn_by: PolicyVersion, prompt: str,
                prompt_tokens: list[int], samples: list[ParsedSample]) -> None:  # fmt: skip
    """The step and its samples (call inside the transaction that records their ideas)."""
    now = time.time()
    ledger.db.execute(
        "INSERT INTO rl_steps (step, state, policy_step, policy_path, prompt, prompt_tokens, created_at,"
        " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (step, SAMPLED, drawn_by.step, drawn_by.path, prompt, pack_ints(prompt_tokens), now, now),
    )
    ledger.db.executemany(
        "INSERT INTO rl_samples (step, sample_index, policy_step, policy_path, tokens, logprobs, text,"
        " thinking_chars, answer_chars, idea_id, no_idea_reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(step, i, drawn_by.step, drawn_by.path, pack_ints(p.sample.tokens), pack_floats(p.sample.logprobs),
          p.sample.text, p.thinking_chars, p.answer_chars, p.idea_id, p.no_idea_reason)
         for i, p in enumerate(samples)],
    )  # fmt: skip


def set_rewards(ledger: Ledger, step: int, rewards: list[float], shaped: list[float],
                advantages: list[float]) -> None:  # fmt: skip
    ledger.db.executemany(
        "UPDATE rl_samples SET reward = ?, shaped_reward = ?, advantage = ? WHERE step = ? AND sample_index = ?",
        [(r, s, a, step, i) for i, (r, s, a) in enumerate(zip(rewards, shaped, advantages, strict=True))],
    )


def set_executed(ledger: Ledger, step: int, metrics: dict[str, Any]) -> None:
    """The step is rewarded (call in the transaction of ``set_rewards``); ``metrics``: its row of the step metrics."""
    _set_state(ledger, step, EXECUTED, metrics=json.dumps(metrics, default=lambda v: v.item()))


def intend_update(ledger: Ledger, step: int, version: PolicyVersion) -> None:
    """Recorded before the update starts: the version it is to write, and one more attempt."""
    ledger.db.execute(
        "UPDATE rl_steps SET state = ?, version_step = ?, version_path = ?, update_attempts = update_attempts + 1,"
        " updated_at = ? WHERE step = ?",
        (UPDATING, version.step, version.path, time.time(), step),
    )


def record_update(ledger: Ledger, step: int, version: PolicyVersion, note: str | None = None) -> None:
    """The version the step produced (a skipped update keeps the one that drew it); clears an earlier error."""
    ledger.db.execute(
        "UPDATE rl_steps SET state = ?, version_step = ?, version_path = ?, update_note = ?, error = NULL,"
        " updated_at = ? WHERE step = ?",
        (UPDATED, version.step, version.path, note, time.time(), step),
    )


def record_update_error(ledger: Ledger, step: int, error: str) -> None:
    _set_state(ledger, step, UPDATING, error=error)


def steps(ledger: Ledger) -> dict[int, StepRow]:
    rows = ledger.db.execute(
        "SELECT step, state, policy_step, policy_path, version_step, version_path, update_attempts, error"
        " FROM rl_steps ORDER BY step"
    ).fetchall()
    return {
        r["step"]: StepRow(
            r["step"], r["state"], PolicyVersion(r["policy_step"], r["policy_path"]),
            None if r["version_step"] is None else PolicyVersion(r["version_step"], r["version_path"]),
            r["update_attempts"], r["error"],
        )
        for r in rows
    }  # fmt: skip


def step_samples(ledger: Ledger, step: int) -> list[dict[str, Any]]:
    """The step's samples in order, token ids and log-probs unpacked, with the step's prompt tokens."""
    (prompt_tokens,) = ledger.db.execute(
        "SELECT prompt_tokens FROM rl_steps WHERE step = ?", (step,)
    ).fetchone()
    rows = ledger.db.execute(
        "SELECT * FROM rl_samples WHERE step = ? ORDER BY sample_index", (step,)
    ).fetchall()
    return [
        dict(r) | {"tokens": unpack_ints(r["tokens"]), "logprobs": unpack_floats(r["logprobs"]),
                   "prompt_tokens": unpack_ints(prompt_tokens)}
        for r in rows
    ]  # fmt: skip


def samples_frame(ledger: Ledger) -> pd.DataFrame:
    frame = pd.read_sql_query(SAMPLES_FRAME_SQL, ledger.db)
    frame["executed"] = frame["executed"].astype(bool)
    frame["idea_id"] = frame["idea_id"].astype(object).where(frame["idea_id"].notna(), None)
    return frame


def _set_state(ledger: Ledger, step: int, state: str, **fields: Any) -> None:
    sets = ", ".join(["state = ?", "updated_at = ?", *(f"{k} = ?" for k in fields)])
    ledger.db.execute(
        f"UPDATE rl_steps SET {sets} WHERE step = ?", (state, time.time(), *fields.values(), step)
    )
