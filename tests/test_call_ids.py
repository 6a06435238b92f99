"""LLM call ids stay unique across resumes: a run whose ideator calls failed resumes, again and again."""

from __future__ import annotations

from pathlib import Path

from conftest import run_search
from fakes.llm_server import FakeLLMServer, Reply
from test_llm_pipeline import GOOD_DIFF, IDEA

from hpc_executor import ledger as ledger_module

ARGS = ("+env=quick", "+model=sonnet", "strategy.epochs=1", "strategy.batch_size=1", "strategy.call_size=1",
        "model.samples=1", "model.revisions=0", "model.ideator.backoff_s=0.01", "model.ideator.max_retries=0",
        "run_baseline=false")  # fmt: skip


def test_a_run_with_failed_ideator_calls_resumes_twice(tmp_path: Path) -> None:
    with FakeLLMServer() as server:
        urls = [f"model.{role}.base_url={server.url}" for role in ("ideator", "implementer")]
        env = {"ANTHROPIC_API_KEY": "sk-ant-dummy"}
        runs = []
        for script in (
            [500] * 3,  # every attempt of the first session fails
            [500, 500, 500],  # and of the second
            [Reply(text=IDEA), Reply(text=GOOD_DIFF.replace("```diff", "```"))],  # the third gets its idea
        ):
            server.script("ok", "ok", *script)  # the model checks, then the calls
            runs.append(run_search(*ARGS, *urls, cwd=tmp_path, env=env))
    for proc in runs:
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
    frames = ledger_module.load(tmp_path / "outputs/quick-sonnet-evolution-seed0")
    calls = frames["llm_calls"]
    ideator = calls[calls.role == "ideator"].sort_values("created_at")
    assert list(ideator.call_id) == [f"e0-ideate-0-a{i}" for i in range(7)]
    assert ideator.error.notna().sum() == 6 and ideator.outcome.iloc[-1] == "ok"
    assert frames["results"].set_index("trial_id").loc["e0-000-t0", "status"] == "ok"
