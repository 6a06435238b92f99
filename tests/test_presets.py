"""The CPU presets of the paper's environments run through the search command with the offline
stand-in on the local scheduler, as a user would try them, and their rewards land in the ledger."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_search

from hpc_executor import ledger as ledger_module


@pytest.mark.slow
@pytest.mark.parametrize("env", ["nanogpt_cpu", "grpo_cpu"])
def test_cpu_preset_searches_with_the_offline_stand_in(env: str, tmp_path: Path) -> None:
    proc = run_search(f"+env={env}", "+model=offline", "strategy.epochs=1", "strategy.batch_size=2",
                      "strategy.call_size=2", cwd=tmp_path, timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    frames = ledger_module.load(tmp_path / f"outputs/{env}-offline-evolution-seed0")
    results = frames["results"].set_index("trial_id")
    assert results.loc["baseline-t0", "status"] == "ok" and results.loc["baseline-t0", "reward"] > 0
    ideas = results.drop(index="baseline-t0")
    assert len(ideas) == 2 and ideas.status.notna().all()
    assert "Best ideas of" in proc.stdout and "LLM usage" in proc.stdout
