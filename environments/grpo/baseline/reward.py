"""Training reward (editable). The evaluator grades with its own frozen copy of grader.py."""

from __future__ import annotations

from grader import extract_answer, is_correct

# The r1-zero prompt: the model continues after "<think>".
R1_ZERO_PROMPT = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process in the mind and then provides the User with "
    "the answer. The reasoning process is enclosed within <think> </think> and answer is enclosed within "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>.\nUser: {question}\nAssistant: <think>"
)


def r1_zero_reward(response: str, ground_truth: str) -> dict[str, float]:
    """1 only for a correctly formatted and correct answer; format is logged separately."""
    return {
        "format_reward": float(extract_answer(response) is not None),
        "reward": float(is_correct(response, ground_truth)),
    }
