"""What the paper measured per RL step (DESIGN.md §5), from the samples frame.

The frame has one row per sample (``Ledger.rl_samples_frame()``): step, sample_index, text,
thinking_chars, answer_chars, idea_id (None when the sample gave no idea), title, description,
executed, reward (0.0 for failed, NaN until the step's trials are done). Per step; steps are
numbered from 0 in the frame, from 1 in the progress line and the table (as epochs are):

- ``execution_rate``: executed samples / samples (a sample with no idea did not execute);
  ``mean_reward`` and ``max_reward`` over all samples, failed ones at 0, as the paper counted them
  (over the rewarded ones while the step's trials still run).
- ``distinct_exact``: distinct ideas after normalising title + description (lower case, words only,
  in order); ``distinct_near``: groups of near-duplicates, ideas joined when their token Jaccard
  similarity is at least 0.6 (``diversity.NEAR_DUPLICATE``, the diversity module's threshold);
  ``largest_group``: the biggest such group (the paper's collapse: 119 of 128 at epoch 68).
- ``jaccard_to_previous``: each idea's token-Jaccard similarity to the most similar idea of the
  previous step, averaged over the step's ideas (the quantity the paper's penalty acts on).
- ``mean_thinking_chars``, and thinking length vs execution: ``execution_long_thinking`` and
  ``execution_short_thinking`` are the execution rates of the samples above and below the step's
  median thinking length (those at the median in neither), and ``thinking_execution_r`` is the
  point-biserial correlation of thinking length with executing.

A quantity that does not exist for a step is NaN, never a made-up number, and shows as "-":
``jaccard_to_previous`` on the first step or where either step has no idea, the long/short rates
where every sample thinks equally long (one sample, say), the correlation where thinking length or
executing does not vary, the rewards before any is in. Everything else is always a number, a step
where nothing executed included.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from rich.table import Table

from hpc_executor import diversity

NEEDED = ("step", "thinking_chars", "idea_id", "title", "description", "executed", "reward")
NEAR_DUPLICATE = diversity.NEAR_DUPLICATE[diversity.JACCARD]
COLUMNS = ("step", "samples", "ideas", "executed", "execution_rate", "mean_reward", "max_reward",
           "distinct_exact", "distinct_near", "largest_group", "jaccard_to_previous", "mean_thinking_chars",
           "execution_long_thinking", "execution_short_thinking", "thinking_execution_r")  # fmt: skip
NAN = float("nan")


def step_metrics(samples: pd.DataFrame) -> pd.DataFrame:
    """One row per step, in step order, with ``COLUMNS``."""
    missing = [c for c in NEEDED if c not in samples.columns]
    if missing:
        raise ValueError(f"the RL samples frame lacks column(s) {', '.join(missing)}; it needs "
                         f"{', '.join(NEEDED)} (Ledger.rl_samples_frame() gives them)")  # fmt: skip
    rows = []
    previous: list[str] = []
    for step, group in samples.groupby("step", sort=True):
        ideas = group[group.idea_id.notna()]
        titles, descriptions = ideas.title.fillna("").astype(str), ideas.description.fillna("").astype(str)
        texts = [diversity.idea_text(t, d) for t, d in zip(titles, descriptions, strict=True)]
        rows.append({"step": step, **_step(group, texts, previous)})
        previous = texts
    return pd.DataFrame(rows, columns=list(COLUMNS))


def _step(group: pd.DataFrame, texts: list[str], previous: list[str]) -> dict[str, Any]:
    executed = group.executed.astype("boolean").fillna(False).to_numpy(dtype=bool)  # SQLite: 0/1, NULL
    thinking = group.thinking_chars.fillna(0).to_numpy(dtype=float)
    near = diversity.clusters(diversity.similarities(texts, diversity.JACCARD), NEAR_DUPLICATE)
    return {
        "samples": len(group),
        "ideas": len(texts),
        "executed": int(executed.sum()),
        "execution_rate": float(executed.mean()),
        "mean_reward": float(group.reward.mean()),  # pandas skips the NaN of samples not rewarded yet
        "max_reward": float(group.reward.max()),
        "distinct_exact": len({" ".join(diversity.words(t)) for t in texts}),
        "distinct_near": len(near),
        "largest_group": max(map(len, near), default=0),
        "jaccard_to_previous": float(np.mean(diversity.nearest_jaccard(texts, previous)))
        if texts and previous
        else NAN,
        "mean_thinking_chars": float(thinking.mean()),
        "execution_long_thinking": _rate(executed[thinking > np.median(thinking)]),
        "execution_short_thinking": _rate(executed[thinking < np.median(thinking)]),
        "thinking_execution_r": _correlation(thinking, executed.astype(float)),
    }


def _rate(executed: np.ndarray) -> float:
    return float(executed.mean()) if len(executed) else NAN


def _correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r (point-biserial where ``y`` is 0/1); NaN where either does not vary."""
    dx, dy = x - x.mean(), y - y.mean()
    scale = float(np.sqrt((dx**2).sum() * (dy**2).sum()))
    return float((dx * dy).sum()) / scale if scale > 0 else NAN


def _number(value: Any, spec: str) -> str:
    return "-" if value is None or pd.isna(value) else format(value, spec)


def progress_line(row: Mapping[Any, Any] | pd.Series) -> str:
    """One line for the driver's progress output, from a row of ``step_metrics``, plus the run's
    number of steps where the row has ``steps`` (a row of a frame with float columns holds its
    counts as floats: they are shown as whole numbers)."""
    count = {
        k: int(row[k])
        for k in ("step", "samples", "executed", "distinct_exact", "distinct_near", "largest_group")
    }
    steps = f"/{int(row['steps'])}" if "steps" in row else ""
    return (
        f"rl step {count['step'] + 1}{steps} | samples {count['samples']} | executed {count['executed']} "
        f"({_number(row['execution_rate'], '.0%')}) | reward mean {_number(row['mean_reward'], '.4f')} "
        f"max {_number(row['max_reward'], '.4f')} | distinct {count['distinct_exact']} exact, "
        f"{count['distinct_near']} near (largest {count['largest_group']}) | Jaccard to previous "
        f"{_number(row['jaccard_to_previous'], '.2f')} | thinking {_number(row['mean_thinking_chars'], ',.0f')} "
        f"chars, executed long/short {_number(row['execution_long_thinking'], '.0%')}/"
        f"{_number(row['execution_short_thinking'], '.0%')}"
    )


def step_table(frame: pd.DataFrame) -> Table:
    """The end-of-run table: one row per step of ``step_metrics``."""
    table = Table(
        title="RL steps",
        caption=f"near-duplicates: token Jaccard >= {NEAR_DUPLICATE:g}; Jaccard to previous: mean over ideas of "
        "the most similar previous-step idea; long/short: execution rate above/below the median thinking length",
    )
    for col in ("step", "samples", "executed", "mean reward", "max reward", "distinct exact", "distinct near",
                "largest group", "Jaccard to prev", "thinking chars", "exec long/short", "r(thinking, exec)"):  # fmt: skip
        table.add_column(col, justify="right")
    for row in frame.to_dict("records"):
        table.add_row(
            str(row["step"] + 1), str(row["samples"]), f"{row['executed']} ({_number(row['execution_rate'], '.0%')})",
            _number(row["mean_reward"], ".4f"), _number(row["max_reward"], ".4f"), str(row["distinct_exact"]),
            str(row["distinct_near"]), str(row["largest_group"]), _number(row["jaccard_to_previous"], ".2f"),
            _number(row["mean_thinking_chars"], ",.0f"),
            f"{_number(row['execution_long_thinking'], '.0%')} / {_number(row['execution_short_thinking'], '.0%')}",
            _number(row["thinking_execution_r"], "+.2f"),
        )  # fmt: skip
    return table
