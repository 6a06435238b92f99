"""The Tinker policy through the real ``tinker`` SDK's wire protocol: ``TinkerPolicy`` makes its own
``tinker.ServiceClient`` (from ``base_url`` or ``TINKER_BASE_URL`` and the key in ``api_key_env``), which
talks HTTP to a loopback fake of the service (tests/fakes/tinker_server.py): client config, session,
server-side futures polled through ``retrieve_future``, forward_backward as protobuf, samples as protobuf.

Two things are not the service's: the tokenizer (the SDK loads it from the Hugging Face hub by the base
model's name; here ``_load_tokenizer_from_model_info`` in the SDK's sampling client is monkeypatched to a
character tokenizer, which records the model it was asked for) and telemetry (``TINKER_TELEMETRY=0``, so
the SDK's background flushes do not add requests; the fake would accept them)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from hpc_executor.errors import PreflightError
from hpc_executor.rl.policy import PolicyVersion, Sample, TrainingExample, TrainSettings

tinker = pytest.importorskip(
    "tinker", reason="the tinker extra is not installed (pip install -e '.[tinker]')"
)

from fakes.tinker_server import SAMPLE_LENGTH, FakeTinker  # noqa: E402
from tinker.lib.public_interfaces import sampling_client  # noqa: E402

from hpc_executor.rl.tinker_policy import TinkerPolicy  # noqa: E402

MODEL = "Qwen/Qwen3-8B"
KEY = "tml-wire-test-key"  # the SDK refuses keys without the tml- prefix
FB, OPT, SAVE, SAVE_SAMPLER = "forward_backward", "optim_step", "save_weights", "save_weights_for_sampler"
TRAINING = ("create_model", "load_weights", FB, OPT, SAVE, SAVE_SAMPLER)


class CharTokenizer:
    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, tokens: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(map(chr, tokens))


@pytest.fixture
def tokenizer_models(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The base models the SDK was asked for a tokenizer of (instead of downloading one)."""
    asked: list[str] = []

    def load(model_name: str, tokenizer_id: str | None = None) -> CharTokenizer:
        asked.append(model_name)
        return CharTokenizer()

    monkeypatch.setattr(sampling_client, "_load_tokenizer_from_model_info", load)
    return asked


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch, tokenizer_models: list[str]) -> Iterator[FakeTinker]:
    for var in (
        "TINKER_API_KEY",
        "TINKER_BASE_URL",
        "TINKER_CREDENTIAL_CMD",
        "TINKER_PROJECT_ID",
        "TINKER_TAGS",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    with FakeTinker(api_key=KEY) as server:
        yield server


@pytest.fixture
def make(
    fake: FakeTinker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., TinkerPolicy]]:
    """A TinkerPolicy as the driver makes one (no injected service), on ``tmp_path/policy``; each one's
    ServiceClient is closed (its session finished, its heartbeat stopped) when the test ends."""
    made: list[TinkerPolicy] = []

    def make_policy(cfg: dict[str, Any] | None = None, key: str | None = KEY, **train: Any) -> TinkerPolicy:
        cfg = {"backend": "tinker", "model": MODEL, "base_url": fake.url, **(cfg or {})}
        key_env = cfg.get("api_key_env", "TINKER_API_KEY")
        if key is None:
            monkeypatch.delenv(key_env, raising=False)
        else:
            monkeypatch.setenv(key_env, key)
        settings = TrainSettings(lora_rank=16, seed=5, learning_rate=1e-5, **train)
        policy = TinkerPolicy(OmegaConf.create(cfg), settings, tmp_path / "policy", None)
        made.append(policy)
        return policy

    yield make_policy
    for policy in made:
        if policy._service is not None:
            policy._service.close("success").result(timeout=10)


def expected_tokens(seed: int, index: int, steps: int) -> list[int]:
    """The fake's sample ``index`` for ``seed`` from weights after ``steps`` optimiser steps."""
    return [97 + (seed + index + k + steps) % 26 for k in range(SAMPLE_LENGTH)]


FAKE_LOGPROBS = [-0.5 - 0.01 * k for k in range(SAMPLE_LENGTH)]
EXAMPLES = [
    TrainingExample([1, 2, 3], [7, 8], [-0.1, -0.2], 1.5),
    TrainingExample([1, 2, 3], [9], [-0.3], -1.5),
]


def rewarded(samples: list[Sample]) -> list[TrainingExample]:
    return [
        TrainingExample(s.prompt_tokens, s.tokens, s.logprobs, (-1.0) ** i) for i, s in enumerate(samples)
    ]


def sampled(policy: TinkerPolicy, n: int = 1, seed: int = 0, temperature: float = 1.0) -> list[Sample]:
    return policy.sample("Hi", n, temperature=temperature, max_tokens=SAMPLE_LENGTH, seed=seed)


def training_calls(fake: FakeTinker) -> list[tuple[str, Any]]:
    """(endpoint, body) of each training request, in the order the service received them."""
    return [(c.path.rsplit("/", 1)[-1], c.body) for c in fake.requests(*TRAINING)]


def test_two_rl_steps_sample_train_save_and_sample_the_saved_weights_over_the_wire(
    fake: FakeTinker, make: Callable[..., TinkerPolicy], tokenizer_models: list[str], tmp_path: Path
) -> None:
    policy = make(loss="grpo_clip", clip_eps=0.2)
    samples = sampled(policy, 2, seed=3, temperature=0.8)
    assert [(s.prompt_tokens, s.tokens, s.text) for s in samples] == [
        ([72, 105], expected_tokens(3, 0, 0), "defg"),
        ([72, 105], expected_tokens(3, 1, 0), "efgh"),
    ]
    assert all(s.logprobs == pytest.approx(FAKE_LOGPROBS) for s in samples)  # float32 on the wire
    (session,) = fake.requests("create_sampling_session")
    assert session.body["base_model"] == MODEL and "model_path" not in session.body
    (asked,) = fake.requests("asample")
    assert asked.body["prompt"] == {"chunks": [{"type": "encoded_text", "tokens": [72, 105]}]}
    assert asked.body["num_samples"] == 2
    assert asked.body["sampling_params"] == {
        "max_tokens": 4,
        "seed": 3,
        "temperature": 0.8,
        "top_k": -1,
        "top_p": 1.0,
    }
    assert tokenizer_models == [MODEL]

    version = policy.train_step(rewarded(samples), step=1, out_dir=tmp_path / "unused")
    calls = training_calls(fake)
    assert [name for name, _ in calls] == ["create_model", FB, OPT, SAVE, SAVE_SAMPLER]
    create = calls[0][1]
    assert (create["base_model"], create["lora_config"]["rank"], create["lora_config"]["seed"]) == (
        MODEL,
        16,
        5,
    )
    model_id = f"{create['session_id']}:train:0"
    assert [(body["model_id"], body["seq_id"]) for _, body in calls[1:]] == [
        (model_id, i) for i in (1, 2, 3, 4)
    ]

    backward = calls[1][1]
    assert backward["loss_fn"] == "ppo" and backward["forward_only"] is False
    assert backward["loss_fn_config"] == pytest.approx(
        {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}
    )
    first, second = backward["data"]
    assert first["model_input"] == [72, 105, *expected_tokens(3, 0, 0)[:-1]]  # prompt + completion, shifted
    assert first["loss_fn_inputs"]["target_tokens"] == [105, *expected_tokens(3, 0, 0)]
    assert first["loss_fn_inputs"]["logprobs"] == pytest.approx([0.0, *FAKE_LOGPROBS])  # the sampler's
    assert first["loss_fn_inputs"]["advantages"] == pytest.approx([0.0] + [1.0] * SAMPLE_LENGTH)
    assert second["loss_fn_inputs"]["advantages"] == pytest.approx([0.0] + [-1.0] * SAMPLE_LENGTH)
    assert calls[2][1]["adam_params"]["learning_rate"] == pytest.approx(1e-5)
    name = calls[3][1]["path"]
    assert name.endswith("-step_00001-try1") and calls[4][1]["path"] == name
    sampler_path = f"tinker://{model_id}/sampler_weights/{name}"
    assert version == PolicyVersion(1, f"tinker://{model_id}/weights/{name}")

    after = sampled(policy, seed=3, temperature=0.8)
    assert fake.requests("create_sampling_session")[-1].body["model_path"] == sampler_path
    assert after[0].tokens == expected_tokens(3, 0, 1)  # the step's weights, not the base model's

    version = policy.train_step(rewarded(after), step=2, out_dir=tmp_path / "unused")
    calls = training_calls(fake)
    assert [name for name, _ in calls[5:]] == [FB, OPT, SAVE, SAVE_SAMPLER]  # the same model, no reload
    assert [(body["model_id"], body["seq_id"]) for _, body in calls[5:]] == [
        (model_id, i) for i in (5, 6, 7, 8)
    ]
    assert calls[5][1]["data"][0]["loss_fn_inputs"]["target_tokens"] == [105, *expected_tokens(3, 0, 1)]
    assert version.step == 2 and version.path.endswith("-step_00002-try1")
    assert sampled(policy, seed=3)[0].tokens == expected_tokens(3, 0, 2)
    assert len({c.body["session_id"] for c in fake.requests("create_sampling_session")}) == 1  # one session


def test_several_updates_per_step_are_that_many_backward_and_optimiser_pairs_in_order(
    fake: FakeTinker, make: Callable[..., TinkerPolicy], tmp_path: Path
) -> None:
    policy = make(updates_per_step=2)
    policy.train_step(EXAMPLES, step=1, out_dir=tmp_path)
    calls = training_calls(fake)
    assert [name for name, _ in calls] == ["create_model", FB, OPT, FB, OPT, SAVE, SAVE_SAMPLER]
    assert [body["seq_id"] for _, body in calls[1:]] == [1, 2, 3, 4, 5, 6]
    assert calls[1][1] == {**calls[3][1], "seq_id": 1}  # both passes over the same data
    assert [body["adam_params"]["learning_rate"] for name, body in calls if name == OPT] == pytest.approx(
        [1e-5] * 2
    )
    (model,) = fake.models.values()
    assert model.steps == 2
    assert sampled(policy)[0].tokens == expected_tokens(0, 0, 2)


def test_a_resumed_policy_trains_on_from_version_1s_state_and_optimiser(
    fake: FakeTinker, make: Callable[..., TinkerPolicy], tmp_path: Path
) -> None:
    version = make().train_step(EXAMPLES, step=1, out_dir=tmp_path)
    first_session = fake.requests("create_model")[0].body["session_id"]
    before = len(fake.calls)

    resumed = make()  # a new driver on the same work dir
    assert resumed.train_step(EXAMPLES, step=1, out_dir=tmp_path) == version  # finished: nothing asked
    assert len(fake.calls) == before
    resumed.train_step(EXAMPLES, step=2, out_dir=tmp_path)
    calls = [(c.path.rsplit("/", 1)[-1], c.body) for c in fake.calls[before:] if c.path.endswith(TRAINING)]
    assert [name for name, _ in calls] == ["load_weights", FB, OPT, SAVE, SAVE_SAMPLER]
    load = calls[0][1]
    assert load["path"] == version.path and load["optimizer"] is True
    assert load["session_id"] != first_session  # a new session: the service made a new model from the state
    model = fake.models[f"{load['session_id']}:train:{load['model_seq_id']}"]
    assert calls[1][1]["model_id"] == f"{load['session_id']}:train:{load['model_seq_id']}"
    assert (model.origin, model.optimizer_restored, model.steps) == (version.path, True, 2)
    assert sampled(resumed)[0].tokens == expected_tokens(0, 0, 2)


def test_the_configured_api_key_reaches_the_service_and_a_wrong_or_missing_one_stops_the_policy(
    fake: FakeTinker, make: Callable[..., TinkerPolicy], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("TINKER_BASE_URL", fake.url)  # no base_url in the config: the SDK's variable
    policy = make({"base_url": None, "api_key_env": "HPC_TINKER_KEY"})
    sampled(policy, 2)
    policy.train_step(EXAMPLES, step=1, out_dir=tmp_path)
    assert len(fake.calls) > 10 and {c.headers.get("x-api-key") for c in fake.calls} == {KEY}

    seen = len(fake.calls)
    with pytest.raises(tinker.AuthenticationError, match="Invalid API key"):
        sampled(make(key="tml-not-the-key"))
    assert fake.calls[seen].headers["x-api-key"] == "tml-not-the-key"

    seen = len(fake.calls)
    with pytest.raises(PreflightError, match=r"set the environment variable TINKER_API_KEY"):
        sampled(make(key=None))
    assert len(fake.calls) == seen  # refused before any request


def test_transient_service_errors_are_retried_by_the_sdk_and_the_step_goes_through(
    fake: FakeTinker, make: Callable[..., TinkerPolicy], tmp_path: Path
) -> None:
    fake.fail("/api/v1/asample", 429)  # sampling backpressure: the SDK waits and resubmits
    fake.fail("/api/v1/retrieve_future", 503)  # a poll fails: polled again
    fake.fail("/api/v1/forward_backward", 500)  # retried by the HTTP client
    fake.fail("/api/v1/save_weights", 429)  # retried by the SDK's own retry loop (the client's is off)
    policy = make()
    samples = sampled(policy, 2)
    assert [s.tokens for s in samples] == [expected_tokens(0, 0, 0), expected_tokens(0, 1, 0)]
    version = policy.train_step(rewarded(samples), step=1, out_dir=tmp_path)
    assert version.step == 1 and version.path.endswith("-step_00001-try1")

    assert len(fake.requests("asample")) == 2
    backward = fake.requests(FB)
    assert len(backward) == 2 and backward[0].body == backward[1].body
    assert backward[1].headers["x-stainless-retry-count"] == "1"
    assert len(fake.requests(OPT)) == 1 and len(fake.requests(SAVE)) == 2
    (model,) = fake.models.values()
    assert model.steps == 1  # the failed requests did nothing
    assert not any(fake.failures.values())  # each scripted failure was met
