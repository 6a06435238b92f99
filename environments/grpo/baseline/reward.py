"""Training reward (editable). The evaluator grades with its own frozen copy of grader.py."""

from __future__ import annotations

from grader import extract_answer, is_correct


def r1_zero_reward(response: str, ground_truth: str) -> dict[str, float]:
    """1 only for a correctly formatted and correct answer; format is logged separately."""
    return {
        "format_reward": float(extract_answer(response) is not None),
        "reward": float(is_correct(response, ground_truth)),
    }
