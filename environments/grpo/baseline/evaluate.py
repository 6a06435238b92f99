"""Frozen evaluator of the GRPO environment (protected: ideas never see or edit this file).

Training writes, at each evaluation, `$HPCX_OUTPUT_DIR/eval_step_<k>.jsonl`: one JSON object per
test problem, {"index": <position in test.jsonl>, "output": <raw model response>}. This script
grades every such file against `$HPCX_DATA_DIR/test.jsonl` with its own grader and writes
{"best_eval_accuracy", "accuracy_by_step", "eval_steps", ...} to `$HPCX_METRICS_PATH`.

A step counts only if its file covers the test set exactly (every index once, nothing else);
otherwise it is listed under "invalid_steps" with the reason. More than MAX_EVAL_FILES files is
refused outright: the reward is a maximum over evaluations, so extra evaluations would buy reward
from sampling noise. Exits non-zero when nothing can be evaluated.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from grader import extract_answer, is_correct

MAX_EVAL_FILES = 11  # the baseline evaluates 10 times (every 2 of 20 steps); one spare, e.g. step 0
MAX_OUTPUT_CHARS = 100_000  # far above 1024 tokens of text; beyond it the file is not a model's output
STEP_RE = re.compile(r"eval_step_(\d+)\.jsonl")


class InvalidEvalFile(ValueError):
    """An eval file that does not hold exactly one output per test problem."""


@dataclass
class StepScore:
    accuracy: float
    format_rate: float


def load_answers(data_dir: Path) -> list[str]:
    with (data_dir / "test.jsonl").open() as f:
        return [json.loads(line)["answer"] for line in f if line.strip()]


def read_outputs(path: Path, n_problems: int) -> list[str]:
    outputs: dict[int, str] = {}
    with path.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                index, output = row["index"], row["output"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise InvalidEvalFile(f"line {lineno}: not an {{index, output}} object ({exc})") from None
            if type(index) is not int or not isinstance(output, str):
                raise InvalidEvalFile(f"line {lineno}: index must be an int and output a string")
            if not 0 <= index < n_problems:
                raise InvalidEvalFile(f"line {lineno}: index {index} is not a test problem")
            if index in outputs:
                raise InvalidEvalFile(f"line {lineno}: index {index} appears twice")
            if len(output) > MAX_OUTPUT_CHARS:
                raise InvalidEvalFile(f"line {lineno}: output of {len(output)} characters")
            outputs[index] = output
    if len(outputs) != n_problems:
        raise InvalidEvalFile(f"{n_problems - len(outputs)} of {n_problems} test problems missing")
    return [outputs[i] for i in range(n_problems)]


def score(outputs: list[str], answers: list[str]) -> StepScore:
    correct = sum(is_correct(out, gt) for out, gt in zip(outputs, answers, strict=True))
    formatted = sum(extract_answer(out) is not None for out in outputs)
    return StepScore(accuracy=correct / len(answers), format_rate=formatted / len(answers))


def evaluate(output_dir: Path, data_dir: Path) -> dict:
    """Metrics for every eval file in output_dir. Raises SystemExit when training wrote nothing to
    evaluate; returns an ``invalid_reason`` (the worker's invalid_result) when nothing it wrote is valid."""
    answers = load_answers(data_dir)
    files = sorted(output_dir.glob("eval_step_*.jsonl"))
    if not files:
        raise SystemExit(f"no eval_step_*.jsonl files in {output_dir}: training wrote no evaluations")
    if len(files) > MAX_EVAL_FILES:
        raise SystemExit(
            f"{len(files)} eval files, at most {MAX_EVAL_FILES} are graded: refusing to evaluate"
        )
    scores: dict[int, StepScore] = {}
    invalid: dict[str, str] = {}
    for path in files:
        match = STEP_RE.fullmatch(path.name)
        if match is None:
            invalid[path.name] = "file name is not eval_step_<integer>.jsonl"
            continue
        try:
            scores[int(match.group(1))] = score(read_outputs(path, len(answers)), answers)
        except InvalidEvalFile as exc:
            invalid[path.name] = str(exc)
    if not scores:  # evaluations were written, none as the protocol asks: no reward, and why
        return {"invalid_reason": f"no valid eval file: {json.dumps(invalid)}", "invalid_steps": invalid}
    return {
        "best_eval_accuracy": max(s.accuracy for s in scores.values()),
        "accuracy_by_step": {str(k): scores[k].accuracy for k in sorted(scores)},
        "format_rate_by_step": {str(k): scores[k].format_rate for k in sorted(scores)},
        "eval_steps": len(scores),
        "invalid_steps": invalid,
        "n_problems": len(answers),
    }


def main() -> None:
    try:
        output_dir = Path(os.environ["HPCX_OUTPUT_DIR"])
        data_dir = Path(os.environ["HPCX_DATA_DIR"])
        metrics_path = Path(os.environ["HPCX_METRICS_PATH"])
    except KeyError as exc:
        raise SystemExit(f"missing environment variable {exc}") from None
    metrics = evaluate(output_dir, data_dir)
    tmp = metrics_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(metrics, indent=2))
    tmp.replace(metrics_path)
    print(json.dumps(metrics), file=sys.stderr)


if __name__ == "__main__":
    main()
