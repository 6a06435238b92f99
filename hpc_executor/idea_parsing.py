"""Ideas out of an ideator's answer, whatever shape the model chose.

The prompt asks for ``<idea><title>..</title><description>..</description></idea>`` blocks, but
models drift: they answer in JSON (bare or in a fenced block, a list or ``{"ideas": [...]}``), in
numbered or bulleted lists (``1. **Title**: text``), or under markdown headings (``## Idea 1:
Title``), with prose around it. The formats are tried from the most to the least explicit and the
first that yields ideas wins, so a stray list in the prose of an XML answer is never mistaken for
ideas. A list item that opens with a sentence instead of a title (``1. Use a cosine decay ...``) is
an idea too: the item is its description, and the sentence's opening clause its title. Nothing here
raises: an answer without ideas gives an empty list, and the caller records it.
"""

from __future__ import annotations

import json
import re
from typing import Any

Idea = tuple[str, str]  # (title, description)

# Tags are found one by one and paired in order: a lazy "<idea>(.*?)</idea>" searched over an answer
# of many unclosed tags takes quadratic time (20,000 "<idea>" took 24 s).
_XML_TAGS = {name: re.compile(f"<(/?){name}>", re.IGNORECASE) for name in ("idea", "title", "description")}
# Where decoding JSON is tried: each try may read to the end of the answer, so a degenerate answer
# ("[1, [1, [1, ...") is not tried at every bracket.
MAX_JSON_STARTS = 50
_FENCE = re.compile(r"```[\w-]*[ \t]*\n(.*?)```", re.DOTALL)
# "1. ", "2) ", "Idea 3:", "## Idea 4 -", "### 5." at the start of a line
_NUMBERED = re.compile(
    r"^[ \t]*(?:#{1,6}[ \t]*)?(?:\*\*)?(?:idea[ \t]*\d{1,3}[ \t]*[-–—:.)]|\d{1,3}[.):])(?:\*\*)?[ \t]+",
    re.IGNORECASE | re.MULTILINE,
)
_BULLET = re.compile(r"^([ \t]*)[-*•][ \t]+", re.MULTILINE)
_HEADING = re.compile(r"^[ \t]*#{1,6}[ \t]+(.+)$", re.MULTILINE)
_TITLE_KEYS = ("title", "name", "idea", "headline")
_DESCRIPTION_KEYS = ("description", "details", "summary", "rationale", "text", "body")
MAX_TITLE_CHARS = 200
# A list item of fewer words is a topic ("1. dropout"), not an idea the implementer could act on.
MIN_SENTENCE_WORDS = 3
MAX_DERIVED_TITLE_WORDS = 8
# Where a sentence's opening clause ends: a comma, semicolon, colon, bracket, spaced dash or a full stop.
_CLAUSE_END = re.compile(r"[,;:(\[]|[ \t][-–—][ \t]|[.!?](?:\s|$)")
_WRAPPING_BOLD = re.compile(r"^\*\*([^*]+)\*\*$")


def parse_ideas(text: str) -> list[Idea]:
    """(title, description) pairs, in the order the answer gives them; [] when it holds none."""
    for parse in (_from_xml, _from_json, _from_numbered, _from_bullets, _from_headings):
        ideas = [idea for idea in parse(text) if idea[0] and idea[1]]
        if ideas:
            return ideas
    return []


def _clean_title(title: str) -> str:
    title = " ".join(title.split())
    title = re.sub(r"^(?:\*\*|__)(.*?)(?:\*\*|__)$", r"\1", title).strip(" *_#:-–—")
    title = re.sub(r"^idea[ \t]*\d{0,3}[ \t]*[-–—:.][ \t]*", "", title, flags=re.IGNORECASE)
    return title[:MAX_TITLE_CHARS].strip()


def _from_xml(text: str) -> list[Idea]:
    ideas = []
    for block in _tagged(text, "idea"):
        titles, descriptions = _tagged(block, "title"), _tagged(block, "description")
        if titles and descriptions:
            ideas.append((_clean_title(titles[0]), descriptions[0].strip()))
    return ideas


def _tagged(text: str, name: str) -> list[str]:
    """The text between each ``<name>`` and the first ``</name>`` after it, in one pass."""
    found, opened = [], None
    for tag in _XML_TAGS[name].finditer(text):
        if not tag[1] and opened is None:
            opened = tag.end()
        elif tag[1] and opened is not None:
            found.append(text[opened : tag.start()])
            opened = None
    return found


def _from_json(text: str) -> list[Idea]:
    candidates = [*_FENCE.findall(text), text]
    for candidate in candidates:
        for value in _json_values(candidate):
            ideas = _ideas_in(value)
            if ideas:
                return ideas
    return []


def _json_values(text: str) -> list[Any]:
    """Every JSON array or object that starts at a '[' or '{' and parses, outermost first."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    pos = 0
    for _ in range(MAX_JSON_STARTS):
        starts = [i for i in (text.find("[", pos), text.find("{", pos)) if i >= 0]
        if not starts:
            return values
        start = min(starts)
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            pos = start + 1
            continue
        except RecursionError:  # nested deeper than Python's stack: no list of ideas, nor anything after
            return values
        values.append(value)
        pos = end
    return values


def _ideas_in(value: Any) -> list[Idea]:
    if isinstance(value, dict):
        for key in ("ideas", "proposals", "items"):
            if isinstance(value.get(key), list):
                return _ideas_in(value[key])
        one = _idea_from_dict(value)
        return [one] if one else []
    if isinstance(value, list):
        return [idea for item in value if isinstance(item, dict) and (idea := _idea_from_dict(item))]
    return []


def _idea_from_dict(item: dict[str, Any]) -> Idea | None:
    lowered = {str(k).lower(): v for k, v in item.items()}
    title = next((lowered[k] for k in _TITLE_KEYS if isinstance(lowered.get(k), str)), None)
    desc = next((lowered[k] for k in _DESCRIPTION_KEYS if isinstance(lowered.get(k), str)), None)
    if title is None or desc is None:
        return None
    return _clean_title(title), desc.strip()


def _from_numbered(text: str) -> list[Idea]:
    """``1. **Title**: text``, ``Idea 2: Title`` + lines, ``### 3. Title`` + paragraphs; sub-bullets
    stay in the item's description."""
    return [_split_item(item) for item in _items(text, list(_NUMBERED.finditer(text)))]


def _from_bullets(text: str) -> list[Idea]:
    """Bulleted items at the outermost indentation (deeper bullets belong to a description)."""
    matches = list(_BULLET.finditer(text))
    outer = min((len(m.group(1)) for m in matches), default=0)
    return [_split_item(item) for item in _items(text, [m for m in matches if len(m.group(1)) == outer])]


def _from_headings(text: str) -> list[Idea]:
    """``## Title`` followed by paragraphs; one heading alone is a title for the answer, not an idea."""
    matches = list(_HEADING.finditer(text))
    if len(matches) < 2:
        return []
    ideas = []
    for match, body in zip(matches, _items(text, matches), strict=True):
        body = body.split("\n", 1)[1] if "\n" in body else ""
        ideas.append((_clean_title(match.group(1)), body.strip()))
    return ideas


def _items(text: str, matches: list[re.Match[str]]) -> list[str]:
    """The text from each match's end to the next match's start."""
    if not matches:
        return []
    ends = [m.start() for m in matches[1:]] + [len(text)]
    return [text[m.end() : end] for m, end in zip(matches, ends, strict=True)]


def _split_item(item: str) -> Idea:
    item = item.strip()
    bold = re.match(r"^(?:\*\*|__)(.+?)(?:\*\*|__)[ \t]*[:.–—-]?[ \t]*(.*)$", item, re.DOTALL)
    if bold and bold.group(2).strip():
        return _clean_title(bold.group(1)), bold.group(2).strip()
    first, _, rest = item.partition("\n")
    head, sep, tail = first.partition(": ")
    if sep and len(head) <= MAX_TITLE_CHARS:
        return _clean_title(head), (tail + "\n" + rest).strip()
    if rest.strip() and not _is_sentence(first):
        return _clean_title(first), rest.strip()
    if _word_count(item) >= MIN_SENTENCE_WORDS:
        description = _WRAPPING_BOLD.sub(r"\1", item)
        return _title_from_sentence(description), description
    return _clean_title(first), ""


def _is_sentence(line: str) -> bool:
    """A line that reads as a sentence, not a title: several words ending in a full stop, or too long
    for a title."""
    line = line.rstrip(" *_")
    return _word_count(line) >= MIN_SENTENCE_WORDS and (
        line.endswith((".", "!", "?")) or len(line) > MAX_TITLE_CHARS
    )


def _word_count(text: str) -> int:
    """Words with a letter in them: list markers, numbers and dashes do not make a sentence."""
    return sum(1 for word in text.split() if any(c.isalpha() for c in word))


def _title_from_sentence(sentence: str) -> str:
    """The opening clause, cut to a few words; the sentence's first words when that clause is too
    short to name anything ("First, ...")."""
    end = _CLAUSE_END.search(sentence)
    words = (sentence[: end.start()] if end else sentence).split()
    if len(words) < MIN_SENTENCE_WORDS:
        words = sentence.split()
    title = _clean_title(" ".join(words[:MAX_DERIVED_TITLE_WORDS]))
    return title + "…" if title and len(words) > MAX_DERIVED_TITLE_WORDS else title
