"""Confirmation of winners: the top ideas re-run on fresh seeds, at the end of a search and by command."""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

from conftest import run_search

from hpc_executor import ledger as ledger_module

RUN = "outputs/quick-offline-evolution-seed0"


def confirm_cmd(run_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "hpc_executor.confirm", str(run_dir), *args],
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_a_search_confirms_its_top_ideas_and_flags_those_within_noise(tmp_path: Path) -> None:
    proc = run_search("+env=quick", "+model=offline", "+env.extra_env.QUICK_SEED_NOISE=0.1",
                      "noise.baseline_repeats=3", "confirm.top_k=2", "confirm.seeds=2", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    frames = ledger_module.load(tmp_path / RUN)
    trials = frames["trials"].merge(frames["results"][["trial_id", "status", "reward"]], on="trial_id")
    search = trials[trials.purpose.isna() & (trials.idea_id != "baseline") & (trials.status == "ok")]
    top2 = search.sort_values("reward", ascending=False).idea_id.head(2)
    runs = trials[trials.purpose == "confirm"]
    assert sorted(runs.trial_id) == sorted(f"{i}-c{j}" for i in top2 for j in (0, 1))
    assert set(runs.seed) == {1000, 1001} and (runs.epoch == trials.epoch.max()).all()
    table = frames["confirmations"].set_index("idea_id")
    assert set(table.index) == set(top2)
    for idea_id, row in table.iterrows():
        rewards = runs[runs.idea_id == idea_id].reward
        assert row["mean"] == statistics.fmean(rewards) and row["std"] == statistics.stdev(rewards)
        assert row["runs"] == row["runs_ok"] == 2
    assert (table.confirmed == 0).all(), "noise of 0.1 hides every gain of the quick ideas"
    out = proc.stdout + proc.stderr
    assert out.count("unconfirmed") == 2, "a winner that does not confirm is flagged, not hidden"
    outcomes = frames["ideas"][frames["ideas"].kind != "baseline"]
    assert len(outcomes) == 6, "confirmation runs take no idea slots"


def test_the_confirm_command_confirms_a_finished_run_and_resumes(tmp_path: Path) -> None:
    proc = run_search("+env=quick", "+model=offline", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / RUN
    assert ledger_module.load(run_dir)["confirmations"].empty, "confirmation is off by default"

    done = confirm_cmd(run_dir, "--top-k", "1", "--seeds", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    frames = ledger_module.load(run_dir)
    row = frames["confirmations"].iloc[0]
    assert row["confirmed"] == 1 and row["runs_ok"] == 2 and row["std"] == 0.0, (
        "a deterministic winner confirms"
    )
    assert row["mean"] == row["search_reward"]
    assert "confirmed (fresh seeds)" in done.stdout and "unconfirmed" not in done.stdout

    again = confirm_cmd(run_dir, "--top-k", "1", "--seeds", "2")
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(ledger_module.load(run_dir)["trials"]) == len(frames["trials"]), "nothing runs twice"
    missing = confirm_cmd(tmp_path / "nowhere")
    assert missing.returncode == 2 and "no ledger at" in missing.stderr
