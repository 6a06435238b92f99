"""The whole driver with real SDKs (Anthropic ideator, OpenAI implementer) against the loopback
server: rate limits and overloads are retried, a bad diff is revised with the error fed back,
a failed LLM call is recorded and the run goes on; tokens and cost land in the ledger."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_search
from fakes.llm_server import FakeLLMServer, Reply

from hpc_executor import ledger as ledger_module

IDEA = "<idea>\n<title>Raise the learning rate</title>\n<description>Use 0.4 instead of 0.1.</description>\n</idea>"
BAD_DIFF = "```diff\n--- a/params.py\n+++ b/params.py\n@@ -1,2 +1,2 @@\n-LEARNING_RATE = 0.7\n+LEARNING_RATE = 0.4\n```"
GOOD_DIFF = ("```diff\n--- a/params.py\n+++ b/params.py\n@@ -1,4 +1,4 @@\n"
             " # Hyperparameters of the toy \"training\" run; ideas edit these.\n"
             "-LEARNING_RATE = 0.1\n+LEARNING_RATE = 0.4\n STEPS = 20\n MOMENTUM = 0.0\n```")  # fmt: skip


def test_search_with_real_sdks_against_the_loopback_server(tmp_path: Path) -> None:
    with FakeLLMServer() as server:
        server.script(
            "ok",  # the start-up checks of both models (GET /v1/models/...)
            "ok",
            429,
            Reply(text=IDEA),  # ideator: rate limited, then the idea (anthropic)
            529,
            Reply(text=BAD_DIFF),  # implementer: overloaded, then a diff that does not apply
            Reply(text=GOOD_DIFF),  # the revision, with git's error in its prompt
        )
        fast = ["backoff_s=0.01", "max_retries=2", "timeout_s=10"]
        proc = run_search(
            "+env=quick", "+model=sonnet_ideas_gpt5_code", "strategy.epochs=1", "strategy.batch_size=1",
            "strategy.call_size=1", "model.samples=1", "model.revisions=1",
            f"model.ideator.base_url={server.url}", f"model.implementer.base_url={server.url}/v1",
            *[f"model.{role}.{kv}" for role in ("ideator", "implementer") for kv in fast],
            cwd=tmp_path, env={"ANTHROPIC_API_KEY": "sk-ant-dummy", "OPENAI_API_KEY": "sk-dummy"},
        )  # fmt: skip
        checks = [r.path for r in server.requests if r.method == "GET"]
        posts = [r for r in server.requests if r.method == "POST"]
        revise_prompt = posts[-1].body["input"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert checks == ["/v1/models/claude-sonnet-4-5", "/v1/models/gpt-5"]  # both models checked at start-up
    assert [r.path for r in posts] == ["/v1/messages"] * 2 + ["/v1/responses"] * 3
    assert "could not be used" in revise_prompt and "LEARNING_RATE = 0.7" in revise_prompt

    frames = ledger_module.load(tmp_path / "outputs/quick-sonnet_ideas_gpt5_code-evolution-seed0")
    calls = frames["llm_calls"].set_index("call_id")
    assert calls.loc["e0-ideate-0-a0", "attempts"] == 2
    assert calls.loc["e0-000-s0-r0", "attempts"] == 2 and calls.loc["e0-000-s0-r1", "purpose"] == "revise"
    assert (calls.cost_usd > 0).all() and (calls.input_tokens > 0).all()
    result = frames["results"].set_index("trial_id").loc["e0-000-t0"]
    assert result.status == "ok" and result.reward > 9.95


def test_a_failing_llm_is_recorded_and_the_run_goes_on(tmp_path: Path) -> None:
    with FakeLLMServer() as server:
        server.script(
            "ok", "ok", *[500] * 9
        )  # the model checks pass; every ideator attempt of all three tries fails
        proc = run_search(
            "+env=quick", "+model=sonnet", "strategy.epochs=1", "strategy.batch_size=1", "strategy.call_size=1",
            f"model.ideator.base_url={server.url}", "model.ideator.backoff_s=0.01", "model.ideator.max_retries=2",
            f"model.implementer.base_url={server.url}",
            cwd=tmp_path, env={"ANTHROPIC_API_KEY": "sk-ant-dummy"},
        )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "idea slots stay empty" in proc.stdout + proc.stderr
    calls = ledger_module.load(tmp_path / "outputs/quick-sonnet-evolution-seed0")["llm_calls"]
    assert len(calls) == 3 and calls.error.str.contains("HTTP 500").all()


def test_a_spent_budget_stops_new_calls_and_a_larger_one_resumes(tmp_path: Path) -> None:
    args = ["+env=quick", "+model=sonnet", "strategy.epochs=1", "strategy.batch_size=1", "strategy.call_size=1",
            "model.samples=1", "model.revisions=0"]  # fmt: skip
    with FakeLLMServer() as server:
        urls = [f"model.{role}.base_url={server.url}" for role in ("ideator", "implementer")]
        env = {"ANTHROPIC_API_KEY": "sk-ant-dummy"}
        server.script(
            "ok", "ok", Reply(text=IDEA)
        )  # model checks, then 120 tokens in at $3/M + 45 out at $15/M = $0.001035
        first = run_search(*args, *urls, "budget_usd=0.001", cwd=tmp_path, env=env)
        server.script("ok", "ok", Reply(text=GOOD_DIFF.replace("```diff", "```")))
        second = run_search(*args, *urls, "budget_usd=1", cwd=tmp_path, env=env)
        paths = [r.path for r in server.requests if r.method == "POST"]
    assert first.returncode == 0, first.stderr[-3000:]
    assert "LLM budget reached ($0.0010 of $0.0010 spent)" in first.stdout
    assert "1 ideas left unimplemented" in first.stdout
    assert "LLM usage" in first.stdout and "$0.0010 of $0.0010 spent" in first.stdout
    assert second.returncode == 0, second.stderr[-3000:]
    assert paths == ["/v1/messages", "/v1/messages"]  # the idea was not asked for again, only implemented
    frames = ledger_module.load(tmp_path / "outputs/quick-sonnet-evolution-seed0")
    calls = frames["llm_calls"].set_index("call_id")
    assert list(calls.outcome) == ["ok", "applied"]
    assert calls.cost_usd.sum() == pytest.approx(2 * 0.001035)
    assert frames["results"].set_index("trial_id").loc["e0-000-t0", "status"] == "ok"
    usage_table = second.stdout.split("LLM usage")[1]
    usage_rows = [line.split("│") for line in usage_table.splitlines() if line.count("│") == 12]
    assert [cells[1].strip() for cells in usage_rows] == ["ideator", "implementer", "all"]
    assert "$0.0021 of $1.00 spent" in second.stdout


def test_an_unknown_model_stops_the_run_before_any_work(tmp_path: Path) -> None:
    with FakeLLMServer() as server:
        proc = run_search(
            "+env=quick", "+model=sonnet", f"model.ideator.base_url={server.url}", "model.ideator.model=claude-nope",
            f"model.implementer.base_url={server.url}", cwd=tmp_path, env={"ANTHROPIC_API_KEY": "sk-ant-dummy"},
        )  # fmt: skip
        posts = [r for r in server.requests if r.method == "POST"]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "anthropic:claude-nope: model check" in proc.stderr and "HTTP 404" in proc.stderr
    assert posts == [] and not (tmp_path / "outputs").exists()


@pytest.mark.slow
def test_a_tiny_search_on_real_sdks_with_ideas_as_json_and_catalog_diffs(tmp_path: Path) -> None:
    """The issue's acceptance run: the tiny environment, both roles on the loopback server, scripted
    with real ideas (in JSON, not the asked-for tags) and real diffs (one with miscounted hunk headers)."""
    catalog = {e["id"]: e for e in yaml.safe_load((REPO / "environments/tiny/catalog.yaml").read_text())}
    chosen = [catalog["higher_lr"], catalog["warmup_cosine"]]
    ideas = json.dumps([{"title": e["title"], "description": e["description"]} for e in chosen])
    diffs = []
    for entry in chosen:
        diff = entry["diff"]
        for name, values in entry.get("params", {}).items():
            diff = diff.replace(f"<<{name}>>", values[0])
        diffs.append(
            Reply(text=f"Here is the change.\n```diff\n{diff}```", input_tokens=9000, output_tokens=700)
        )
    with FakeLLMServer() as server:
        server.script(
            "ok", "ok", Reply(text=f"```json\n{ideas}\n```", input_tokens=5000, output_tokens=900), *diffs
        )
        proc = run_search(
            "+env=tiny", "+model=opus", "strategy.epochs=1", "strategy.batch_size=2", "strategy.call_size=2",
            "model.samples=1", "model.implementer.max_concurrency=1",
            f"model.ideator.base_url={server.url}", f"model.implementer.base_url={server.url}",
            cwd=tmp_path, env={"ANTHROPIC_API_KEY": "sk-ant-dummy"}, timeout=900,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    frames = ledger_module.load(tmp_path / "outputs/tiny-opus-evolution-seed0")
    results = frames["results"].set_index("trial_id")
    assert list(results.loc[["e0-000-t0", "e0-001-t0"], "status"]) == ["ok", "ok"]
    assert (results.loc[["e0-000-t0", "e0-001-t0"], "reward"] > results.loc["baseline-t0", "reward"]).all()
    calls = frames["llm_calls"]
    # Opus at $5/$25 per million: 5000 in + 900 out, then twice 9000 in + 700 out
    assert calls.cost_usd.sum() == pytest.approx((5000 * 5 + 900 * 25 + 2 * (9000 * 5 + 700 * 25)) / 1e6)
    assert "LLM usage" in proc.stdout and "$0.1725" in proc.stdout
