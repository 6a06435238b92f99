"""analysis/explore_run.ipynb runs top to bottom against a run the test makes, so it cannot rot."""

from __future__ import annotations

from pathlib import Path

import nbformat
from conftest import REPO, run_search
from nbclient import NotebookClient

from hpc_executor import analysis

NOTEBOOK = REPO / "analysis" / "explore_run.ipynb"


def test_the_notebook_executes_against_a_fresh_run(tmp_path: Path, monkeypatch) -> None:
    proc = run_search("+env=quick", "+model=offline", "noise.baseline_repeats=2", "confirm.top_k=1",
                      "confirm.seeds=2", "report.enabled=false", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "outputs" / "quick-offline-evolution-seed0"
    assert analysis.outcomes(run_dir).idea_id.is_unique, "extra seeds (repeats, confirmations) add no rows"
    monkeypatch.setenv("HPCX_RUN", str(run_dir))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # a failing cell raises CellExecutionError with its traceback
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    text = "\n".join(
        output.get("text", "") + str(output.get("data", {}).get("text/plain", ""))
        for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
    )  # fmt: skip
    assert "over 2 runs" in text, "the noise view shows the baseline's two runs"
    assert "mean_distance" in text and "gpu_hours" in text and "runs_ok" in text
