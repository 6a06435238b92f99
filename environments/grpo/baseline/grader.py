"""Answer grading for the r1-zero format (protected: ideas never edit this file).

A response is *formatted* when it closes the reasoning with `</think>`, then opens `<answer>`
(only whitespace in between) and closes it with `</answer>`. The graded answer is the text of that
first answer block; if it holds a `\\boxed{...}`, the box's content. Two answers are *equivalent*
when their normalised strings match, or (when sympy is importable) both parse as arithmetic or
simple algebraic expressions whose difference simplifies to 0.

Normalisation removes `$`, `\\left`/`\\right`, LaTeX spacing commands, `\\text{}` wrappers, degree
and percent signs, trailing periods, thousands separators, a leading `x =`, and all whitespace; it
rewrites `\\dfrac`/`\\tfrac` to `\\frac` and `\\frac12` to `\\frac{1}{2}`. Comma-separated answers
(tuples, lists) are compared element by element.

The symbolic check never calls `eval` or sympy's string parser: a small recursive-descent parser
accepts only numbers, single-letter variables, `pi`, + - * / ^, `\\frac`, `\\sqrt` and brackets,
builds the sympy expression itself, and refuses large exponents, so a model's output can neither
run code in the evaluator nor stall it.
"""

from __future__ import annotations

import re
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

try:
    import sympy
except ImportError:  # string normalisation only
    sympy = None

FORMAT_RE = re.compile(r"</think>\s*<answer>(.*?)</answer>", re.DOTALL)
MAX_ANSWER_CHARS = 200  # longer "answers" are never a MATH answer; don't spend sympy time on them
MAX_EXPONENT = 64
MAX_DIGITS = 2000
SYMPY_TIMEOUT_S = 2.0


def extract_answer(response: str) -> str | None:
    """The graded answer of a response, or None if the response is not in the r1-zero format."""
    match = FORMAT_RE.search(response)
    if match is None:
        return None
    answer = match.group(1)
    boxed = _boxed_content(answer)
    return (boxed if boxed is not None else answer).strip()


def is_correct(response: str, ground_truth: str) -> bool:
    """True only for a formatted response whose answer is equivalent to the ground truth."""
    answer = extract_answer(response)
    return answer is not None and answers_equivalent(answer, ground_truth)


def answers_equivalent(answer: str, ground_truth: str) -> bool:
    a, b = normalize_answer(answer), normalize_answer(ground_truth)
    if not a or not b:
        return False
    if a == b:
        return True
    parts_a, parts_b = _split_top_level(a), _split_top_level(b)
    if len(parts_a) > 1 or len(parts_b) > 1:
        return (
            len(parts_a) == len(parts_b)
            and a[0] + a[-1] == b[0] + b[-1]  # same kind of brackets around a tuple/interval
            and all(x == y or _symbolic_equal(x, y) for x, y in zip(parts_a, parts_b, strict=True))
        )
    return _symbolic_equal(a, b)


def normalize_answer(text: str) -> str:
    s = text.strip()
    boxed = _boxed_content(s)
    if boxed is not None:
        s = boxed
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", s)
    for old, new in [("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"), ("\\left", ""), ("\\right", "")]:
        s = s.replace(old, new)
    s = re.sub(r"\\[,;:! ]|~|\$|\\displaystyle", "", s)
    s = re.sub(r"\^\{?\\circ\}?|\\circ|\\%|%", "", s)
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    s = re.sub(r"^[a-zA-Z]=", "", s)  # "x=5" answers "5"
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", s)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    return s


def _boxed_content(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    for i in range(start + len("\\boxed"), len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + len("\\boxed{") : i]
    return None


def _split_top_level(s: str) -> list[str]:
    """Split `(a,b)` / `[a,b)` / `a,b` on commas outside any inner bracket."""
    inner = s[1:-1] if len(s) > 1 and s[0] in "([{" and s[-1] in ")]}" else s
    parts, depth, current = [], 0, ""
    for ch in inner:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    return parts


def _symbolic_equal(a: str, b: str) -> bool:
    if sympy is None or len(a) > MAX_ANSWER_CHARS or len(b) > MAX_ANSWER_CHARS:
        return False
    try:
        with _time_limit(SYMPY_TIMEOUT_S):
            x, y = _Parser(a).parse(), _Parser(b).parse()
            infinities = (sympy.zoo, sympy.nan, sympy.oo, -sympy.oo)
            if x.has(*infinities) or y.has(*infinities):  # 1/0 is zoo, and zoo - 1 is zoo: never an answer
                return False
            diff = x - y
            if diff == 0:
                return True
            if not diff.free_symbols:  # plain numbers: a 60-digit evaluation is exact enough and far faster
                return bool(abs(sympy.N(diff, 60)) <= 1e-45 * max(1, abs(sympy.N(x, 60))))
            return bool(sympy.simplify(diff) == 0)
    except (ValueError, TypeError, ZeroDivisionError, TimeoutError, RecursionError, sympy.SympifyError):
        return False


@contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    """Bound one sympy call; only possible in the main thread (SIGALRM), a no-op elsewhere."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: Any) -> None:
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


_TOKEN_RE = re.compile(r"\d+\.?\d*|\.\d+|\\frac|\\sqrt|\\pi|\\cdot|\\times|[a-zA-Z]+|[-+*/^(){}\[\]]")


class _Parser:
    """expr := term (+|- term)* ; term := unary (*|/|implicit unary)* ; unary := -unary | power ;
    power := atom (^ unary)? ; atom := number | letter | pi | \\frac{e}{e} | \\sqrt{e} | (e) | {e}.
    A run of letters is a word, not a product of variables ("odd" must not equal "dod"): refused."""

    def __init__(self, text: str) -> None:
        self.tokens: list[str] = []
        pos = 0
        while pos < len(text):
            match = _TOKEN_RE.match(text, pos)
            if match is None:
                raise ValueError(f"unparsable at {text[pos:]!r}")
            self.tokens.append(match.group())
            pos = match.end()
        self.pos = 0

    def parse(self) -> Any:
        expr = self._expr()
        if self.pos != len(self.tokens):
            raise ValueError("trailing tokens")
        return expr

    def _peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _take(self, expected: str | None = None) -> str:
        token = self._peek()
        if token is None or (expected is not None and token != expected):
            raise ValueError(f"expected {expected!r}, got {token!r}")
        self.pos += 1
        return token

    def _expr(self) -> Any:
        value = self._term()
        while self._peek() in ("+", "-"):
            value = value + self._term() if self._take() == "+" else value - self._term()
        return value

    def _term(self) -> Any:
        value = self._unary()
        while True:
            token = self._peek()
            if token in ("*", "/", "\\cdot", "\\times"):
                self._take()
                value = value / self._unary() if token == "/" else value * self._unary()
            elif token is not None and token not in ("+", "-", ")", "}", "]", "^"):
                value = value * self._unary()  # implicit multiplication: 2x, 2\sqrt{3}, (a)(b)
            else:
                return value

    def _unary(self) -> Any:
        if self._peek() in ("-", "+"):
            return -self._unary() if self._take() == "-" else self._unary()
        return self._power()

    def _power(self) -> Any:
        base = self._atom()
        if self._peek() != "^":
            return base
        self._take()
        exponent = self._unary()
        if not exponent.is_number or abs(exponent) > MAX_EXPONENT:
            raise ValueError("exponent too large or symbolic")
        # Nested powers of big integers would make exact arithmetic hang inside one C call.
        if base.is_Rational and (len(str(abs(base.p))) + len(str(base.q))) * abs(exponent) > MAX_DIGITS:
            raise ValueError("power too large")
        return base**exponent

    def _atom(self) -> Any:
        token = self._take()
        if token[0].isdigit() or token[0] == ".":
            return sympy.Rational(token)
        if token.isalpha() and len(token) == 1:
            return sympy.Symbol(token)
        if token == "\\pi":
            return sympy.pi
        if token == "\\frac":
            return self._group() / self._group()
        if token == "\\sqrt":
            return sympy.sqrt(self._group())
        if token in ("(", "{", "["):
            closing = {"(": ")", "{": "}", "[": "]"}[token]
            value = self._expr()
            self._take(closing)
            return value
        raise ValueError(f"unexpected {token!r}")

    def _group(self) -> Any:
        self._take("{")
        value = self._expr()
        self._take("}")
        return value
