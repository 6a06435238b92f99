"""Per-step RL metrics, the progress line, the end table and ``analysis.rl_steps``, on small frames
computed by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
from rich.console import Console

from hpc_executor import analysis
from hpc_executor.ledger import Ledger
from hpc_executor.rl import metrics

# the columns that are a number on every step whose rewards are in (the others are NaN where undefined)
ALWAYS = ["samples", "ideas", "executed", "execution_rate", "mean_reward", "max_reward", "distinct_exact",
          "distinct_near", "largest_group", "mean_thinking_chars"]  # fmt: skip
UNDEFINED_ON_ONE_SAMPLE = ["execution_long_thinking", "execution_short_thinking", "thinking_execution_r"]
RAISE = ("Raise the LR", "double it")
COLUMNS = ["step", "sample_index", "text", "thinking_chars", "answer_chars", "idea_id", "title", "description",
           "executed", "reward"]  # fmt: skip


def samples(rows: list[tuple[int, tuple[str, str] | None, bool, float, int]]) -> pd.DataFrame:
    """The samples frame from (step, (title, description) or None, executed, reward, thinking chars)."""
    index: dict[int, int] = {}
    records = []
    for step, idea, executed, reward, thinking in rows:
        i = index[step] = index.get(step, -1) + 1
        title, description = idea or (None, None)
        records.append({"step": step, "sample_index": i, "text": f"<think>{'x' * thinking}</think>",
                        "thinking_chars": thinking, "answer_chars": 10, "idea_id": f"s{step}-{i}" if idea else None,
                        "title": title, "description": description, "executed": executed, "reward": reward})  # fmt: skip
    return pd.DataFrame(records, columns=COLUMNS)


HAND = samples([
    (0, RAISE, True, 0.8, 100),
    (0, ("raise the lr", "Double it!"), True, 0.6, 300),  # the same idea, normalised
    (0, ("Raise the LR", "double it slowly"), False, 0.0, 500),  # a near-duplicate: Jaccard 5/6
    (0, None, False, 0.0, 700),  # no idea
    (1, ("add momentum", "to the optimizer"), True, 0.5, 200),
    (1, RAISE, True, 0.9, 200),
])  # fmt: skip


def test_hand_computed_steps() -> None:
    first, second = metrics.step_metrics(HAND).to_dict("records")
    assert {k: first[k] for k in ALWAYS} == {
        "samples": 4, "ideas": 3, "executed": 2, "execution_rate": 0.5, "mean_reward": pytest.approx(0.35),
        "max_reward": 0.8, "distinct_exact": 2, "distinct_near": 1, "largest_group": 3, "mean_thinking_chars": 400.0,
    }  # fmt: skip
    assert math.isnan(first["jaccard_to_previous"]), "the first step has no previous step"
    # median 400: the two longer thinkers failed, the two shorter ones executed
    assert (first["execution_long_thinking"], first["execution_short_thinking"]) == (0.0, 1.0)
    # thinking [100, 300, 500, 700] against executed [1, 1, 0, 0]: r = -400 / sqrt(200000 * 1)
    assert first["thinking_execution_r"] == pytest.approx(-2 / math.sqrt(5))
    # most similar previous idea: "add momentum. to the optimizer" shares "the" with "raise the lr. double
    # it" (1/9) and with the slowly variant (1/10): max 1/9; the repeated idea 1; mean of the two 5/9
    assert second["jaccard_to_previous"] == pytest.approx(5 / 9)
    assert (second["distinct_exact"], second["distinct_near"], second["largest_group"]) == (2, 2, 1)
    assert (second["execution_rate"], second["mean_reward"], second["max_reward"]) == (1.0, 0.7, 0.9)
    # everyone thought 200 characters: no longer or shorter half, no correlation
    assert all(math.isnan(second[k]) for k in UNDEFINED_ON_ONE_SAMPLE)


def test_the_collapse_one_idea_repeated_across_steps() -> None:
    same = [RAISE, ("RAISE the lr", "double it."), ("raise  the LR", "Double it")]
    frame = metrics.step_metrics(samples([(s, idea, True, 0.5, 100) for s in (0, 1) for idea in same]))
    assert frame.distinct_exact.tolist() == [1, 1]
    assert frame.distinct_near.tolist() == [1, 1]
    assert frame.largest_group.tolist() == [3, 3]
    assert frame.jaccard_to_previous.iloc[1] == 1.0


def test_near_duplicates_count_as_one() -> None:
    # a chain: each shares 5 of 6 words with the next (5/7 >= 0.6), the ends only 4 of 8 (0.5): one group
    ideas = [("a b c d e", "f"), ("a b c d e", "g"), ("a b c d h", "g"), ("x y z", "w")]
    (row,) = metrics.step_metrics(samples([(0, idea, True, 1.0, 10) for idea in ideas])).to_dict("records")
    assert (row["distinct_exact"], row["distinct_near"], row["largest_group"]) == (4, 2, 3)


def test_a_step_where_nothing_executed_and_a_step_with_one_sample_are_numbers() -> None:
    frame = metrics.step_metrics(samples([
        (0, RAISE, False, 0.0, 100), (0, ("add momentum", ""), False, 0.0, 900), (0, None, False, 0.0, 50),
        (1, None, False, 0.0, 0),
        (2, RAISE, True, 0.4, 300),
    ]))  # fmt: skip
    assert frame[ALWAYS].notna().all().all()
    nothing, lone_failure, lone = frame.to_dict("records")
    assert (nothing["execution_rate"], nothing["mean_reward"], nothing["max_reward"]) == (0.0, 0.0, 0.0)
    assert (nothing["execution_long_thinking"], nothing["execution_short_thinking"]) == (0.0, 0.0)
    assert math.isnan(nothing["thinking_execution_r"]), "executing does not vary"
    assert (lone_failure["ideas"], lone_failure["distinct_exact"], lone_failure["largest_group"]) == (0, 0, 0)
    assert math.isnan(lone_failure["jaccard_to_previous"]), "no idea to compare"
    assert math.isnan(lone["jaccard_to_previous"]), "the previous step had no idea"
    assert (lone["samples"], lone["execution_rate"], lone["mean_reward"], lone["distinct_near"]) == (
        1,
        1.0,
        0.4,
        1,
    )
    assert all(math.isnan(lone[k]) for k in UNDEFINED_ON_ONE_SAMPLE)
    lines = [metrics.progress_line(row) for _, row in frame.iterrows()]
    assert not any("nan" in line for line in lines), lines
    assert "nan" not in render(metrics.step_table(frame))


def test_an_empty_run_and_a_frame_without_the_columns() -> None:
    assert list(metrics.step_metrics(samples([])).columns) == list(metrics.COLUMNS)
    with pytest.raises(ValueError, match="lacks column\\(s\\) executed, reward"):
        metrics.step_metrics(HAND.drop(columns=["executed", "reward"]))


def render(table: object) -> str:
    console = Console(record=True, width=250)
    console.print(table)
    return console.export_text()


def test_progress_line_and_end_table() -> None:
    frame = metrics.step_metrics(HAND)
    assert metrics.progress_line(frame.iloc[0]) == (
        "rl step 1 | samples 4 | executed 2 (50%) | reward mean 0.3500 max 0.8000 | distinct 2 exact, 1 near "
        "(largest 3) | Jaccard to previous - | thinking 400 chars, executed long/short 0%/100%"
    )
    text = render(metrics.step_table(frame))
    rows = [
        [cell.strip() for cell in line.split("│")[1:-1]] for line in text.splitlines() if line.startswith("│")
    ]
    assert rows == [
        ["1", "4", "2 (50%)", "0.3500", "0.8000", "2", "1", "3", "-", "400", "0% / 100%", "-0.89"],
        ["2", "2", "2 (100%)", "0.7000", "0.9000", "2", "2", "1", "0.56", "200", "- / -", "-"],
    ]


def test_the_progress_line_counts_steps_from_one_and_of_how_many() -> None:
    row = {**metrics.step_metrics(HAND).iloc[1].to_dict(), "steps": 4}
    assert metrics.progress_line(row).startswith(
        "rl step 2/4 | samples 2 | executed 2 (100%) | reward mean 0.7000"
    )


def test_a_step_whose_trials_still_run_has_no_reward_yet() -> None:
    running = HAND.assign(reward=HAND.reward.where(HAND.step == 0), executed=HAND.executed & (HAND.step == 0))
    first, second = metrics.step_metrics(running).to_dict("records")
    assert (first["mean_reward"], first["max_reward"]) == (pytest.approx(0.35), 0.8)
    assert math.isnan(second["mean_reward"]) and math.isnan(second["max_reward"]), (
        "not 0: nothing is known yet"
    )
    assert "reward mean - max - |" in metrics.progress_line(second)


def test_analysis_rl_steps_from_a_frame_and_from_a_run_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = metrics.step_metrics(HAND)
    pd.testing.assert_frame_equal(analysis.rl_steps(HAND), expected)
    Ledger(tmp_path, create=True).close()
    # Ledger.rl_samples_frame() comes with the RL loop; stand in for it here
    monkeypatch.setattr(Ledger, "rl_samples_frame", lambda self: HAND, raising=False)
    pd.testing.assert_frame_equal(analysis.rl_steps(tmp_path), expected)
    pd.testing.assert_frame_equal(analysis.rl_steps(str(tmp_path)), expected)


def test_the_frame_as_sqlite_returns_it_gives_the_same_steps() -> None:
    # pandas reads an INTEGER column holding a NULL as floats with NaN: here the sample with no idea
    stored = HAND.assign(
        executed=[1.0, 1.0, 0.0, math.nan, 1.0, 1.0], description=HAND.description.where(HAND.step == 0, None)
    )
    expected = metrics.step_metrics(HAND.assign(description=stored.description.fillna("")))
    pd.testing.assert_frame_equal(metrics.step_metrics(stored), expected)
