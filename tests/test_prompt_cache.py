"""Prompt caching: the shared prefix is byte-identical across samples, revisions, ideas and ideator purposes;
each provider marks it the way its API wants; cache writes and reads are priced at their own prices; the
loopback server's emulated caches hit only when the prefix really is the same."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from conftest import REPO, run_search
from fakes.llm_server import FakeLLMServer, Reply
from fakes.prompt_cache import PromptCache
from omegaconf import OmegaConf

from hpc_executor import ledger as ledger_module
from hpc_executor.environment import Environment
from hpc_executor.ideator import Ideator
from hpc_executor.implementer import Implementer
from hpc_executor.ledger import Ledger
from hpc_executor.llm import LLM, LLMRequest, LLMResponse, LLMSpec, make_llm
from hpc_executor.llm.pricing import TokenCounts, cache_prices, cost_usd
from hpc_executor.llm.warmup import CacheWarmup
from hpc_executor.types import Idea

KEY_ENV = "HPCX_TEST_CACHE_KEY"
OPUS = {"price_in_per_mtok": 5.0, "price_out_per_mtok": 25.0, "price_cache_write_per_mtok": 6.25,
        "price_cache_read_per_mtok": 0.5}  # fmt: skip
GPT5 = {"price_in_per_mtok": 1.25, "price_out_per_mtok": 10.0, "price_cache_read_per_mtok": 0.125}
STALE = "```diff\n--- a/train_gpt.py\n+++ b/train_gpt.py\n@@ -1,1 +1,1 @@\n-no such line\n+x\n```"


@pytest.fixture(autouse=True)
def fake_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-dummy")


def nanogpt() -> Environment:
    return Environment(OmegaConf.to_container(OmegaConf.load(REPO / "conf/env/nanogpt.yaml").env))


def ideas(n: int) -> list[Idea]:
    return [
        Idea(f"e0-{i:03d}", 0, f"Idea number {i}", f"Change {i}: a description of its own.") for i in range(n)
    ]


class RecordingLLM(LLM):
    """Answers every call with a diff that does not apply, so every sample is revised; keeps the requests."""

    def __init__(self, provider: str = "offline") -> None:
        super().__init__(LLMSpec(provider=provider, model="recorder"))
        self.requests: list[LLMRequest] = []
        self._lock = threading.Lock()

    def complete(self, request: LLMRequest) -> LLMResponse:
        with self._lock:
            self.requests.append(request)
        return LLMResponse(text=STALE, model="recorder")


# -- accounting --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("provider", "path", "prices", "reply", "cost", "saved"),
    [
        # 2000 plain x $5 + 8000 read x $0.50 + 500 out x $25 = $0.0265; uncached: 10000 x $5 + 500 x $25
        ("anthropic", "", OPUS, Reply(input_tokens=10000, cache_read_tokens=8000, output_tokens=500),
         0.0265, 0.0625 - 0.0265),
        # a cold cache: 2000 x $5 + 8000 written x $6.25 + 500 x $25 = $0.0725, $0.01 more than uncached
        ("anthropic", "", OPUS, Reply(input_tokens=10000, cache_write_tokens=8000, output_tokens=500),
         0.0725, -0.01),
        # 2000 x $1.25 + 8000 x $0.125 + 500 x $10 = $0.0085; uncached 10000 x $1.25 + 500 x $10 = $0.0175
        ("openai", "/v1", GPT5, Reply(input_tokens=10000, cache_read_tokens=8000, output_tokens=500),
         0.0085, 0.009),
        ("openai_compatible", "/v1", GPT5, Reply(input_tokens=10000, cache_read_tokens=8000, output_tokens=500),
         0.0085, 0.009),
    ],
)  # fmt: skip
@pytest.mark.parametrize("stream", [True, False])
def test_cache_writes_and_reads_are_priced_apart(
    provider: str, path: str, prices: dict, reply: Reply, cost: float, saved: float, stream: bool
) -> None:
    with FakeLLMServer() as server:
        server.script(reply)
        model = "claude-opus-4-5" if provider == "anthropic" else "gpt-5"
        llm = make_llm(LLMSpec(provider, model, base_url=server.url + path, api_key_env=KEY_ENV, stream=stream,
                               **prices))  # fmt: skip
        response = llm.complete(LLMRequest(prompt="idea", purpose="implement", prefix="codebase"))
    assert response.error is None
    assert response.input_tokens == 10000  # all of them, whichever way the API counts
    assert (response.cache_write_tokens, response.cache_read_tokens) == (reply.cache_write_tokens,
                                                                         reply.cache_read_tokens)  # fmt: skip
    assert response.cost_usd == pytest.approx(cost) and response.cache_saved_usd == pytest.approx(saved)


def test_unset_cache_prices_are_the_providers_multiples_of_the_input_price() -> None:
    assert cache_prices(LLMSpec("anthropic", "m", price_in_per_mtok=3.0)) == pytest.approx((3.75, 0.3))
    assert cache_prices(LLMSpec("openai", "m", price_in_per_mtok=2.0)) == pytest.approx((2.0, 0.2))
    explicit = LLMSpec("openai", "m", price_in_per_mtok=2.0, price_cache_read_per_mtok=1.0)
    assert cost_usd(explicit, TokenCounts(input=1000, output=0, cache_read=1000)) == pytest.approx(0.001)


def test_old_ledgers_gain_the_cache_columns_and_the_usage_sums_them(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path, create=True)
    ledger.db.execute("ALTER TABLE llm_calls DROP COLUMN cache_read_tokens")  # a ledger from before caching
    ledger.close()
    ledger = Ledger(tmp_path)
    for n in range(2):
        ledger.add_llm_call(f"c{n}", role="implementer", purpose="implement", provider="anthropic", model="m",
                            input_tokens=1000, output_tokens=10, cost_usd=0.001, cache_write_tokens=0,
                            cache_read_tokens=900, cache_saved_usd=0.004)  # fmt: skip
    (row,) = ledger.llm_usage()
    assert (row["input_tokens"], row["cache_read_tokens"], row["cache_write_tokens"]) == (2000, 1800, 0)
    assert row["cache_saved_usd"] == pytest.approx(0.008) and ledger.spent_usd() == pytest.approx(0.002)


# -- what goes on the wire ---------------------------------------------------------------------------------
@pytest.mark.parametrize("cache", [True, False])
def test_anthropic_puts_the_prefix_in_the_system_prompt_behind_one_breakpoint(cache: bool) -> None:
    with FakeLLMServer() as server:
        llm = make_llm(LLMSpec("anthropic", "claude-opus-4-5", base_url=server.url, api_key_env=KEY_ENV,
                               thinking_budget=2000, prompt_cache=cache))  # fmt: skip
        llm.complete(
            LLMRequest(prompt="the idea", purpose="implement", system="be brief", prefix="the codebase")
        )
        (sent,) = server.requests
    marked = {"cache_control": {"type": "ephemeral"}} if cache else {}
    assert sent.body["system"] == [{"type": "text", "text": "be brief"},
                                   {"type": "text", "text": "the codebase", **marked}]  # fmt: skip
    assert sent.body["messages"] == [{"role": "user", "content": "the idea"}]


@pytest.mark.parametrize(
    ("provider", "cache"), [("openai", True), ("openai", False), ("openai_compatible", True)]
)
def test_openai_sends_the_prefix_first_and_a_cache_key(provider: str, cache: bool) -> None:
    with FakeLLMServer() as server:
        llm = make_llm(LLMSpec(provider, "gpt-5", base_url=server.url + "/v1", api_key_env=KEY_ENV,
                               prompt_cache=cache))  # fmt: skip
        llm.complete(
            LLMRequest(prompt="the idea", purpose="implement", prefix="the codebase", cache_key="k1")
        )
        (sent,) = server.requests
    text = sent.body["input"] if provider == "openai" else sent.body["messages"][-1]["content"]
    assert text == "the codebase\n\nthe idea"
    assert sent.body.get("prompt_cache_key") == ("k1" if cache else None)


# -- the prefix is shared ----------------------------------------------------------------------------------
def test_the_implementers_prefix_is_the_same_for_every_sample_revision_and_idea() -> None:
    llm = RecordingLLM()
    list(Implementer(llm, nanogpt(), samples=3, revisions=2, thinking_budget=0).implement_all(ideas(2)))
    assert len(llm.requests) == 2 * 3 * 3
    assert len({(r.system, r.prefix, r.cache_key) for r in llm.requests}) == 1
    prefix = llm.requests[0].prefix
    assert "def forward" in prefix and "evaluate.py" in prefix  # the codebase, and the note on reserved files
    for request in llm.requests:  # what is the call's own comes after the prefix, never in it
        idea = request.context["idea"]
        assert idea["title"] in request.prompt and idea["title"] not in prefix
    revisions = [r for r in llm.requests if r.purpose == "revise"]
    assert revisions and all(r.context["error"] in r.prompt for r in revisions)


def test_the_ideators_prefix_is_the_same_for_every_purpose() -> None:
    llm = RecordingLLM()
    ideator = Ideator(llm, nanogpt(), thinking_budget=3000, thinking_budget_search=1500)
    shown = [{"title": "Old idea", "description": "tried", "status": "ok", "reward": 0.31}]
    for purpose in ("ideate", "exploit", "explore"):
        ideator.propose(purpose, 10, shown, seed=0)
    assert len({(r.system, r.prefix, r.cache_key) for r in llm.requests}) == 1
    assert (
        "Research environment: nanogpt" in llm.requests[0].prefix and "Old idea" not in llm.requests[0].prefix
    )


@pytest.mark.parametrize(("provider", "model", "path"),
                         [("anthropic", "claude-opus-4-5", ""), ("openai", "gpt-5", "/v1")])  # fmt: skip
def test_every_call_after_the_first_reads_the_codebase_from_the_cache(
    provider: str, model: str, path: str
) -> None:
    """Through the real SDKs against the emulated caches: one write of the prefix, then only reads. A per-call
    value (the idea, the sample, a time) in the prefix would make every call miss."""
    with FakeLLMServer(latency_s=0.05, prompt_cache=True, default=Reply(text=STALE)) as server:
        llm = make_llm(LLMSpec(provider, model, base_url=server.url + path, api_key_env=KEY_ENV, max_concurrency=8,
                               thinking_budget=2000 if provider == "anthropic" else 0, **OPUS))  # fmt: skip
        implementer = Implementer(llm, nanogpt(), samples=4, revisions=1, thinking_budget=2000)
        calls = [c for _, _, cs in implementer.implement_all(ideas(3)) for c in cs]
    responses = [c.response for c in calls]
    assert len(responses) == 3 * 4 * 2 and all(r.error is None for r in responses)
    prefix_tokens = max(r.cache_read_tokens for r in responses)
    assert prefix_tokens > 4096  # the nanoGPT codebase is long enough to be cached on Opus
    assert sum(r.cache_read_tokens > 0 for r in responses) == len(responses) - 1
    if provider == "anthropic":  # Anthropic reports the write; OpenAI does not (it bills none)
        assert sum(r.cache_write_tokens for r in responses) == prefix_tokens


def test_a_prefix_that_differs_between_calls_gets_no_hits() -> None:
    with FakeLLMServer(prompt_cache=True) as server:
        llm = make_llm(LLMSpec("anthropic", "claude-sonnet-4-5", base_url=server.url, api_key_env=KEY_ENV))
        codebase = "line of code\n" * 2000
        first, second = (llm.complete(LLMRequest(prompt="p", purpose="implement", prefix=f"{codebase}{n}"))
                         for n in ("sample 0", "sample 1"))  # fmt: skip
        again = llm.complete(LLMRequest(prompt="other", purpose="implement", prefix=f"{codebase}sample 0"))
    assert first.cache_write_tokens > 1024 and second.cache_write_tokens == first.cache_write_tokens
    assert first.cache_read_tokens == second.cache_read_tokens == 0
    assert again.cache_read_tokens == first.cache_write_tokens and again.cache_write_tokens == 0


def test_a_cold_cache_lets_one_call_go_first_and_a_warm_one_lets_all_go() -> None:
    warmup, order = CacheWarmup(ttl_s=60), []

    def call(name: str, key: str, seconds: float) -> None:
        with warmup.call(key):
            order.append(f"{name} start")
            time.sleep(seconds)
            order.append(f"{name} end")

    def together(key: str) -> list[str]:
        order.clear()
        threads = [
            threading.Thread(target=call, args=(f"c{n}", key, 0.2 if n == 0 else 0.0)) for n in range(3)
        ]
        for t in threads:
            t.start()
            time.sleep(0.02)  # c0 is first in
        for t in threads:
            t.join()
        return order[:2]

    assert together("codebase") == ["c0 start", "c0 end"]  # cold: the others waited for the first to return
    assert together("codebase") == ["c0 start", "c1 start"]  # warm (within the ttl): nobody waits
    assert together("") == ["c0 start", "c1 start"]  # no shared prefix: nothing to wait for
    assert together("another prefix") == ["c0 start", "c0 end"]  # each key warms up on its own


def test_a_loopback_search_reads_the_codebase_from_the_cache_and_shows_it(tmp_path: Path) -> None:
    """The whole driver, real SDK, emulated cache: every implementer call after the first reads the prefix,
    the ledger has it per call, and the usage table shows the cached share and the dollars saved."""
    ideas_json = (
        '[{"title": "Higher lr", "description": "Raise it."}, {"title": "Lower lr", "description": "No."}]'
    )
    stale = "```diff\n--- a/train.py\n+++ b/train.py\n@@ -1,1 +1,1 @@\n-no such line\n+x\n```"
    with FakeLLMServer(prompt_cache=True, default=Reply(text=stale)) as server:
        server.script("ok", "ok", Reply(text=f"```json\n{ideas_json}\n```"))
        proc = run_search(
            "+env=tiny", "+model=sonnet", "strategy.epochs=1", "strategy.batch_size=2", "strategy.call_size=2",
            "model.samples=3", "model.revisions=1",
            f"model.ideator.base_url={server.url}", f"model.implementer.base_url={server.url}",
            cwd=tmp_path, env={"ANTHROPIC_API_KEY": "sk-ant-dummy"}, timeout=900,
        )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    calls = ledger_module.load(tmp_path / "outputs/tiny-sonnet-evolution-seed0")["llm_calls"]
    implementer = calls[calls.role == "implementer"]
    assert len(implementer) == 2 * 3 * 2
    assert (implementer.cache_read_tokens > 0).sum() == len(implementer) - 1
    assert (implementer.cache_write_tokens > 0).sum() == 1 and (implementer.cache_saved_usd.sum() > 0)
    # the cost is each kind of token at Sonnet's prices: $3 plain, $3.75 written, $0.30 read, $15 out
    expected = (3 * (implementer.input_tokens - implementer.cache_write_tokens - implementer.cache_read_tokens)
                + 3.75 * implementer.cache_write_tokens + 0.3 * implementer.cache_read_tokens
                + 15 * implementer.output_tokens) / 1e6  # fmt: skip
    assert implementer.cost_usd.to_numpy() == pytest.approx(expected.to_numpy())
    table = proc.stdout[proc.stdout.index("LLM usage") :]
    assert "cache read" in table and "saved by cache" in table
    print(table)


def test_the_ideators_purposes_share_one_cache_entry_though_their_thinking_budgets_differ() -> None:
    """Anthropic invalidates breakpoints in the messages when the thinking settings change (3000 for ideate,
    1500 for exploit and explore), not those in the system prompt, where the prefix goes."""
    with FakeLLMServer(prompt_cache=True) as server:
        llm = make_llm(LLMSpec("anthropic", "claude-sonnet-4-5", base_url=server.url, api_key_env=KEY_ENV))
        ideator = Ideator(llm, nanogpt(), thinking_budget=3000, thinking_budget_search=1500)
        first, *others = (
            ideator.propose(p, 10, [], seed=0).response for p in ("ideate", "exploit", "explore")
        )
        budgets = [r.body["thinking"]["budget_tokens"] for r in server.requests]
    assert budgets == [3000, 1500, 1500]
    assert first.cache_write_tokens > 1024 and first.cache_read_tokens == 0
    assert [r.cache_read_tokens for r in others] == [first.cache_write_tokens] * 2


def test_the_emulated_cache_forgets_an_entry_five_minutes_after_its_last_use() -> None:
    now = [0.0]
    cache = PromptCache(clock=lambda: now[0])
    body = {"model": "gpt-5", "input": "x" * 8000, "prompt_cache_key": "k"}
    cache.commit(cache.usage("/v1/responses", body))  # a write: 2000 tokens, cached up to 1920
    assert cache.usage("/v1/responses", {**body, "prompt_cache_key": "other"}).cache_read == 0  # routed apart
    for now[0], read in ((299.0, 1920), (598.0, 1920), (899.0, 0)):  # each hit keeps it 300 s longer
        assert cache.usage("/v1/responses", body).cache_read == read
