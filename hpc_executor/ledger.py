"""The ledger: one SQLite file in the run directory, the system of record of a search.

Workers never touch it: each writes one ``result.json`` into its trial directory, and the driver
ingests those files (``INSERT OR IGNORE`` keyed by trial id, so ingesting twice changes nothing).
A poll only looks at trials that are still open, found through a partial index, so its cost grows
with the trials in flight, not with the results already recorded.

SQLite's WAL needs every reader on the writer's host, so the driver also publishes a consistent,
immutable copy (``ledger.snapshot.sqlite``, replaced atomically) that ``load`` reads from any host.
Read a run from pandas::

    from hpc_executor import ledger
    frames = ledger.load("outputs/tiny-offline-evolution-seed0")   # dict of DataFrames (the snapshot)
    ledger.export_parquet("outputs/tiny-offline-evolution-seed0")  # <run>/parquet/*.parquet
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd

from hpc_executor import confirm, diversity, gpu_hours
from hpc_executor.errors import LedgerError
from hpc_executor.rl import records as rl_records
from hpc_executor.trial_dir import RESULT_FILE
from hpc_executor.types import Idea, Patch, Result, Trial, array_index

LEDGER_FILE = "ledger.sqlite"
SNAPSHOT_FILE = "ledger.snapshot.sqlite"  # see Ledger.publish_snapshot and load
TABLES = (
    "ideas",
    "patches",
    "trials",
    "results",
    "llm_calls",
    "trial_usage",
    "confirmations",
    "novelty_rejections",
    "rl_steps",
    "rl_samples",
    "meta",  # key -> value: the run's recorded config (YAML) and identity
)
OPEN_STATES = ("pending", "queued", "running")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS llm_calls (
    call_id TEXT PRIMARY KEY, role TEXT, purpose TEXT, provider TEXT, model TEXT, epoch INTEGER,
    input_tokens INTEGER, output_tokens INTEGER, cost_usd REAL, latency_s REAL, attempts INTEGER,
    error TEXT, prompt TEXT, response TEXT, created_at REAL, outcome TEXT);
CREATE TABLE IF NOT EXISTS ideas (
    idea_id TEXT PRIMARY KEY, epoch INTEGER NOT NULL, slot INTEGER NOT NULL, kind TEXT NOT NULL,
    title TEXT, description TEXT, parents TEXT, llm_call_id TEXT, created_at REAL,
    UNIQUE (epoch, slot));
CREATE TABLE IF NOT EXISTS patches (
    idea_id TEXT PRIMARY KEY REFERENCES ideas, status TEXT NOT NULL, diff TEXT, reason TEXT,
    attempts INTEGER, llm_call_ids TEXT, created_at REAL);
CREATE TABLE IF NOT EXISTS trials (
    trial_id TEXT PRIMARY KEY, idea_id TEXT NOT NULL, epoch INTEGER NOT NULL, trial_dir TEXT,
    state TEXT NOT NULL, job_id TEXT, array_index INTEGER, job_state TEXT, node TEXT, gpus TEXT,
    submissions INTEGER NOT NULL DEFAULT 0, note TEXT, created_at REAL, updated_at REAL);
CREATE INDEX IF NOT EXISTS trials_open ON trials (state) WHERE state IN ('pending', 'queued', 'running');
CREATE INDEX IF NOT EXISTS trials_epoch ON trials (epoch);
CREATE TABLE IF NOT EXISTS submissions (
    token TEXT PRIMARY KEY, trial_ids TEXT NOT NULL, created_at REAL, closed_at REAL);
CREATE TABLE IF NOT EXISTS results (
    trial_id TEXT PRIMARY KEY, status TEXT NOT NULL, reward REAL, metrics TEXT, runtime_s REAL,
    log_path TEXT, log_tail TEXT, reason TEXT, provenance TEXT, ingested_at REAL);
"""

# (table, column, type) added after the first release; a column never changes meaning once added
_ADDED_COLUMNS = [
    ("llm_calls", "outcome", "TEXT"),
    # input tokens the provider's prompt cache wrote and served (both also counted in input_tokens), and
    # what the call would have cost uncached minus cost_usd
    ("llm_calls", "cache_write_tokens", "INTEGER"),
    ("llm_calls", "cache_read_tokens", "INTEGER"),
    ("llm_calls", "cache_saved_usd", "REAL"),
    ("trials", "purpose", "TEXT"),  # NULL: the idea's search trial; baseline_repeat, confirm: extra seeds
    ("trials", "seed", "INTEGER"),  # the seed of an extra trial (search trials run the run's seed)
    ("llm_calls", "idea_id", "TEXT"),  # the idea an implementer call was for (NULL for ideator calls)
    # wall-clock epoch seconds the trial started and ended running (NULL until known), for utilisation:
    # the start from the worker's started file, the end from its result (or when the driver settled it)
    ("trials", "started_at", "REAL"),
    ("trials", "ended_at", "REAL"),
]


# one row per idea with its search trial (extra seeds aside), its result, usage and confirmation
_OUTCOMES_SQL = """
            SELECT i.idea_id, i.epoch, i.kind, i.title, i.description, t.trial_id, t.trial_dir,
                   t.state, t.started_at, t.ended_at, r.status, r.reward, r.reason, r.log_path, r.runtime_s, u.gpu_hours,
                   c.mean AS confirmed_mean, c.std AS confirmed_std, c.runs AS confirmed_runs,
                   c.runs_ok AS confirmed_ok, c.confirmed
            FROM ideas i LEFT JOIN trials t ON t.idea_id = i.idea_id AND t.purpose IS NULL
                         LEFT JOIN results r ON r.trial_id = t.trial_id
                         LEFT JOIN trial_usage u ON u.trial_id = t.trial_id
                         LEFT JOIN confirmations c ON c.idea_id = i.idea_id
"""


class Ledger:
    """Access to one run's ledger. Single writer (the driver); readers on the driver's host may open
    it any time, readers elsewhere read its snapshot (``load``)."""

    def __init__(self, run_dir: str | Path, *, create: bool = False) -> None:
        self.run_dir = Path(run_dir)
        path = self.run_dir / LEDGER_FILE
        if not path.exists() and not create:
            raise LedgerError(
                f"no ledger at {path}: is {self.run_dir} a run directory? Runs live under outputs/<run_name>/."
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # WAL lets notebooks read while the driver writes; autocommit, transactions are explicit.
        self.db = sqlite3.connect(path, isolation_level=None, timeout=30, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA + gpu_hours.USAGE_SCHEMA + confirm.SCHEMA + diversity.REJECTIONS_SCHEMA
                              + rl_records.SCHEMA)  # fmt: skip
        added = self._add_missing_columns()
        self._add_missing_usage()
        if ("trials", "ended_at") in added:
            self._fill_run_times()

    def _add_missing_columns(self) -> set[tuple[str, str]]:
        """Ledgers written before a column existed get it (empty), so old runs resume and load.
        Returns the (table, column) pairs added."""
        added = set()
        for table, column, kind in _ADDED_COLUMNS:
            have = {row["name"] for row in self.db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
                added.add((table, column))
                if (table, column) == ("llm_calls", "idea_id"):
                    self._fill_call_ideas()
        return added

    def _fill_call_ideas(self) -> None:
        """An older ledger's implementer calls get their idea from the patch that lists them."""
        rows = self.db.execute("SELECT idea_id, llm_call_ids FROM patches").fetchall()
        self.db.executemany(
            "UPDATE llm_calls SET idea_id = ? WHERE call_id = ?",
            [(r["idea_id"], call_id) for r in rows for call_id in json.loads(r["llm_call_ids"] or "[]")],
        )

    def _fill_run_times(self) -> None:
        """Finished trials of a ledger from before ``trials.started_at``/``ended_at`` get them from
        their usage row (the worker's start plus its runtime; a result it never ran: when it was ingested)."""
        self.db.execute(
            "UPDATE trials SET started_at = (SELECT u.started_at FROM trial_usage u WHERE u.trial_id = trials.trial_id),"
            " ended_at = (SELECT coalesce(u.ended_at, r.ingested_at) FROM results r"
            " LEFT JOIN trial_usage u USING (trial_id) WHERE r.trial_id = trials.trial_id)"
            " WHERE trial_id IN (SELECT trial_id FROM results)"
        )

    def _add_missing_usage(self) -> None:
        """Results recorded before trial_usage existed get their row, from their provenance."""
        rows = self.db.execute(
            "SELECT r.trial_id, r.runtime_s, r.provenance FROM results r"
            " LEFT JOIN trial_usage u USING (trial_id) WHERE u.trial_id IS NULL"
        ).fetchall()
        usage = [
            gpu_hours.usage_row(r["trial_id"], r["runtime_s"], json.loads(r["provenance"] or "{}"))
            for r in rows
        ]
        if usage:
            self.db.executemany(gpu_hours.INSERT_USAGE, usage)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- meta ---------------------------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row["value"] if row else None

    def set_meta(self, key: str, value: str | None) -> None:
        """Record ``value`` under ``key``; None removes the key."""
        if value is None:
            self.db.execute("DELETE FROM meta WHERE key = ?", (key,))
        else:
            self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    # -- writes ------------------------------------------------------------------------------
    def add_llm_call(self, call_id: str, **fields: Any) -> None:
        """Plain INSERT: a call recorded twice means an idea was asked for twice, a bug to surface."""
        cols = ["call_id", *fields, "created_at"]
        vals = [call_id, *fields.values(), time.time()]
        self.db.execute(
            f"INSERT INTO llm_calls ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", vals
        )

    def next_call_id(self, prefix: str) -> str:
        """``prefix`` plus the next attempt number: one more than the calls recorded under it, in this
        session or an earlier one, so that a resumed run never reuses an id (attempts are recorded
        before the next one is asked for)."""
        (n,) = self.db.execute(
            "SELECT count(*) FROM llm_calls WHERE substr(call_id, 1, ?) = ?", (len(prefix), prefix)
        ).fetchone()
        return f"{prefix}{n}"

    def add_idea(self, idea: Idea, slot: int) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO ideas VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (idea.idea_id, idea.epoch, slot, idea.kind, idea.title, idea.description,
             json.dumps(idea.parents), idea.llm_call_id, time.time()),
        )  # fmt: skip

    def add_patch(self, patch: Patch) -> None:
        self.db.execute(
            "INSERT OR IGNORE INTO patches VALUES (?, ?, ?, ?, ?, ?, ?)",
            (patch.idea_id, patch.status, patch.diff, patch.reason, patch.attempts,
             json.dumps(patch.llm_call_ids), time.time()),
        )  # fmt: skip

    def add_trial(
        self, trial_id: str, idea_id: str, epoch: int, trial_dir: str, state: str = "pending",
        purpose: str | None = None, seed: int | None = None,
    ) -> None:  # fmt: skip
        """``purpose`` and ``seed`` mark an extra seed of an idea (a baseline repeat, a confirmation)."""
        now = time.time()
        self.db.execute(
            "INSERT OR IGNORE INTO trials (trial_id, idea_id, epoch, trial_dir, state, created_at, updated_at,"
            " purpose, seed) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (trial_id, idea_id, epoch, trial_dir, state, now, now, purpose, seed),
        )

    def intend_submission(self, token: str, trial_ids: list[str]) -> None:
        """Record, before submitting, that these trials are about to go out under ``token`` (the
        scheduler can find the jobs by it): a driver killed before ``mark_submitted`` leaves this
        record, and the next one adopts what was submitted instead of submitting it again."""
        self.db.execute(
            "INSERT INTO submissions (token, trial_ids, created_at) VALUES (?, ?, ?)",
            (token, json.dumps(trial_ids), time.time()),
        )

    def open_submissions(self) -> dict[str, tuple[list[str], float]]:
        """Submissions intended but never marked done: token -> (trial ids in order, when)."""
        rows = self.db.execute("SELECT token, trial_ids, created_at FROM submissions WHERE closed_at IS NULL")
        return {r["token"]: (json.loads(r["trial_ids"]), r["created_at"]) for r in rows}

    def mark_submitted(
        self, assignments: Iterable[tuple[str, str, int | None]], token: str | None = None
    ) -> None:
        """(trial_id, job_id, array_index) for trials handed to the scheduler; closes the intended
        submission ``token`` in the same transaction (its trials not named here stay pending)."""
        now = time.time()
        with self.transaction() as db:
            db.executemany(
                "UPDATE trials SET state = 'queued', job_id = ?, array_index = ?,"
                " submissions = submissions + 1, updated_at = ? WHERE trial_id = ?",
                [(job, idx, now, tid) for tid, job, idx in assignments],
            )
            if token is not None:
                db.execute("UPDATE submissions SET closed_at = ? WHERE token = ?", (now, token))

    def set_trial_state(self, trial_id: str, state: str, note: str | None = None, **fields: Any) -> None:
        sets = ["state = ?", "updated_at = ?"] + [f"{k} = ?" for k in fields]
        vals = [state, time.time(), *fields.values()]
        if note is not None:
            sets.append("note = ?")
            vals.append(note)
        self.db.execute(f"UPDATE trials SET {', '.join(sets)} WHERE trial_id = ?", [*vals, trial_id])

    def record_results(self, results: Iterable[Result]) -> int:
        """Insert results and close their trials, in one transaction. Returns how many were new. A
        result that names the job that ran it (the worker's do) makes that the trial's job."""
        results = list(results)
        now = time.time()
        results = list(results)
        rows = [
            (r.trial_id, r.status.value, r.reward, json.dumps(r.metrics), r.runtime_s, r.log_path,
             r.log_tail, r.reason, json.dumps(r.provenance, default=str), now)
            for r in results
        ]  # fmt: skip
        if not rows:
            return 0
        with self.transaction() as db:
            before = db.total_changes
            db.executemany("INSERT OR IGNORE INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
            new = db.total_changes - before
            db.executemany(
                gpu_hours.INSERT_USAGE,
                [gpu_hours.usage_row(r.trial_id, r.runtime_s, r.provenance) for r in results],
            )
            db.executemany(
                "UPDATE trials SET state = 'done', updated_at = ? WHERE trial_id = ? AND state != 'done'",
                [(now, row[0]) for row in rows],
            )
            db.executemany(  # the first result recorded sets them, as it is the one kept
                "UPDATE trials SET started_at = coalesce(?, started_at), ended_at = ? WHERE trial_id = ?"
                " AND ended_at IS NULL",
                [(*run_times(r, now), r.trial_id) for r in results],
            )
            ran = [
                (job, array_index(job), r.trial_id) for r in results if (job := r.provenance.get("job_id"))
            ]
            db.executemany(
                "UPDATE trials SET job_id = ?, array_index = ? WHERE trial_id = ? AND job_id IS NOT ?",
                [(*row, row[0]) for row in ran],
            )
        return new

    def ended_with(self, status: str) -> list[Trial]:
        """The trials whose result has this status."""
        rows = self.db.execute(
            "SELECT t.trial_id, t.idea_id, t.epoch, t.trial_dir, t.state, t.job_id, t.array_index, t.job_state,"
            " t.submissions FROM trials t JOIN results r USING (trial_id) WHERE r.status = ?",
            (status,),
        ).fetchall()
        return [Trial(**dict(r)) for r in rows]

    def reopen_trials(self, trial_ids: list[str], note: str) -> None:
        """Drop these trials' results and make them pending again, in one transaction: an outcome
        that was not the idea's fault (a full disk) runs again."""
        now = time.time()
        with self.transaction() as db:
            db.executemany("DELETE FROM results WHERE trial_id = ?", [(tid,) for tid in trial_ids])
            db.executemany(
                "UPDATE trials SET state = 'pending', job_id = NULL, array_index = NULL, job_state = NULL,"
                " started_at = NULL, ended_at = NULL, note = ?, updated_at = ? WHERE trial_id = ?",
                [(note, now, tid) for tid in trial_ids],
            )

    # -- ingestion ----------------------------------------------------------------------------
    def open_trials(self) -> list[Trial]:
        rows = self.db.execute(
            "SELECT trial_id, idea_id, epoch, trial_dir, state, job_id, array_index, job_state, submissions"
            " FROM trials WHERE state IN ('pending', 'queued', 'running')"
        ).fetchall()
        return [Trial(**dict(r)) for r in rows]

    def ingest(self, result_paths: Iterable[Path]) -> int:
        """Read result files and record them; unreadable files are left for the next poll."""
        results = []
        for path in result_paths:
            try:
                results.append(Result.from_json(path.read_text()))
            except FileNotFoundError:
                continue
            except (ValueError, TypeError) as exc:
                raise LedgerError(f"result file {path} is corrupt ({exc}); move it away and re-run") from exc
        return self.record_results(results)

    def poll(self, result_name: str = RESULT_FILE) -> int:
        """Ingest the results of open trials that have appeared since the last poll."""
        found = [p for trial in self.open_trials() if (p := Path(trial.trial_dir) / result_name).exists()]
        return self.ingest(found)

    # -- reads --------------------------------------------------------------------------------
    def ideas(self, epoch: int | None = None) -> list[Idea]:
        q = (
            "SELECT * FROM ideas"
            + (" WHERE epoch = ?" if epoch is not None else "")
            + " ORDER BY epoch, slot"
        )
        rows = self.db.execute(q, () if epoch is None else (epoch,)).fetchall()
        return [
            Idea(r["idea_id"], r["epoch"], r["title"], r["description"], r["kind"],
                 json.loads(r["parents"] or "[]"), r["llm_call_id"])
            for r in rows
        ]  # fmt: skip

    def slots_filled(self, epoch: int) -> set[int]:
        return {r[0] for r in self.db.execute("SELECT slot FROM ideas WHERE epoch = ?", (epoch,))}

    def patch_for(self, idea_id: str) -> Patch | None:
        r = self.db.execute("SELECT * FROM patches WHERE idea_id = ?", (idea_id,)).fetchone()
        if r is None:
            return None
        return Patch(r["idea_id"], r["diff"], r["status"], r["reason"] or "", r["attempts"] or 0,
                     json.loads(r["llm_call_ids"] or "[]"))  # fmt: skip

    def trial_exists(self, trial_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM trials WHERE trial_id = ?", (trial_id,)).fetchone() is not None

    def has_trial(self, idea_id: str) -> bool:
        """Whether the idea's search trial exists (extra seeds of it aside)."""
        q = "SELECT 1 FROM trials WHERE idea_id = ? AND purpose IS NULL"
        return self.db.execute(q, (idea_id,)).fetchone() is not None

    def outcomes(self, until_epoch: int | None = None) -> list[dict[str, Any]]:
        """One row per idea with its search trial's result (status, reward), for strategies and the
        end table; extra seeds (baseline repeats, confirmations) are read through ``extra_trials``."""
        q = _OUTCOMES_SQL
        params: tuple[Any, ...] = ()
        if until_epoch is not None:
            q += " WHERE i.epoch <= ?"
            params = (until_epoch,)
        return [dict(r) for r in self.db.execute(q + " ORDER BY i.epoch, i.slot", params)]

    def outcomes_frame(self) -> pd.DataFrame:
        """``outcomes()`` as a frame, whose columns exist even while the run has no idea yet."""
        return pd.read_sql_query(_OUTCOMES_SQL + " ORDER BY i.epoch, i.slot", self.db)

    def extra_trials(self, purpose: str) -> list[dict[str, Any]]:
        """Trials of one purpose (baseline_repeat, confirm) with their seed and result, oldest first."""
        q = """
            SELECT t.trial_id, t.idea_id, t.epoch, t.seed, t.state, t.trial_dir, r.status, r.reward
            FROM trials t LEFT JOIN results r USING (trial_id) WHERE t.purpose = ? ORDER BY t.created_at, t.trial_id
        """
        return [dict(r) for r in self.db.execute(q, (purpose,))]

    def epoch_progress(self, epoch: int | None) -> dict[str, Any]:
        """The counts of the progress line: this epoch's ideas (the whole run's for None; the baseline
        aside), how many have a patch, its trials by state, and the best reward of any idea so far."""
        where, params = ("", ()) if epoch is None else (" AND i.epoch = ?", (epoch,))
        ideas, implemented = self.db.execute(
            "SELECT count(*), count(p.idea_id) FROM ideas i LEFT JOIN patches p USING (idea_id)"
            " WHERE i.kind != 'baseline'" + where,
            params,
        ).fetchone()
        trials = dict(
            self.db.execute(
                "SELECT state, count(*) FROM trials"
                + (" WHERE epoch = ?" if where else "")
                + " GROUP BY state",
                params,
            )
        )
        (best,) = self.db.execute(
            "SELECT max(r.reward) FROM results r JOIN trials t USING (trial_id)"
            " WHERE r.status = 'ok' AND t.idea_id != 'baseline' AND t.purpose IS NULL"
        ).fetchone()
        return {"ideas": ideas, "implemented": implemented, "trials": trials, "best": best}

    def rl_samples_frame(self) -> pd.DataFrame:
        """strategy=rl's samples, one row each: step, sample_index, text, thinking_chars, answer_chars,
        idea_id (None when the sample gave no idea), title, description, executed (the trial ran and
        was scored), reward (0.0 for failed; NaN until the step's trials are done)."""
        return rl_records.samples_frame(self)

    def llm_usage(self) -> list[dict[str, Any]]:
        """Calls, failures, tokens and dollars per role, purpose and model, for the end-of-run table."""
        rows = self.db.execute(
            "SELECT role, purpose, provider || ':' || model AS model, count(*) AS calls, count(error) AS failed,"
            " coalesce(sum(input_tokens), 0) AS input_tokens, coalesce(sum(output_tokens), 0) AS output_tokens,"
            " coalesce(sum(cache_write_tokens), 0) AS cache_write_tokens,"
            " coalesce(sum(cache_read_tokens), 0) AS cache_read_tokens,"
            " coalesce(sum(cache_saved_usd), 0.0) AS cache_saved_usd,"
            " coalesce(sum(cost_usd), 0.0) AS cost_usd FROM llm_calls GROUP BY role, purpose, provider, model"
            " ORDER BY role, min(created_at)"
        )
        return [dict(r) for r in rows]

    def spent_usd(self) -> float:
        (spent,) = self.db.execute("SELECT coalesce(sum(cost_usd), 0.0) FROM llm_calls").fetchone()
        return float(spent)

    def frames(self) -> dict[str, pd.DataFrame]:
        return _frames(self.db)

    def publish_snapshot(self) -> Path:
        """Replace the run's snapshot (``ledger.snapshot.sqlite``) with a consistent copy of the
        ledger, atomically: readers on other hosts open it immutable (no lock, no WAL, so NFS and
        Lustre are fine), and see the old copy or the new one, never a mix."""
        path = self.run_dir / SNAPSHOT_FILE
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.unlink(missing_ok=True)
        copy = sqlite3.connect(tmp)
        try:
            self.db.backup(copy)  # one read transaction: a consistent state
            copy.execute("PRAGMA journal_mode=DELETE")  # a single self-contained file
        finally:
            copy.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path


def run_times(result: Result, settled_at: float) -> tuple[float | None, float]:
    """When the trial of this result started and ended running (wall-clock): the worker's own
    clock where it ran (an older worker recorded no end: its start plus its runtime), else
    ``settled_at``, when the driver wrote the result itself (a job that died, a cancel)."""
    started = result.provenance.get("started_at")
    ended = result.provenance.get("ended_at")
    if ended is None and started is not None:
        ended = float(started) + float(result.runtime_s or 0.0)
    return (None if started is None else float(started)), (settled_at if ended is None else float(ended))


def _frames(db: sqlite3.Connection) -> dict[str, pd.DataFrame]:
    frames = {t: pd.read_sql_query(f"SELECT * FROM {t}", db) for t in TABLES}
    for table, cols in {"results": ("metrics", "provenance"), "ideas": ("parents",),
                        "patches": ("llm_call_ids",)}.items():  # fmt: skip
        for col in cols:
            frames[table][col] = frames[table][col].map(lambda s: json.loads(s) if s else None)
    return frames


def load(run_dir: str | Path, *, live: bool = False) -> dict[str, pd.DataFrame]:
    """DataFrames of a run: ideas, patches, trials, results, llm_calls.

    By default from the snapshot the driver publishes: safe from any host (a login node reading a
    run whose driver is on a compute node, over NFS or Lustre), at most ``snapshot_interval_s``
    behind a running driver, exact once it has stopped. ``live=True`` reads the SQLite ledger
    itself (WAL): current to the moment, but safe only on the host the driver runs on. A run
    without a snapshot (made before snapshots existed) is read live."""
    snapshot = Path(run_dir) / SNAPSHOT_FILE
    if not live and snapshot.exists():
        return _load_snapshot(snapshot)
    ledger = Ledger(run_dir)
    try:
        return ledger.frames()
    finally:
        ledger.close()


def _load_snapshot(path: Path, retries: int = 4) -> dict[str, pd.DataFrame]:
    for _ in range(retries):
        try:
            return _read_snapshot(path)
        except (sqlite3.DatabaseError, OSError):  # replaced while read (ESTALE on NFS): read the new one
            time.sleep(0.1)
    return _read_snapshot(path)


def _read_snapshot(path: Path) -> dict[str, pd.DataFrame]:
    db = sqlite3.connect(f"{path.resolve().as_uri()}?immutable=1", uri=True)  # no lock, no -wal/-shm
    try:
        return _frames(db)
    finally:
        db.close()


def export_parquet(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write one parquet file per table (nested columns as JSON text). Returns the folder."""
    out = Path(out_dir) if out_dir else Path(run_dir) / "parquet"
    out.mkdir(parents=True, exist_ok=True)
    for name, frame in load(run_dir).items():
        for col in frame.columns:
            if frame[col].map(lambda v: isinstance(v, (dict, list))).any():
                frame[col] = frame[col].map(json.dumps)
        frame.to_parquet(out / f"{name}.parquet", index=False)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m hpc_executor.ledger", description="Summarise a run's ledger and export it to parquet."
    )
    parser.add_argument("run_dir", help="a run directory, e.g. outputs/tiny-offline-evolution-seed0")
    parser.add_argument("--parquet", action="store_true", help="write <run_dir>/parquet/<table>.parquet")
    parser.add_argument("--live", action="store_true",
                        help="read the SQLite ledger itself, not the driver's snapshot (only on the driver's host)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        frames = load(args.run_dir, live=args.live)
    except LedgerError as exc:
        raise SystemExit(f"error: {exc}") from None
    for name, frame in frames.items():
        print(f"{name:10s} {len(frame):6d} rows")
    if args.parquet:
        print(f"parquet written to {export_parquet(args.run_dir)}")


if __name__ == "__main__":
    main()
