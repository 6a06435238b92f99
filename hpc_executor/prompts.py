"""Prompt rendering. The wording lives in ``templates/*.md`` (``$name`` placeholders) so that it can
be read and edited without touching code; a user may point ``prompts_dir`` at a copy."""

from __future__ import annotations

import hashlib
import string
from pathlib import Path

TEMPLATES = Path(__file__).parent / "templates"


def render(name: str, templates: Path = TEMPLATES, **values: object) -> str:
    text = (templates / f"{name}.md").read_text()
    try:
        return string.Template(text).substitute({k: str(v) for k, v in values.items()})
    except KeyError as exc:
        raise KeyError(f"template {name}.md uses ${exc.args[0]}, which the caller does not provide") from exc


def codebase(root: Path, files: list[str], *, numbered: bool) -> str:
    """Files as fenced blocks, optionally line-numbered (the implementer's view, as in the paper)."""
    parts = []
    for rel in files:
        text = (root / rel).read_text(errors="replace")
        if numbered:
            text = "\n".join(f"{i:5d} {line}" for i, line in enumerate(text.splitlines(), 1))
        parts.append(f"### {rel}\n```\n{text}\n```")
    return "\n\n".join(parts)


def cache_key(env_name: str, role: str, prefix: str) -> str:
    """A stable name for one role's shared prefix in one environment (OpenAI's ``prompt_cache_key``): the
    same across calls, samples, epochs and resumed runs; a new one when the codebase or a template changes.
    Short (at most 58 characters) whatever the environment's name: it is an identifier, not a label."""
    return f"hpcx-{env_name[:24]}-{role}-{hashlib.sha256(prefix.encode()).hexdigest()[:16]}"
