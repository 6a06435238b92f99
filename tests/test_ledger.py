"""The ledger: idempotent ingestion, polls that only look at open trials, pandas and parquet."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from hpc_executor import ledger as ledger_module
from hpc_executor.errors import LedgerError
from hpc_executor.ledger import Ledger
from hpc_executor.trial_dir import RESULT_FILE, write_atomic
from hpc_executor.types import Idea, Patch, Result, Status


def fill(ledger: Ledger, run_dir: Path, n: int, epoch: int = 0) -> list[Path]:
    dirs = []
    for i in range(n):
        idea = Idea(f"e{epoch}-{i:03d}", epoch, f"idea {i}", "desc")
        ledger.add_idea(idea, slot=i)
        ledger.add_patch(Patch(idea.idea_id, "diff", "applied"))
        trial_dir = run_dir / "trials" / f"{idea.idea_id}-t0"
        trial_dir.mkdir(parents=True)
        ledger.add_trial(f"{idea.idea_id}-t0", idea.idea_id, epoch, str(trial_dir))
        dirs.append(trial_dir)
    return dirs


def write_result(trial_dir: Path, reward: float = 1.0) -> None:
    result = Result(trial_dir.name, Status.OK, reward=reward, metrics={"loss": 1 / reward})
    write_atomic(trial_dir / RESULT_FILE, result.to_json())


def test_ingesting_twice_changes_nothing(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, create=True)
    dirs = fill(ledger, tmp_path, 3)
    for d in dirs[:2]:
        write_result(d)
    assert ledger.poll() == 2
    assert ledger.poll() == 0
    assert ledger.ingest([d / RESULT_FILE for d in dirs]) == 0, "already ingested files add nothing"
    frames = ledger.frames()
    assert len(frames["results"]) == 2
    assert sorted(frames["trials"].state) == ["done", "done", "pending"]
    assert ledger.epoch_progress(0) == {
        "ideas": 3,
        "implemented": 3,
        "trials": {"done": 2, "pending": 1},
        "best": 1.0,
    }


def test_poll_only_reads_open_trials(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, create=True)
    dirs = fill(ledger, tmp_path, 2)
    write_result(dirs[0], reward=2.0)
    ledger.poll()
    # a result file rewritten after ingestion is not read again: the trial is closed
    write_result(dirs[0], reward=99.0)
    write_result(dirs[1], reward=3.0)
    assert ledger.poll() == 1
    rewards = dict(ledger.db.execute("SELECT trial_id, reward FROM results").fetchall())
    assert rewards == {dirs[0].name: 2.0, dirs[1].name: 3.0}
    plan = " ".join(
        r[-1]
        for r in ledger.db.execute(
            "EXPLAIN QUERY PLAN SELECT trial_id FROM trials WHERE state IN ('pending', 'queued', 'running')"
        )
    )
    assert "trials_open" in plan, f"the open-trials poll must use the partial index, got: {plan}"


def test_corrupt_result_file_is_an_error_that_says_what_to_do(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, create=True)
    (d,) = fill(ledger, tmp_path, 1)
    (d / RESULT_FILE).write_text("{not json")
    with pytest.raises(LedgerError, match="corrupt"):
        ledger.poll()


def test_results_survive_reopening_and_load_into_pandas_and_parquet(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, create=True)
    dirs = fill(ledger, tmp_path, 2)
    write_result(dirs[0])
    ledger.poll()
    ledger.add_llm_call("c1", role="ideator", purpose="ideate", provider="offline", model="m", epoch=0,
                        input_tokens=10, output_tokens=5, cost_usd=0.0, latency_s=0.1, attempts=1, error=None,
                        prompt="p", response="r")  # fmt: skip
    ledger.close()
    frames = ledger_module.load(tmp_path)
    assert set(frames) == {"ideas", "patches", "trials", "results", "llm_calls", "trial_usage", "confirmations",
                           "novelty_rejections", "rl_steps", "rl_samples", "meta"}  # fmt: skip
    assert frames["results"].metrics.iloc[0] == {"loss": 1.0}
    out = ledger_module.export_parquet(tmp_path)
    back = pd.read_parquet(out / "results.parquet")
    assert back.reward.tolist() == [1.0]


def test_opening_a_directory_that_is_not_a_run_says_so(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="run directory"):
        Ledger(tmp_path / "nothing")


def test_llm_usage_sums_tokens_and_dollars_per_role_and_purpose(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, create=True)
    calls = [("c1", "ideator", "ideate", 100, 50, 0.5, None), ("c2", "implementer", "implement", 1000, 200, 1.0, None),
             ("c3", "implementer", "implement", 0, 0, 0.0, "HTTP 500"), ("c4", "implementer", "revise", 10, 5, 0.25, None)]  # fmt: skip
    for call_id, role, purpose, tin, tout, cost, error in calls:
        ledger.add_llm_call(call_id, role=role, purpose=purpose, input_tokens=tin, output_tokens=tout,
                            cost_usd=cost, error=error, outcome="error" if error else "ok")  # fmt: skip
    usage = {(u["role"], u["purpose"]): u for u in ledger.llm_usage()}
    assert list(usage) == [("ideator", "ideate"), ("implementer", "implement"), ("implementer", "revise")]
    assert usage["implementer", "implement"] == {"role": "implementer", "purpose": "implement", "model": None, "calls": 2,
                                                 "failed": 1, "input_tokens": 1000, "output_tokens": 200,
                                                 "cache_write_tokens": 0, "cache_read_tokens": 0,
                                                 "cache_saved_usd": 0.0, "cost_usd": 1.0}  # fmt: skip
    assert ledger.spent_usd() == pytest.approx(1.75)


def test_a_ledger_from_before_the_outcome_column_opens_and_gains_it(tmp_path: Path) -> None:
    import sqlite3

    old = sqlite3.connect(tmp_path / ledger_module.LEDGER_FILE)
    old.execute(
        "CREATE TABLE llm_calls (call_id TEXT PRIMARY KEY, role TEXT, purpose TEXT, provider TEXT, model TEXT,"
        " epoch INTEGER, input_tokens INTEGER, output_tokens INTEGER, cost_usd REAL, latency_s REAL,"
        " attempts INTEGER, error TEXT, prompt TEXT, response TEXT, created_at REAL)"
    )
    old.execute("INSERT INTO llm_calls (call_id, role, cost_usd) VALUES ('old', 'ideator', 0.5)")
    old.commit()
    old.close()
    ledger = Ledger(tmp_path)
    ledger.add_llm_call("new", role="implementer", cost_usd=0.25, outcome="applied")
    frame = ledger.frames()["llm_calls"].set_index("call_id")
    assert frame.loc["new", "outcome"] == "applied" and pd.isna(frame.loc["old", "outcome"])
    assert ledger.spent_usd() == pytest.approx(0.75)


def test_an_older_ledgers_implementer_calls_gain_their_idea_from_the_patch_that_lists_them(
    tmp_path: Path,
) -> None:
    import sqlite3

    old = sqlite3.connect(tmp_path / ledger_module.LEDGER_FILE)
    old.execute("CREATE TABLE llm_calls (call_id TEXT PRIMARY KEY, role TEXT, purpose TEXT, created_at REAL)")
    old.execute(
        "CREATE TABLE patches (idea_id TEXT PRIMARY KEY, status TEXT NOT NULL, diff TEXT, reason TEXT,"
        " attempts INTEGER, llm_call_ids TEXT, created_at REAL)"
    )
    old.executemany("INSERT INTO llm_calls (call_id, role) VALUES (?, ?)",
                    [("e0-ideate-0-a0", "ideator"), ("e0-000-s0-r0", "implementer"), ("e0-000-s1-r0", "implementer")])  # fmt: skip
    old.execute(
        "INSERT INTO patches VALUES ('e0-000', 'applied', '', '', 2, ?, 0)",
        ('["e0-000-s0-r0", "e0-000-s1-r0"]',),
    )
    old.commit()
    old.close()
    calls = Ledger(tmp_path).frames()["llm_calls"].set_index("call_id").idea_id
    assert calls["e0-000-s0-r0"] == calls["e0-000-s1-r0"] == "e0-000" and pd.isna(calls["e0-ideate-0-a0"])
