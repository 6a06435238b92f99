"""Evolution's exploit schedule and what each prompt is shown; best-of-N at the same budget."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from hpc_executor.config import StrategyConfig
from hpc_executor.ideator import FAILED_MARK, format_shown
from hpc_executor.strategies import BestOfN, Evolution


def evolution(**kw: object) -> Evolution:
    cfg = OmegaConf.merge(OmegaConf.structured(StrategyConfig), {"name": "evolution", **kw})
    return Evolution(cfg, seed=0)


@pytest.mark.parametrize(
    ("epoch", "expected"), [(0, 0), (1, 20), (2, 30), (3, 30), (4, 30), (6, 40), (9, 40)]
)
def test_exploit_share_grows_and_rounds_down_to_the_call_size(epoch: int, expected: int) -> None:
    # batch 50, calls of 10: min(0.5 + 0.1*floor(e/2), 0.8) * 50 = 25, 30, 30, 35, 40 -> 20, 30, 30, 30, 40
    assert evolution(batch_size=50, call_size=10).exploit_count(epoch) == expected


def test_nanogpt_batch_of_80() -> None:
    counts = [evolution(batch_size=80, call_size=10).exploit_count(e) for e in range(10)]
    assert counts == [0, 40, 40, 40, 50, 50, 60, 60, 60, 60]


def test_plan_puts_exploit_slots_first() -> None:
    plan = evolution(batch_size=4, call_size=2).plan(1)
    assert [s.purpose for s in plan] == ["exploit", "exploit", "explore", "explore"]
    assert [s.purpose for s in evolution(batch_size=4, call_size=2).plan(0)] == ["ideate"] * 4


def history() -> list[dict]:
    rows = [{"idea_id": "baseline", "epoch": 0, "kind": "baseline", "title": "b", "description": "",
             "status": "ok", "reward": 1.0}]  # fmt: skip
    for i, (status, reward) in enumerate([("ok", 1.5), ("ok", 0.9), ("crashed", None), ("ok", 2.0)]):
        rows.append({"idea_id": f"e0-{i}", "epoch": 0, "kind": "ideate", "title": f"t{i}",
                     "description": f"d{i}", "status": status, "reward": reward})  # fmt: skip
    return rows


def test_exploit_shows_only_ideas_that_beat_the_baseline_best_first() -> None:
    shown = evolution(max_shown=100).shown("exploit", 1, history(), baseline=1.0)
    assert [s["idea_id"] for s in shown] == ["e0-3", "e0-0"]
    assert len(evolution(max_shown=1).shown("exploit", 1, history(), baseline=1.0)) == 1


def test_explore_shows_earlier_ideas_with_failures_marked() -> None:
    shown = evolution().shown("explore", 1, history(), baseline=1.0)
    assert {s["idea_id"] for s in shown} == {"e0-0", "e0-1", "e0-2", "e0-3"}
    text = format_shown("explore", shown)
    assert text.count(FAILED_MARK) == 1 and "[reward 1.5]" in text


def test_best_of_n_always_samples() -> None:
    cfg = OmegaConf.merge(OmegaConf.structured(StrategyConfig), {"name": "best_of_n", "batch_size": 5})
    assert {s.purpose for e in range(3) for s in BestOfN(cfg, 0).plan(e)} == {"ideate"}
