"""Turn an implementer's answer into a change of one trial workspace, or into a reason why not.

``apply_diff`` runs the whole path: pull the diff out of the LLM's answer (``extract_diff``),
recompute its hunk headers (``repair_hunk_headers``), parse it into ``FileChange`` records
(``parse_diff``), check them against the ``WorkspacePolicy`` (``check_policy``), render one
canonical diff (``format_diff``) and hand that to ``git apply --check``, then ``git apply``
(``-C1``: one line of context must still match around each change, like ``patch``'s fuzz;
``--unidiff-zero``: no anchoring of hunks to the start or end of a file, see ``_git_apply``).

Git does the applying: it writes nothing unless every hunk of every file applies, refuses paths
outside its working directory and beyond symlinks, and its error text is what the implementer
reads when asked for a revision. We parse diffs ourselves only for what git cannot do:

* check the policy *before* anything is applied (which paths, kinds and modes a diff touches);
* repair hunk headers for the stored diff. LLMs miscount lines, and git's own ``--recount``
  cannot help with diffs that lack ``diff --git`` lines: it reads the next file's ``--- a/x``
  header as a removed line of the previous hunk;
* render a canonical form (``diff --git`` headers, ``a/``/``b/`` prefixes, explicit new/deleted
  file modes, recounted headers, blank context lines with their leading space). Git reads
  ``--- /dev/null`` under a ``diff --git`` line that lacks ``new file mode`` as a rename *from a
  file called dev/null*, so LLM diffs are never passed to git as written.

Policy decisions (invariant 1 of DESIGN.md): a diff may add, modify, delete, rename or copy
regular files whose paths (every side, rename and copy sources included) are editable and not
protected. Rejected, with a reason naming the path: absolute paths, ``..`` components, paths in
``.git``, control characters, paths over 4096 bytes or with a component over 255 (no filesystem
holds them), binary patches, symlinks (mode 120000 in the diff, or a symlink on the way to the file
in the workspace), submodules, and every mode change. New files must be mode 100644: the run
command is an argv like ``{python} train.py``, so no idea needs an executable bit, and an
executable file is one more thing that could run. Deleting an executable is allowed.

Pattern semantics (``path_matches``): patterns are posix paths relative to the baseline root;
``*``, ``?`` and ``[...]`` match within one path component (``fnmatch``), ``**`` spans any number
of directories, and a pattern that matches a directory covers everything beneath it.

Untrusted text: everything here reads LLM output, so no step may take more than linear time in
it (a backtracking expression over a header line of 30,000 spaces once took 17 s per apply).
Expressions run anchored, with no two unbounded quantifiers able to trade characters; names and
timestamps are split with ``str`` methods; globs are matched per path component, never as one
regular expression over the whole path. And the implementer's answers are capped at
``MAX_ANSWER_CHARS`` (``check_answer_size``): a longer answer is rejected with a reason, unparsed.

Errors: ``NotADiff`` for output that holds no diff; ``PatchRejected`` for a diff that breaks the
policy (recorded, never applied); ``PatchFailed`` for an allowed diff that is malformed or does not apply (its message is
fed back to the implementer). Nothing is written to the workspace in either case.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from hpc_executor.errors import NotADiff, PatchFailed, PatchRejected

__all__ = [
    "FileChange",
    "Hunk",
    "WorkspacePolicy",
    "apply_diff",
    "check_answer_size",
    "check_policy",
    "extract_diff",
    "format_diff",
    "parse_diff",
    "path_matches",
    "repair_hunk_headers",
]

REGULAR_MODE = "100644"
_DELETABLE_MODES = ("100644", "100755")
_SYMLINK_MODE = "120000"
_SUBMODULE_MODE = "160000"
_GIT_TIMEOUT_S = 60
_MAX_ERROR_CHARS = 3000
_MAX_PATH_BYTES = 4096
_MAX_NAME_BYTES = 255
_MAX_SHOWN_CHARS = 200  # of one line or name quoted in an error message
# An implementer answer longer than this is rejected unread: 25x the paper's 10,000-token diffs
# (about 40,000 characters), so it only stops a runaway answer, never a real diff.
MAX_ANSWER_CHARS = 1_000_000

_HUNK_RE = re.compile(r"^@@ -(\d+)(?:,(\d+))? +\+(\d+)(?:,(\d+))? *@@(.*)$")
# GNU diff writes "--- a/x.py\t2024-05-01 12:00:00.000 +0200"; LLMs sometimes use a space. Only
# ever matched in full against a name's last words (see _strip_timestamp), never searched for.
_TIMESTAMP_RE = re.compile(r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d(?::\d\d(?:\.\d+)?)?(?:\s*[+-]\d{4})?")
_TIMESTAMP_WORDS = 3  # date, time and zone
_WHITESPACE_RE = re.compile(r"(\s+)")
_FENCE_RE = re.compile(r"^(`{3,}|~{3,})")
_C_ESCAPES = {"a": 7, "b": 8, "t": 9, "n": 10, "v": 11, "f": 12, "r": 13, '"': 34, "\\": 92}


# --------------------------------------------------------------------------- policy


@functools.lru_cache(maxsize=256)
def _glob_parts(pattern: str) -> tuple[str, ...]:
    return tuple(p for p in pattern.strip("/").split("/") if p not in ("", "."))


def _glob_covers(glob: tuple[str, ...], parts: list[str]) -> bool:
    """Whether ``glob`` matches the leading components of ``parts`` (all, or a directory above them).

    Tracks the set of component counts the glob's parts so far can have consumed, so that ``**``
    costs one pass, not a backtracking search: O(glob parts x path components) fnmatch calls.
    """
    consumed = {0}
    for index, part in enumerate(glob):
        if part == "**":  # any number of components; at the end, at least one ("pkg/**" is not "pkg")
            consumed = set(range(min(consumed) + (index == len(glob) - 1), len(parts) + 1))
        else:
            consumed = {n + 1 for n in consumed if n < len(parts) and fnmatch.fnmatchcase(parts[n], part)}
        if not consumed:
            return False
    return max(consumed) > 0


def path_matches(path: str, patterns: tuple[str, ...] | list[str]) -> bool:
    """Whether a normalised relative posix ``path`` matches any of the glob ``patterns``."""
    parts = path.split("/")
    return any(_glob_covers(_glob_parts(p), parts) for p in patterns)


@dataclass(frozen=True)
class WorkspacePolicy:
    """Which files of the baseline a diff may change.

    ``editable``: glob patterns relative to the baseline root (see ``path_matches``).
    ``protected``: frozen files (e.g. the evaluator); never changed, even where an editable
    pattern matches them. Lists are accepted and stored as tuples.
    """

    editable: tuple[str, ...]
    protected: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # Configs hand us lists (or one string); a frozen, hashable policy wants tuples.
        for name in ("editable", "protected"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))

    def is_protected(self, path: str) -> bool:
        return path_matches(path, self.protected)

    def is_editable(self, path: str) -> bool:
        return path_matches(path, self.editable) and not self.is_protected(path)


# --------------------------------------------------------------------------- data model


@dataclass(frozen=True)
class Hunk:
    """One ``@@`` hunk with counts recomputed from its body.

    ``lines`` start with ``' '``, ``'-'``, ``'+'`` or ``'\\'`` (no newline at end of file);
    blank context lines whose leading space the LLM dropped have it back.
    ``section`` is whatever followed the closing ``@@`` (git's function context), verbatim.
    """

    old_start: int
    old_count: int
    new_start: int
    new_count: int
    lines: tuple[str, ...]
    section: str = ""

    def header(self) -> str:
        old, new = _range(self.old_start, self.old_count), _range(self.new_start, self.new_count)
        return f"@@ -{old} +{new} @@{self.section}"


@dataclass(frozen=True)
class FileChange:
    """What a diff does to one file.

    Paths are relative posix paths with the ``a/``/``b/`` prefix stripped (``None`` for
    ``/dev/null``), otherwise as written: ``check_policy`` judges absolute paths and ``..``.
    ``kind`` is ``"modify"``, ``"add"``, ``"delete"``, ``"rename"`` or ``"copy"``.
    """

    old_path: str | None
    new_path: str | None
    kind: str
    old_mode: str | None = None
    new_mode: str | None = None
    binary: bool = False
    hunks: tuple[Hunk, ...] = ()

    @property
    def path(self) -> str:
        """The path the change leaves behind (the old one for a deletion)."""
        path = self.new_path if self.new_path is not None else self.old_path
        assert path is not None  # parse_diff never builds a change without a path
        return path

    def describe(self) -> str:
        if self.kind in ("rename", "copy"):
            return f"{self.kind} {self.old_path} -> {self.new_path}"
        return f"{self.kind} {self.path}"


# --------------------------------------------------------------------------- text helpers


def _cut(text: str) -> str:
    """``text`` for an error message, cut short: messages are recorded and fed back to the LLM."""
    if len(text) <= _MAX_SHOWN_CHARS:
        return text
    return text[:_MAX_SHOWN_CHARS] + f" [... {len(text) - _MAX_SHOWN_CHARS:,} more characters]"


def _show(text: str | None) -> str:
    return _cut(repr(text))


def _range(start: int, count: int) -> str:
    # git and difflib omit the count when it is 1.
    return str(start) if count == 1 else f"{start},{count}"


def _normalise_newlines(text: str) -> str:
    """CRLF -> LF when *every* line ends in CRLF (the transport's doing, not the file's)."""
    if "\r\n" in text and text.count("\r\n") == text.count("\n"):
        return text.replace("\r\n", "\n")
    return text


def _split_lines(text: str) -> tuple[list[str], bool]:
    ends_with_newline = text.endswith("\n")
    lines = text.split("\n")
    if ends_with_newline:
        lines.pop()
    return lines, ends_with_newline


def _unquote(quoted: str) -> tuple[str, str]:
    """Parse a git C-quoted name at the start of ``quoted``; return (name, rest after it)."""
    out = bytearray()
    i = 1
    while i < len(quoted):
        c = quoted[i]
        if c == '"':
            return out.decode("utf-8", errors="replace"), quoted[i + 1 :]
        if c == "\\" and i + 1 < len(quoted):
            nxt = quoted[i + 1]
            if nxt in "01234567" and re.fullmatch(r"[0-7]{3}", quoted[i + 1 : i + 4]):
                out.append(int(quoted[i + 1 : i + 4], 8))
                i += 4
                continue
            out.append(_C_ESCAPES.get(nxt, ord(nxt)))
            i += 2
            continue
        out += c.encode()
        i += 1
    raise PatchFailed(f"unterminated quoted file name: {_show(quoted)}")


def _quote(name: str) -> str:
    """Quote a name the way git does when it holds a quote, a backslash or a control character."""
    if not any(c in '"\\' or ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return name
    escapes = {chr(code): "\\" + letter for letter, code in _C_ESCAPES.items()}
    body = "".join(
        escapes.get(c) or (f"\\{ord(c):03o}" if ord(c) < 0x20 or ord(c) == 0x7F else c) for c in name
    )
    return '"' + body + '"'


def _header_name(raw: str) -> str | None:
    """The file name of a ``---``/``+++``/``Binary files`` field; ``None`` for /dev/null."""
    raw = raw.strip(" ")
    if raw.startswith('"'):
        name, _ = _unquote(raw)
    else:
        name = _strip_timestamp(raw.split("\t", 1)[0]).rstrip()
    return None if name == "/dev/null" else name


def _strip_timestamp(name: str) -> str:
    """``name`` without a ``diff -u`` timestamp after it ("x.py 2024-05-01 12:00:00.000 +0200")."""
    pieces = _WHITESPACE_RE.split(name.rstrip())  # words at even indices, the spaces between at odd
    for words in range(_TIMESTAMP_WORDS, 0, -1):  # the longest timestamp first, as a search would
        first = len(pieces) - 2 * words + 1
        if first >= 2 and _TIMESTAMP_RE.fullmatch("".join(pieces[first:])):
            return "".join(pieces[: first - 1])
    return name


def _binary_names(line: str) -> tuple[str, str] | None:
    """The two names of a ``Binary files A and B differ`` line (the last " and " splits them)."""
    prefix, suffix = "Binary files ", " differ"
    if not (line.startswith(prefix) and line.endswith(suffix)):
        return None
    names = line[len(prefix) : -len(suffix)]
    split = names.rfind(" and ", 1, len(names) - 1)
    return None if split == -1 else (names[:split], names[split + len(" and ") :])


def _strip_prefixes(old: str | None, new: str | None) -> tuple[str | None, str | None]:
    """Drop git's ``a/``/``b/`` prefixes (-p1) when every named side carries them, else keep (-p0)."""
    if (old is None or old.startswith("a/")) and (new is None or new.startswith("b/")):
        old, new = (old[2:] if old else None), (new[2:] if new else None)
    return _clean(old), _clean(new)


def _clean(name: str | None) -> str | None:
    # "./train.py" means "train.py"; everything else is kept for check_policy to judge.
    if name is None or name.startswith("/"):
        return name
    return "/".join(part for part in name.split("/") if part != ".")


def _git_line_names(rest: str) -> tuple[str | None, str | None]:
    """Names of a ``diff --git A B`` line (only used when no other header names the files)."""
    if rest.startswith('"'):
        old, tail = _unquote(rest)
        tail = tail.strip()
        new = _unquote(tail)[0] if tail.startswith('"') else tail
        return old, new
    if (split := rest.find(' "')) != -1:
        return rest[:split], _unquote(rest[split + 1 :])[0]
    # Unquoted names may hold spaces: prefer the split that names the same file on both sides.
    # Such a split leaves sides of equal length, give or take an "a/" or "b/" prefix: three
    # candidates, in the order a scan from the left would meet them.
    for i in ((len(rest) - 3) // 2, (len(rest) - 1) // 2, (len(rest) + 1) // 2):
        if (
            0 <= i < len(rest)
            and rest[i] == " "
            and rest[:i].removeprefix("a/") == rest[i + 1 :].removeprefix("b/")
        ):
            return rest[:i], rest[i + 1 :]
    if " b/" in rest:
        old, _, new = rest.partition(" b/")
        return old, "b/" + new
    old, _, new = rest.partition(" ")
    return old, new


# --------------------------------------------------------------------------- scanning


@dataclass
class _RawHunk:
    header_index: int
    old_start: int
    old_count: int | None  # None: omitted in the header (means 1)
    new_start: int
    new_count: int | None
    section: str
    body: list[str]

    def counted(self) -> tuple[int, int]:
        old = sum(1 for line in self.body if line[:1] in (" ", "-", ""))
        new = sum(1 for line in self.body if line[:1] in (" ", "+", ""))
        return old, new


@dataclass
class _Section:
    start: int
    git_names: tuple[str | None, str | None] | None = None
    old_name: str | None = None
    new_name: str | None = None
    has_file_lines: bool = False
    extended: dict[str, str] = field(default_factory=dict)
    binary: bool = False
    hunks: list[_RawHunk] = field(default_factory=list)


class _Scanner:
    """Finds file sections and hunk bodies without trusting the hunk headers' counts."""

    def __init__(self, text: str) -> None:
        self.lines, self.ends_with_newline = _split_lines(_normalise_newlines(text))
        self.sections: list[_Section] = []
        self._scan()

    def _file_header_at(self, i: int, need_hunk: bool) -> bool:
        lines = self.lines
        if not (lines[i].startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ ")):
            return False
        # Inside a hunk, "--- x" may be a removed line "-- x": a header is followed by a hunk.
        return not need_hunk or (i + 2 < len(lines) and lines[i + 2].startswith("@@"))

    def _is_body_line(self, i: int) -> bool:
        line = self.lines[i]
        if line[:1] in (" ", "+", "\\"):
            return True
        return line[:1] == "-" and not self._file_header_at(i, need_hunk=True)

    def _scan(self) -> None:
        lines, i = self.lines, 0
        while i < len(lines):
            line = lines[i]
            if line.startswith("diff --git "):
                i = self._git_section(i)
            elif self._file_header_at(i, need_hunk=False):
                section = _Section(start=i, has_file_lines=True)
                section.old_name, section.new_name = _header_name(line[4:]), _header_name(lines[i + 1][4:])
                self.sections.append(section)
                i = self._hunks(section, i + 2)
            elif (binary := _binary_names(line)) is not None:
                section = _Section(start=i, binary=True, has_file_lines=True)
                section.old_name, section.new_name = _header_name(binary[0]), _header_name(binary[1])
                self.sections.append(section)
                i += 1
            elif line.startswith("@@"):
                raise PatchFailed(
                    f"diff line {i + 1}: hunk {_show(line)} is not preceded by a file header "
                    "('--- a/<path>' and '+++ b/<path>'); every hunk must follow its file's header"
                )
            else:
                i += 1  # prose, "Index:" or "diff -u" lines between files

    def _git_section(self, i: int) -> int:
        lines = self.lines
        section = _Section(start=i, git_names=_git_line_names(lines[i][len("diff --git ") :]))
        self.sections.append(section)
        i += 1
        keys = (
            "old mode ",
            "new mode ",
            "deleted file mode ",
            "new file mode ",
            "rename from ",
            "rename to ",
            "copy from ",
            "copy to ",
            "similarity index ",
            "dissimilarity index ",
            "index ",
        )
        while i < len(lines):
            line = lines[i]
            key = next((k for k in keys if line.startswith(k)), None)
            if key is not None:
                section.extended[key.strip()] = line[len(key) :].strip()
                i += 1
            elif line.startswith("GIT binary patch"):
                section.binary = True
                i += 1
                while i < len(lines) and not lines[i].startswith("diff --git "):
                    i += 1  # base85 payload
                return i
            elif line.startswith("Binary files "):
                section.binary = True
                return i + 1
            elif self._file_header_at(i, need_hunk=False):
                section.has_file_lines = True
                section.old_name, section.new_name = _header_name(line[4:]), _header_name(lines[i + 1][4:])
                return self._hunks(section, i + 2)
            elif line.startswith("@@"):
                raise PatchFailed(
                    f"diff line {i + 1}: hunk follows {_show(lines[section.start])} without '--- a/<path>' and "
                    "'+++ b/<path>' lines"
                )
            else:
                return i
        return i

    def _hunks(self, section: _Section, i: int) -> int:
        lines = self.lines
        while i < len(lines) and lines[i].startswith("@@"):
            match = _HUNK_RE.match(lines[i])
            if match is None:
                raise PatchFailed(
                    f"diff line {i + 1}: malformed hunk header {_show(lines[i])}; expected "
                    "'@@ -<old start>,<old count> +<new start>,<new count> @@'"
                )
            hunk = _RawHunk(
                header_index=i,
                old_start=int(match[1]),
                old_count=None if match[2] is None else int(match[2]),
                new_start=int(match[3]),
                new_count=None if match[4] is None else int(match[4]),
                section=match[5],
                body=[],
            )
            section.hunks.append(hunk)
            i = self._hunk_body(hunk, i + 1)
        return i

    def _hunk_body(self, hunk: _RawHunk, i: int) -> int:
        lines = self.lines
        while i < len(lines):
            if lines[i] == "":
                end = i
                while end < len(lines) and lines[end] == "":
                    end += 1
                if end < len(lines) and self._is_body_line(end):
                    hunk.body.extend([""] * (end - i))  # blank context inside the hunk
                    i = end
                    continue
                # Blank lines ending a hunk: context (space dropped) only as far as the header's
                # counts still miss lines; the rest separates this hunk from what follows.
                old, new = hunk.counted()
                missing = min(_or_one(hunk.old_count) - old, _or_one(hunk.new_count) - new)
                hunk.body.extend([""] * max(0, min(end - i, missing)))
                i = end
                break
            if not self._is_body_line(i):
                break
            hunk.body.append(lines[i])
            i += 1
        if not any(line[:1] in (" ", "-", "+", "") for line in hunk.body):
            raise PatchFailed(
                f"diff line {hunk.header_index + 1}: hunk {_show(lines[hunk.header_index])} has no lines"
            )
        stop = i < len(lines) and not (
            lines[i].startswith(("@@", "diff --git ")) or self._file_header_at(i, need_hunk=False)
        )
        old, new = hunk.counted()
        if stop and (old < _or_one(hunk.old_count) or new < _or_one(hunk.new_count)):
            # A short hunk cut off by a line that is no diff line: a malformed line, not prose.
            raise PatchFailed(
                f"diff line {i + 1}: {_show(lines[i])} inside the hunk at line {hunk.header_index + 1} is not a "
                "diff line; every hunk line starts with ' ' (context), '-' or '+'"
            )
        return i


def _or_one(count: int | None) -> int:
    return 1 if count is None else count


# --------------------------------------------------------------------------- public API


def _looks_like_diff(lines: list[str]) -> bool:
    for i, line in enumerate(lines):
        if line.startswith(("diff --git ", "@@ -", "GIT binary patch")) or _binary_names(line):
            return True
        if line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            return True
    return False


def _fenced_blocks(lines: list[str]) -> list[list[str]]:
    """Contents of the markdown code fences in ``lines`` (an unclosed fence runs to the end)."""
    blocks: list[list[str]] = []
    fence: str | None = None
    current: list[str] = []
    for line in lines:
        if fence is None:
            if (opening := _FENCE_RE.match(line)) is not None:
                fence, current = opening[1], []
        elif line.strip() and set(line.strip()) == {fence[0]} and len(line.strip()) >= len(fence):
            blocks.append(current)
            fence = None
        else:
            current.append(line)
    if fence is not None:
        blocks.append(current)
    return blocks


def extract_diff(text: str) -> str:
    """Pull the unified diff out of an LLM's answer.

    Takes the markdown code blocks that look like diffs (whatever their language tag; several
    are joined in order), or, with no such block, the text from its first diff line on.
    CRLF line ends become LF. Raises ``NotADiff`` when the answer holds no diff at all.
    """
    lines, _ = _split_lines(_normalise_newlines(text))
    blocks = [block for block in _fenced_blocks(lines) if _looks_like_diff(block)]
    if blocks:
        return "\n".join(line for block in blocks for line in block) + "\n"
    for i in range(len(lines)):
        if _looks_like_diff(lines[i : i + 2]):
            return "\n".join(lines[i:]) + "\n"
    snippet = " ".join(text.split())[:120]
    raise NotADiff(f"empty or non-diff output: no unified diff found in the answer ({snippet!r})")


def repair_hunk_headers(diff: str) -> str:
    """Recompute every hunk header's line counts from its body; change nothing else.

    Start lines are kept; a header whose counts are already right is left byte for byte (so
    the repair is idempotent), a wrong one is rewritten the way git prints it (count omitted
    when it is 1). Handles ``\\ No newline at end of file`` lines, omitted counts and blank
    context lines that lost their leading space. Raises ``PatchFailed`` on a malformed hunk.
    """
    scanner = _Scanner(diff)
    lines = list(scanner.lines)
    for section in scanner.sections:
        for hunk in section.hunks:
            old, new = hunk.counted()
            if (old, new) != (_or_one(hunk.old_count), _or_one(hunk.new_count)):
                lines[hunk.header_index] = (
                    f"@@ -{_range(hunk.old_start, old)} +{_range(hunk.new_start, new)} @@{hunk.section}"
                )
    return "\n".join(lines) + ("\n" if scanner.ends_with_newline else "")


def _file_change(section: _Section, line: str) -> FileChange:
    ext = section.extended
    old, new = section.old_name, section.new_name
    if not section.has_file_lines:
        assert section.git_names is not None  # sections without ---/+++ lines are git sections
        old, new = section.git_names
    old, new = _strip_prefixes(old, new)
    # git's mode lines say "created"/"deleted" even where the names (e.g. on the git line) don't.
    old = None if "new file mode" in ext else old
    new = None if "deleted file mode" in ext else new
    old_mode = ext.get("old mode") or ext.get("deleted file mode")
    new_mode = ext.get("new mode") or ext.get("new file mode")
    if "rename from" in ext or "copy from" in ext:
        kind = "rename" if "rename from" in ext else "copy"
        old = _clean(_header_name(ext.get(f"{kind} from", "")))
        new = _clean(_header_name(ext.get(f"{kind} to", "")))
        if not old or not new:
            raise PatchFailed(f"{_show(line)}: a {kind} needs both '{kind} from' and '{kind} to' lines")
    elif old is None and new is None:
        raise PatchFailed(f"{_show(line)}: both sides of the diff are /dev/null")
    elif old is None:
        kind = "add"
    elif new is None:
        kind = "delete"
    elif old != new:
        raise PatchFailed(
            f"{_show(line)}: old name {_show(old)} and new name {_show(new)} differ; edit a file under one name "
            "(renames need git's 'rename from'/'rename to' lines)"
        )
    else:
        kind = "modify"
    hunks = []
    for raw in section.hunks:
        old_count, new_count = raw.counted()
        hunks.append(
            Hunk(raw.old_start, old_count, raw.new_start, new_count, _with_spaces(raw.body), raw.section)
        )
    change = FileChange(old, new, kind, old_mode, new_mode, section.binary, tuple(hunks))
    if kind == "modify" and not hunks and not section.binary and old_mode == new_mode:
        raise PatchFailed(f"{_show(line)}: the diff for {change.path} changes nothing (no hunks)")
    return change


def _with_spaces(body: list[str]) -> tuple[str, ...]:
    # A blank context line gets back the leading space the LLM dropped.
    return tuple(" " if line == "" else line for line in body)


def parse_diff(diff: str) -> list[FileChange]:
    """Parse a unified diff (git's format or plain ``---``/``+++``) into one change per file.

    Hunk counts are recomputed from the bodies. Raises ``NotADiff`` when the text holds no
    file header at all, ``PatchFailed`` when it is a diff but malformed.
    """
    scanner = _Scanner(diff)
    if not scanner.sections:
        raise NotADiff("empty or non-diff output: no file header ('diff --git' or '---'/'+++') found")
    return [_file_change(s, scanner.lines[s.start]) for s in scanner.sections]


def _lexical_problem(path: str) -> str | None:
    if path.startswith("/"):
        return "absolute paths are not allowed"
    parts = path.split("/")
    # No filesystem holds longer ones (Linux PATH_MAX, NAME_MAX), and git takes quadratic time in them.
    if len(path.encode()) > _MAX_PATH_BYTES:
        return f"paths longer than {_MAX_PATH_BYTES} bytes are not allowed"
    if any(len(part.encode()) > _MAX_NAME_BYTES for part in parts):
        return f"path components longer than {_MAX_NAME_BYTES} bytes are not allowed"
    if ".." in parts:
        return "'..' path components are not allowed"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        return "control characters in paths are not allowed"
    if "" in parts:
        return "empty path component"
    if any(part.lower() == ".git" for part in parts):
        return "paths inside .git are not allowed"
    return None


def _symlink_on_the_way(root: Path, path: str) -> str | None:
    current = root
    for part in path.split("/"):
        current = current / part
        if current.is_symlink():
            return current.relative_to(root).as_posix()
        if not current.exists():
            return None
    return None


def _change_problems(change: FileChange, policy: WorkspacePolicy, root: Path) -> list[str]:
    label = _cut(change.describe())
    if change.binary:
        return [f"{label}: binary patches are not allowed"]
    modes = {change.old_mode, change.new_mode}
    if _SYMLINK_MODE in modes:
        return [f"{label}: symlinks (mode {_SYMLINK_MODE}) are not allowed"]
    if _SUBMODULE_MODE in modes:
        return [f"{label}: submodules (mode {_SUBMODULE_MODE}) are not allowed"]
    problems = []
    if change.kind == "add" and change.new_mode not in (None, REGULAR_MODE):
        problems.append(
            f"{label}: new files must be mode {REGULAR_MODE} (not executable), not {change.new_mode}"
        )
    elif change.kind == "delete" and change.old_mode not in (None, *_DELETABLE_MODES):
        problems.append(f"{label}: cannot delete a file of mode {change.old_mode}")
    elif change.kind not in ("add", "delete") and change.old_mode != change.new_mode:
        problems.append(f"{label}: mode changes ({change.old_mode} -> {change.new_mode}) are not allowed")
    for path in dict.fromkeys(p for p in (change.old_path, change.new_path) if p is not None):
        if (lexical := _lexical_problem(path)) is not None:
            problems.append(f"{label}: {_show(path)}: {lexical}")
        elif policy.is_protected(path):
            problems.append(f"{label}: {_show(path)} is protected (frozen) and may not be changed")
        elif not policy.is_editable(path):
            problems.append(f"{label}: {_show(path)} is outside the editable set {list(policy.editable)}")
        elif (link := _symlink_on_the_way(root, path)) is not None:
            problems.append(f"{label}: {_show(path)}: {_show(link)} is a symlink in the workspace")
    return problems


def check_policy(changes: list[FileChange], policy: WorkspacePolicy, root: Path) -> None:
    """Raise ``PatchRejected`` naming every offending path when ``changes`` break ``policy``.

    ``root`` is the directory the diff would be applied in (the trial workspace): symlinks on
    the way to a touched file are looked up there.
    """
    if not changes:
        raise NotADiff("empty or non-diff output: the diff changes no file")
    problems = [problem for change in changes for problem in _change_problems(change, policy, Path(root))]
    if problems:
        raise PatchRejected("; ".join(problems))


def format_diff(changes: list[FileChange]) -> str:
    """Render changes as the canonical diff that ``git apply -p1`` is given (and that is stored)."""
    out: list[str] = []
    for change in changes:
        if change.binary:
            raise ValueError(f"{change.describe()}: binary changes cannot be rendered")
        old = change.old_path if change.old_path is not None else change.path
        new = change.new_path if change.new_path is not None else change.path
        out.append(f"diff --git {_quote('a/' + old)} {_quote('b/' + new)}")
        if change.kind == "add":
            out.append(f"new file mode {change.new_mode or REGULAR_MODE}")
        elif change.kind == "delete":
            out.append(f"deleted file mode {change.old_mode or REGULAR_MODE}")
        elif change.old_mode and change.new_mode and change.old_mode != change.new_mode:
            out += [f"old mode {change.old_mode}", f"new mode {change.new_mode}"]
        if change.kind in ("rename", "copy"):
            out += [f"{change.kind} from {_quote(old)}", f"{change.kind} to {_quote(new)}"]
        if change.hunks:
            out.append("--- " + ("/dev/null" if change.old_path is None else _quote("a/" + old)))
            out.append("+++ " + ("/dev/null" if change.new_path is None else _quote("b/" + new)))
            for hunk in change.hunks:
                out.append(hunk.header())
                out.extend(hunk.lines)
    return "\n".join(out) + "\n"


def _git_env(workspace: Path) -> dict[str, str]:
    # No GIT_DIR/GIT_WORK_TREE from the caller, no user/system config, and no discovery of a
    # repository above the workspace: inside one, git would read that repository's config and
    # its path rules instead of treating the workspace as a plain directory.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(
        GIT_CEILING_DIRECTORIES=str(workspace.resolve().parent),
        GIT_CONFIG_NOSYSTEM="1",
        GIT_CONFIG_GLOBAL=os.devnull,
        LC_ALL="C",
    )
    return env


def _git_apply(diff: str, workspace: Path, check: bool) -> None:
    # git anchors a hunk without trailing context to the end of the file (a zero-context
    # insertion silently lands there) and one starting at line 1 to the beginning. LLM hunks often
    # stop right after the last change, so the anchoring goes (--unidiff-zero) and, like patch's
    # fuzz, context may shrink to one line around a change (-C1).
    argv = ["git", "apply", "--recount", "--unidiff-zero", "-C1", "--whitespace=nowarn", "-p1", "-"]
    if check:
        argv.insert(2, "--check")
    try:
        proc = subprocess.run(
            argv,
            input=diff,
            cwd=workspace,
            env=_git_env(workspace),
            capture_output=True,
            text=True,
            timeout=_GIT_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        raise PatchRejected(
            f"git apply took longer than {_GIT_TIMEOUT_S}s and was stopped; the diff was not applied"
        ) from None
    if proc.returncode != 0:
        message = proc.stderr.strip() or proc.stdout.strip() or f"exit status {proc.returncode}"
        if len(message) > _MAX_ERROR_CHARS:
            message = message[:_MAX_ERROR_CHARS] + "\n[... trimmed]"
        raise PatchFailed(f"the diff does not apply (git apply):\n{message}")


def check_answer_size(answer: str, limit: int = MAX_ANSWER_CHARS) -> None:
    """Raise ``PatchRejected`` when an answer is too long to be read as a diff at all."""
    if len(answer) > limit:
        raise PatchRejected(
            f"the answer is {len(answer):,} characters long, over the limit of {limit:,} for an answer "
            "(patching.MAX_ANSWER_CHARS), so it was not read; write a diff of only the hunks that change, "
            "with three lines of context"
        )


def apply_diff(text: str, workspace: Path, policy: WorkspacePolicy) -> str:
    """Apply the diff in an LLM's answer to ``workspace``, all of it or nothing.

    Runs extract -> repair -> parse -> policy -> ``git apply --check`` -> ``git apply`` and
    returns the canonical diff that was applied (``apply_diff`` of it gives it back unchanged).
    Raises ``NotADiff``, ``PatchRejected`` (against the policy) or ``PatchFailed`` (malformed,
    or git cannot apply it; the message carries git's error); the workspace is then untouched.
    """
    workspace = Path(workspace)
    changes = parse_diff(repair_hunk_headers(extract_diff(text)))
    check_policy(changes, policy, workspace)
    canonical = format_diff(changes)
    _git_apply(canonical, workspace, check=True)
    _git_apply(canonical, workspace, check=False)
    return canonical
