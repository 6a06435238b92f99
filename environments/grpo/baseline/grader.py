"""The r1-zero format: the prompt that asks for it and the grading of answers in it (protected:
ideas never edit this file; training and the frozen evaluator both import it).

Two graders, chosen by `GRPO_GRADER` (the environment's config sets it for training and evaluation):

`strict` (the default: the paper's `drgrpo_grader.py`, on which its 48.0% rests). A response is
*formatted* when it contains the literal `</think> <answer>` (one space) and `</answer>`. The graded
answer is the text after the LAST `<answer>` with `</answer>` removed; if it holds `\\boxed{...}`, the
box's content (a box that does not close: formatted, never correct). Equivalence is the paper's:
math_equivalence.py (normalised strings, then sympy with unreduced fractions, integers and tuples
kept strict).

`lenient` (ours before, kept as an option). A response is *formatted* when it closes the reasoning
with `</think>`, then opens `<answer>` (any whitespace or none in between) and closes it with
`</answer>`. The graded answer is the text of that first answer block; if it holds `\\boxed{...}`, the
box's content. Two answers are *equivalent* when
math-verify says so: it parses both as LaTeX into sympy objects and compares them as numbers,
expressions, intervals, sets, tuples, matrices or equations (`\\frac12` = `0.5` = `1/2`,
`\\dfrac{3}{4}` = `\\frac{3}{4}`, `x = 5` = `5`, `2\\sqrt{3}` = `\\sqrt{12}`, `[1, 2)` != `(1, 2)`).

It also accepts unreduced fractions (`\\frac{2}{4}` for `\\frac{1}{2}`), decimals close to a fraction
and differing base subscripts, which the strict grader rejects. This file's own code covers what
math-verify does not do, or does not do safely here:

- The r1-zero format: math-verify finds answers anywhere in free text and knows no tags.
- Words: math-verify reads a bare word as a product of one-letter symbols, so `yes` would equal
  `sey`; answers made only of letters (`odd`, `\\text{Monday}`) are compared as words.
- Percent signs: `50\\%` inside a box does not parse; they are dropped (MATH's percent answers are
  the number: `50\\%` = `50`), as is a trailing period (`1.` does not parse either).
- Time: sympy can take minutes on adversarial input (`9^{9^{9^9}}`, `(10^{10})!`). One alarm bounds
  the whole comparison (both parses and the verification), raised as a BaseException so that
  math-verify's `except Exception` cannot swallow it and carry on unbounded; math-verify's own
  per-call alarms are off (they would reset this one and only take whole seconds). Answers longer
  than MAX_ANSWER_CHARS are never parsed.
- Only math-verify's LaTeX extractor is used: its plain-expression extractor hands the text to
  sympy's `parse_expr`, which runs `eval` on it.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

try:
    from latex2sympy2_extended.math_normalization import extract_boxed_content
    from math_verify import LatexExtractionConfig, parse, verify
except ImportError as exc:  # a missing grader must stop the evaluator, not grade everything wrong
    raise ImportError("grader.py needs math-verify: pip install 'math-verify[antlr4_9_3]'") from exc
from math_equivalence import last_boxed, strictly_equivalent

# Its timeouts are off (see above), and its per-answer warnings would flood the training log.
logging.getLogger("math_verify").setLevel(logging.ERROR)

# The r1-zero prompt: the model continues after "<think>". The evaluator always asks with it.
R1_ZERO_PROMPT = (
    "A conversation between User and Assistant. The User asks a question, and the Assistant solves it. "
    "The Assistant first thinks about the reasoning process in the mind and then provides the User with "
    "the answer. The reasoning process is enclosed within <think> </think> and answer is enclosed within "
    "<answer> </answer> tags, respectively, i.e., <think> reasoning process here </think> "
    "<answer> answer here </answer>.\nUser: {question}\nAssistant: <think>"
)
GRADERS = ("strict", "lenient")
FORMAT_RE = re.compile(r"</think>\s*<answer>(.*?)</answer>", re.DOTALL)
LATEX_ONLY = [LatexExtractionConfig(boxed_match_priority=0)]
MAX_ANSWER_CHARS = 200  # longer "answers" are never a MATH answer; don't spend sympy time on them
TIMEOUT_S = 2.0
TEXT_WRAPPER_RE = re.compile(r"\\(?:text|textbf|textit|mathrm|mbox)\{([^{}]*)\}")
WORDS_RE = re.compile(r"[A-Za-z]{2,}(?: [A-Za-z]+)*|[A-Za-z]+(?: [A-Za-z]+)+")


def grader_mode(mode: str | None = None) -> str:
    """`mode`, or GRPO_GRADER, or strict; an unknown name stops the run instead of grading wrong."""
    mode = mode or os.environ.get("GRPO_GRADER") or "strict"
    if mode not in GRADERS:
        raise ValueError(f"GRPO_GRADER={mode!r}: choose one of {', '.join(GRADERS)}")
    return mode


def extract_answer(response: str, mode: str | None = None) -> str | None:
    """The graded answer of a response, or None if the response is not in the r1-zero format."""
    if grader_mode(mode) == "strict":
        if "</think> <answer>" not in response or "</answer>" not in response:
            return None
        answer = response.split("<answer>")[-1].replace("</answer>", "")
        if "\\boxed" not in answer:
            return answer.strip()
        return (last_boxed(answer) or "").strip()  # a box that does not close: nothing to grade
    match = FORMAT_RE.search(response)
    if match is None:
        return None
    # math-verify's own box extractor (from its LaTeX parser): the last \boxed{}, or the whole block
    return extract_boxed_content(match.group(1)).strip()


def is_correct(response: str, ground_truth: str, mode: str | None = None) -> bool:
    """True only for a formatted response whose answer is equivalent to the ground truth."""
    mode = grader_mode(mode)
    answer = extract_answer(response, mode)
    if answer is None:
        return False
    if mode == "strict":
        if len(answer) > MAX_ANSWER_CHARS or len(ground_truth) > MAX_ANSWER_CHARS:
            return answer.strip() == ground_truth.strip() != ""
        try:
            with _time_limit(TIMEOUT_S):
                return strictly_equivalent(answer, ground_truth)
        except _GradingTimeout:
            return False
    return answers_equivalent(answer, ground_truth)


def answers_equivalent(answer: str, ground_truth: str) -> bool:
    a, b = _clean(answer), _clean(ground_truth)
    if not a or not b:
        return False
    if a == b:
        return True
    word_a, word_b = _as_words(a), _as_words(b)
    if word_a is not None or word_b is not None:
        return word_a == word_b
    if len(a) > MAX_ANSWER_CHARS or len(b) > MAX_ANSWER_CHARS:
        return False
    try:
        with _time_limit(TIMEOUT_S):
            gold = parse(f"\\boxed{{{b}}}", LATEX_ONLY, parsing_timeout=None)
            pred = parse(f"\\boxed{{{a}}}", LATEX_ONLY, parsing_timeout=None)
            return bool(gold and pred and verify(gold, pred, timeout_seconds=None))
    except _GradingTimeout:
        return False


def _clean(text: str) -> str:
    """What math-verify cannot parse itself: percent signs and a trailing period."""
    return re.sub(r"\\?%", "", text).strip().rstrip(".").strip()


def _as_words(text: str) -> str | None:
    """The lower-cased words if the answer is only words (`odd`, `\\text{Monday}`), else None."""
    plain = " ".join(TEXT_WRAPPER_RE.sub(r"\1", text).replace("$", "").split())
    return plain.lower() if WORDS_RE.fullmatch(plain) else None


class _GradingTimeout(BaseException):
    """Not an Exception, so that no `except Exception` inside math-verify or sympy can catch it."""


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Bound one comparison; only possible in the main thread (SIGALRM), a no-op elsewhere."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: Any) -> None:
        raise _GradingTimeout

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
