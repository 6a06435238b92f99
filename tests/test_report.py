"""The HTML report: written by the search, self-contained, with every view, rendering in a real
headless Chromium (Debian's) without console errors and with no blank figure."""

from __future__ import annotations

import io
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import run_search
from PIL import Image

from hpc_executor import ledger as ledger_module
from hpc_executor.ledger import Ledger
from hpc_executor.types import Idea

FIGURES = ["Search curve", "Execution rate", "Outcomes", "Evolutionary search vs best-of-N",
           "Self- vs cross-execution", "Idea diversity", "Thinking length vs execution rate",
           "LLM dollars and GPU-hours"]  # fmt: skip


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """Two runs side by side: evolution with baseline noise and a confirmation, and best-of-N with
    another implementer (a cross-execution pair) whose ledger records thinking tokens."""
    root = tmp_path_factory.mktemp("sweep")
    evolution = run_search("+env=quick", "+model=offline", "+env.extra_env.QUICK_SEED_NOISE=0.1",
                           "noise.baseline_repeats=3", "confirm.top_k=2", "confirm.seeds=2", "run_name=evo", cwd=root)  # fmt: skip
    assert evolution.returncode == 0, evolution.stderr[-3000:]
    best_of_n = run_search("+env=quick", "+model=offline", "strategy=best_of_n", "model.implementer.model=stand-in-b",
                           "report.enabled=false", "run_name=bon", cwd=root)  # fmt: skip
    assert best_of_n.returncode == 0, best_of_n.stderr[-3000:]
    db = sqlite3.connect(root / "outputs" / "bon" / "ledger.sqlite")
    db.execute("ALTER TABLE llm_calls ADD COLUMN thinking_tokens INTEGER")  # as a ledger that records them
    db.execute("UPDATE llm_calls SET thinking_tokens = length(prompt) % 997 WHERE role = 'ideator'")
    db.commit()
    db.close()
    return root / "outputs", evolution.stdout


def test_the_search_ends_by_writing_its_report(sweep: tuple[Path, str]) -> None:
    outputs, stdout = sweep
    match = re.search(r"report: (\S+report\.html)", stdout)
    assert match and Path(match.group(1)).is_file() and Path(match.group(1)).parent.name == "evo"
    assert not (outputs / "bon" / "report.html").exists(), "report.enabled=false writes none"


def render(outputs: Path, out: Path, *flags: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "hpc_executor.report", str(outputs), "--out", str(out), *flags],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == str(out)
    return out.read_text()


@pytest.fixture(scope="module")
def report(sweep: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sweep's report, with idea embeddings where installed."""
    out = tmp_path_factory.mktemp("report") / "report.html"
    render(sweep[0], out)
    return out


def test_the_report_is_one_self_contained_page_with_the_runs_numbers(
    sweep: tuple[Path, str], report: Path
) -> None:
    outputs, _ = sweep
    page = report.read_text()
    sources = re.findall(r'src="([^"]*)"', page)
    assert len(sources) == len(FIGURES) and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"https?://|<script|<link|url\(", page), "nothing is fetched: it opens offline"
    for title in FIGURES:
        assert f'alt="{title}"' in page, f"figure {title!r} missing"

    frames = ledger_module.load(outputs / "evo")
    baseline = frames["results"][frames["results"].trial_id.str.startswith("baseline")].reward
    assert (
        f"baseline {statistics.fmean(baseline):.4f} ± {statistics.stdev(baseline):.4f} over 3 seeds" in page
    )
    confirmations = frames["confirmations"].sort_values("mean", ascending=False)
    first = confirmations.iloc[0]
    assert f"confirmed: {first['mean']:.4f} ± {first['std']:.4f} over 2/2 fresh seeds" in page
    ideas = page.split("Top ideas")[1]
    assert ideas.index(f"{first['mean']:.4f} ±") < ideas.index(f"{confirmations.iloc[1]['mean']:.4f} ±"), (
        "confirmed ideas rank by their confirmed reward"
    )
    assert ideas.count("NOT CONFIRMED") == 2, "winners that do not confirm are flagged"
    assert "<summary>diff</summary><pre>diff --git a/params.py" in ideas and "trained: x=" in ideas, (
        "diff and log tail"
    )


def test_without_a_second_strategy_or_pair_the_report_says_so(
    sweep: tuple[Path, str], tmp_path: Path
) -> None:
    outputs, _ = sweep
    page = render(outputs / "evo", tmp_path / "one.html", "--similarity", "jaccard")
    assert "not available: the runs use evolution only" in page
    assert "not available: one ideator/implementer pair" in page
    assert "not available: the ledger records no thinking tokens" in page


@pytest.mark.skipif(not shutil.which("chromium"), reason="chromium not installed (apt-get install chromium)")
def test_the_report_renders_in_headless_chromium(report: Path) -> None:
    from cdp import Browser

    browser = Browser()
    try:
        browser.open(report.as_uri())
        images = browser.evaluate(
            "[...document.images].map(i => { const r = i.getBoundingClientRect();"
            " return [i.alt, i.naturalWidth, i.naturalHeight, r.x, r.y + window.scrollY, r.width, r.height]; })"
        )
        assert browser.errors() == [], "the page loads without console errors"
        assert [i[0] for i in images] == FIGURES
        for alt, natural_w, natural_h, x, y, w, h in images:
            assert natural_w > 0 and natural_h > 0 and w > 0 and h > 0, f"{alt} did not render"
            pixels = np.asarray(
                Image.open(io.BytesIO(browser.screenshot(x, y, w, h))).convert("L"), dtype=float
            )
            assert pixels.std() > 5, f"{alt} is blank on screen"
    finally:
        browser.close()


def test_a_run_without_ideas_yet_still_gets_its_page(tmp_path: Path) -> None:
    run = Ledger(tmp_path, create=True)
    run.set_meta("config", "strategy: {name: evolution}\nenv: {reward: {baseline: 1.0}}\n")
    run.add_idea(Idea("baseline", 0, "Unmodified baseline", "as shipped", kind="baseline"), slot=-1)
    run.close()
    page = render(tmp_path, tmp_path / "empty.html", "--similarity", "jaccard")
    assert 'Outcomes</h2><p class="na">no ideas yet' in page and "no idea executed yet" in page
    missing = subprocess.run([sys.executable, "-m", "hpc_executor.report", str(tmp_path / "nowhere")],
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert missing.returncode == 2 and "no run under" in missing.stderr
