"""The paper's strict answer equivalence (protected; grader.py's default, `GRPO_GRADER=strict`).

The paper's `drgrpo_grader.py` calls two answers equal when either
1. their Hendrycks-MATH normalisations are the same string (`\\dfrac12` = `\\frac{1}{2}`,
   `0.5` = `\\frac{1}{2}`, `x = 5` = `5`, `\\text{odd}` = `odd`, `50\\%` = `50`), or
2. after the PRM800K normalisation (LaTeX to plain text, units and braces dropped, lower case) they
   are the same string, or sympy finds their difference to be 0, under three rules that keep it
   strict: two fractions a/b must match literally (`\\frac{2}{4}` != `\\frac{1}{2}`), an integer only
   equals an integer (`5` != `\\frac{10}{2}`), and tuples/intervals match element by element with the
   same brackets. A decimal equals a fraction only exactly (`0.25` = `\\frac14`, `0.33` !=
   `\\frac13`); subscripts are compared as written (`1011_2` != `1011_3`).

This is our own implementation of those rules. Two narrow differences from the paper's code: the
long MathQA list of unit words it strips from both answers (single letters among them) is not
reproduced, only units inside `\\text{}` and the 16 PRM800K unit words are dropped; and LaTeX is turned
into plain text by the small converter below, not by pylatexenc. An empty ground truth (two MATH
training problems) equals nothing.
"""

from __future__ import annotations

import re

import sympy
from sympy.parsing import sympy_parser

TUPLE_BRACKETS = "()[]"
UNIT_WORDS = ("degree", "cm", "centimeter", "meter", "mile", "second", "minute", "hour", "day", "week",
              "month", "year", "foot", "feet", "inch", "yard")  # fmt: skip
# sympy can hang on these (towers of powers); such answers are only compared as strings
UNSAFE_FOR_SYMPY = re.compile(r"\^\{|\^\(|\^[0-9]+\^|\^[0-9][0-9]+")
FRACTION = re.compile(r"^-?[0-9]+.?/0*[1-9][0-9]*.?$")
SYMPY_TRANSFORMS = (*sympy_parser.standard_transformations, sympy_parser.implicit_multiplication_application)


def strictly_equivalent(answer: str, ground_truth: str) -> bool:
    if not answer.strip() or not ground_truth.strip():
        return False
    if hendrycks_normalize(answer) == hendrycks_normalize(ground_truth):
        return True
    return _sympy_equivalent(prm_normalize(answer), prm_normalize(ground_truth))


def last_boxed(solution: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) in a MATH solution, braces matched."""
    start = max(solution.rfind("\\boxed{"), solution.rfind("\\fbox{"))
    if start < 0:
        return None
    i = solution.index("{", start)
    depth = 0
    for j in range(i, len(solution)):
        if solution[j] == "{":
            depth += 1
        elif solution[j] == "}":
            depth -= 1
            if depth == 0:
                return solution[i + 1 : j]
    return None


# -- 1. Hendrycks MATH normalisation --------------------------------------------------------------


def hendrycks_normalize(text: str) -> str:
    s = text.strip()
    if m := re.fullmatch(r"\\text\{(.+?)\}", s):
        s = m.group(1).strip()
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"),
                     ("bmatrix", "pmatrix"), ("\\left", ""), ("\\right", ""), ("\\neq", "\\ne"),
                     ("\\leq", "\\le"), ("\\geq", "\\ge")):  # fmt: skip
        s = s.replace(old, new)
    s = re.sub(r"\\begin\{array\}\{.*?\}", r"\\begin{pmatrix}", s).replace("\\end{array}", "\\end{pmatrix}")
    without_unit = re.sub(r"\\text\{.*?\}$", "", s).strip()  # "5 \text{ cm}" -> "5"
    if without_unit:
        s = without_unit
    for old in ("^{\\circ}", "^\\circ", "\\$", "\\%"):
        s = s.replace(old, "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    if len(parts := s.split("=")) == 2 and len(parts[0]) <= 2:  # "x = 5" -> "5"
        s = parts[1]
    s = re.sub(r"\\sqrt([^{\\])", r"\\sqrt{\1}", s)  # \sqrt3 -> \sqrt{3}
    s = s.replace(" ", "")
    s = _brace_short_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    if m := re.fullmatch(r"(-?\d+)/(\d+)", s):
        s = f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}"
    return s


# -- 2. PRM800K normalisation and the sympy comparison ----------------------------------------------


def prm_normalize(text: str) -> str:
    s = text
    if m := re.fullmatch(r"\\text\{(.+?)\}", s):
        s = m.group(1)
    s = s.replace("\\%", "").replace("\\$", "").replace("$", "").replace("%", "")
    s = s.replace(" or ", " , ").replace(" and ", " , ")
    for word, power in (("million", "6"), ("billion", "9"), ("trillion", "12")):
        s = s.replace(word, f"*10^{power}")
    for unit in UNIT_WORDS:
        s = re.sub(rf"{unit}(es)?(s)? *(\^[0-9]+)?", "", s)
    s = re.sub(r"\^ *\\circ", "", s)
    if s.startswith("{") and s.endswith("}"):
        s = s[1:-1]
    s = re.sub(r",\\! *", "", s)
    if _is_number(s) and _is_integral(float(s)):
        s = str(round(float(s)))
    if "\\" in s:
        s = latex_to_plain(s)
    s = re.sub(r"- *", "-", s)
    s = re.sub(r"([0-9]) +([0-9])", r"\1+\2", s)  # a mixed number: 7 3/4 -> 7+3/4
    s = s.replace(" ", "").replace("{", "").replace("}", "").lower()
    if _is_integer_string(s):
        s = str(round(float(_strip_thousands(s))))
    return s


def latex_to_plain(s: str) -> str:
    """Enough LaTeX-to-text for MATH answers: fractions, roots and a few symbols become sympy syntax."""
    s = s.replace("\\tfrac", "\\frac").replace("\\dfrac", "\\frac")
    s = _brace_short_fracs(s)
    group = r"\{([^{}]*)\}"
    while re.search(r"\\frac" + group + group, s):
        s = re.sub(r"\\frac" + group + group, lambda m: f" {_atom(m[1])}/{_atom(m[2])}", s)
    while re.search(r"\\sqrt" + group, s):
        s = re.sub(r"\\sqrt" + group, lambda m: f"sqrt({m[1]})", s)
    s = re.sub(r"\\sqrt(\w)", r"sqrt(\1)", s)
    for latex, plain in (("\\pi", "pi"), ("\\infty", "inf"), ("\\cup", "U"), ("\\cdot", "*"), ("\\times", "*"),
                         ("\\left", ""), ("\\right", ""), ("\\,", ""), ("\\!", ""), ("\\%", "")):  # fmt: skip
        s = s.replace(latex, plain)
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", s)
    return s.strip()


def _brace_short_fracs(s: str) -> str:
    """\\frac12 -> \\frac{1}{2} and \\frac1{72} -> \\frac{1}{72}."""
    s = re.sub(r"\\frac([^{\\\s])([^{\\\s])", r"\\frac{\1}{\2}", s)
    return re.sub(r"\\frac([^{\\\s])\{", r"\\frac{\1}{", s)


def _atom(expr: str) -> str:
    return expr if re.fullmatch(r"-?\w+(\.\w+)?", expr) else f"({expr})"


def _sympy_equivalent(given: str, truth: str) -> bool:
    if given == truth:
        return True
    if not given:
        return False
    truth_items, given_items = _split_tuple(truth), _split_tuple(given)
    if len(truth_items) > 1 and (truth[0] != given[0] or truth[-1] != given[-1]):
        return False  # (1, 2) is not [1, 2)
    if len(truth_items) != len(given_items):
        return False
    for t, g in zip(truth_items, given_items, strict=True):
        if FRACTION.match(t) and FRACTION.match(g):
            same = t == g  # an unreduced fraction is not the reduced one
        elif _is_integer_string(t) != _is_integer_string(g):
            same = False  # an integer answer must be an integer
        else:
            same = _sympy_zero_difference(t, g)
        if not same:
            return False
    return True


def _sympy_zero_difference(a: str, b: str) -> bool:
    expr = f"({a})-({b})"
    letters = {c for c in expr.replace("sqrt", "").replace("frac", "") if c.isalpha()}
    if len(letters) > 2 or UNSAFE_FOR_SYMPY.search(expr):
        return False
    try:
        parsed = sympy_parser.parse_expr(expr.replace("^", "**"), transformations=SYMPY_TRANSFORMS)
        return sympy.simplify(parsed) == 0
    except Exception:  # anything sympy cannot read is simply not equal
        return False


def _split_tuple(s: str) -> list[str]:
    s = _strip_thousands(s)
    inner = s[1:-1]
    if (
        len(s) > 2
        and s[0] in TUPLE_BRACKETS
        and s[-1] in TUPLE_BRACKETS
        and not any(c in inner for c in TUPLE_BRACKETS)
    ):
        return [item.strip() for item in inner.split(",")]
    return [s] if s else []


def _strip_thousands(s: str) -> str:
    """1,000,000 -> 1000000, leaving tuple commas alone."""
    while (stripped := re.sub(r"(\d),(\d\d\d)($|\D)", r"\1\2\3", s)) != s:
        s = stripped
    return s


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _is_integral(x: float) -> bool:
    try:
        return abs(x - round(x)) <= 1e-7
    except (OverflowError, ValueError):
        return False


def _is_integer_string(s: str) -> bool:
    s = _strip_thousands(s)
    return _is_number(s) and _is_integral(float(s))
