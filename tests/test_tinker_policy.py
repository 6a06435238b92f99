"""The Tinker policy with the real ``tinker`` SDK's types but an injected service client: these tests
check what the policy builds (Datum / ModelInput / SamplingParams / AdamParams, made by the SDK), the
order of the calls it makes, how it reads the SDK's response types, and how a step resumes, including
the cases that are awkward to provoke over HTTP (a step cut short between its optimiser step and its
checkpoint). The wire protocol itself (sessions, API-key auth, server-side futures, protobuf
forward_backward and samples, retries) is exercised in test_tinker_wire.py, which runs the policy's own
``tinker.ServiceClient`` against a loopback fake of the service (tests/fakes/tinker_server.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from hpc_executor.errors import ConfigError, PreflightError
from hpc_executor.llm.credentials import policy_env_vars
from hpc_executor.rl.policy import PolicyVersion, TrainingExample, TrainSettings

tinker = pytest.importorskip(
    "tinker", reason="the tinker extra is not installed (pip install -e '.[tinker]')"
)
np = pytest.importorskip("numpy")

from hpc_executor.rl.tinker_policy import TinkerPolicy, to_datum  # noqa: E402

MODEL = "Qwen/Qwen3-8B"


class Done:
    """What the SDK's futures offer: ``.result()``."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def result(self, timeout: float | None = None) -> Any:
        return self.value


class Tokenizer:
    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, tokens: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(map(chr, tokens))


class Sampler:
    def __init__(self, calls: list, weights: str) -> None:
        self.calls, self.weights = calls, weights

    def get_tokenizer(self) -> Tokenizer:
        return Tokenizer()

    def sample(self, prompt, num_samples, sampling_params):
        self.calls.append(("sample", self.weights, prompt, num_samples, sampling_params))
        sequences = [
            tinker.types.SampledSequence(
                stop_reason="length",
                sequence_id=f"s{i}",
                tokens_np=np.array([97 + i, 98 + i], dtype=np.int32),
                logprobs_np=np.array([-0.25, -0.5], dtype=np.float32),
            )
            for i in range(num_samples)
        ]
        return Done(tinker.types.SampleResponse(sequences=sequences))


class Training:
    def __init__(self, calls: list, origin: str, fail_on: str | None = None) -> None:
        self.calls, self.origin, self.fail_on = calls, origin, fail_on

    def forward_backward(self, data, loss_fn, loss_fn_config=None):
        self.calls.append(("forward_backward", self.origin, data, loss_fn, loss_fn_config))
        return Done(None)

    def optim_step(self, params):
        self.calls.append(("optim_step", params))
        return Done(None)

    def save_state(self, name):
        self.calls.append(("save_state", name))
        if self.fail_on == "save_state":
            raise tinker.APIConnectionError(request=None)  # type: ignore[arg-type]
        return Done(tinker.types.SaveWeightsResponse(path=f"tinker://run/weights/{name}"))

    def save_weights_for_sampler(self, name):
        self.calls.append(("save_weights_for_sampler", name))
        return Done(tinker.types.SaveWeightsForSamplerResponse(path=f"tinker://run/sampler_weights/{name}"))


class Service:
    """Stands in for ``tinker.ServiceClient``: records each call, in order."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.calls: list = []
        self.fail_on = fail_on

    def create_lora_training_client(self, base_model, rank, seed=None):
        self.calls.append(("create_lora_training_client", base_model, rank, seed))
        return Done(Training(self.calls, "fresh", self.fail_on))

    def create_training_client_from_state_with_optimizer(self, path):
        self.calls.append(("create_training_client_from_state_with_optimizer", path))
        return Done(Training(self.calls, path))

    def create_sampling_client(self, model_path=None, base_model=None):
        self.calls.append(("create_sampling_client", model_path, base_model))
        return Done(Sampler(self.calls, model_path or base_model))


def make(tmp_path: Path, service: Service, **train: Any) -> TinkerPolicy:
    cfg = OmegaConf.create({"backend": "tinker", "model": MODEL})
    return TinkerPolicy(
        cfg, TrainSettings(lora_rank=16, seed=5, **train), tmp_path / "policy", None, service=service
    )


EXAMPLES = [
    TrainingExample([1, 2, 3], [7, 8], [-0.1, -0.2], 1.5),
    TrainingExample([1, 2, 3], [9], [-0.3], -1.5),
]


def names(calls: list) -> list[str]:
    return [c[0] for c in calls]


def test_an_example_becomes_a_shifted_datum_with_logprobs_and_advantages_on_the_completion_only() -> None:
    datum = to_datum(tinker, EXAMPLES[0])
    assert isinstance(datum, tinker.Datum)
    assert datum.model_input.to_ints() == [1, 2, 3, 7]
    inputs = {key: value.tolist() for key, value in datum.loss_fn_inputs.items()}
    assert inputs["target_tokens"] == [2, 3, 7, 8]
    assert inputs["logprobs"] == pytest.approx([0.0, 0.0, -0.1, -0.2])
    assert inputs["advantages"] == pytest.approx([0.0, 0.0, 1.5, 1.5])
    assert datum.loss_fn_inputs["target_tokens"].dtype == "int64"


def test_samples_come_from_the_base_then_from_the_saved_weights_of_each_step(tmp_path: Path) -> None:
    service = Service()
    policy = make(tmp_path, service, loss="grpo_clip", clip_eps=0.2, learning_rate=1e-5)
    samples = policy.sample("Hi", 2, temperature=0.8, max_tokens=12, seed=3)
    assert [(s.prompt_tokens, s.tokens, s.text) for s in samples] == [
        ([72, 105], [97, 98], "ab"),
        ([72, 105], [98, 99], "bc"),
    ]
    assert samples[0].logprobs == pytest.approx([-0.25, -0.5])
    _, weights, prompt, n, params = service.calls[-1]
    assert weights == MODEL and prompt.to_ints() == [72, 105] and n == 2
    assert (params.temperature, params.max_tokens, params.seed, params.top_k, params.top_p) == (
        0.8,
        12,
        3,
        -1,
        1.0,
    )

    version = policy.train_step(EXAMPLES, step=1, out_dir=tmp_path / "unused")
    assert names(service.calls) == ["create_sampling_client", "sample", "create_lora_training_client",
                                    "forward_backward", "optim_step", "save_state", "save_weights_for_sampler"]  # fmt: skip
    assert service.calls[2][1:] == (MODEL, 16, 5)
    _, _, data, loss, config = service.calls[3]
    assert (
        len(data) == 2
        and loss == "ppo"
        and config == pytest.approx({"clip_low_threshold": 0.8, "clip_high_threshold": 1.2})
    )
    assert service.calls[4][1] == tinker.AdamParams(learning_rate=1e-5)
    assert (
        version.step == 1
        and version.path.startswith("tinker://run/weights/")
        and version.path.endswith("-step_00001-try1")
    )

    policy.sample("Hi", 1, temperature=0.8, max_tokens=12, seed=4)
    assert service.calls[-2][:2] == (
        "create_sampling_client",
        version.path.replace("/weights/", "/sampler_weights/"),
    )
    # step 2 goes on with the same training client: no reload
    policy.train_step(EXAMPLES, step=2, out_dir=tmp_path / "unused")
    assert names(service.calls).count("create_lora_training_client") == 1
    assert "create_training_client_from_state_with_optimizer" not in names(service.calls)


def test_reinforce_is_importance_sampling_and_a_kl_term_is_refused(tmp_path: Path) -> None:
    service = Service()
    make(tmp_path, service, loss="reinforce").train_step(EXAMPLES, step=1, out_dir=tmp_path)
    assert [c[3:] for c in service.calls if c[0] == "forward_backward"] == [("importance_sampling", None)]
    with pytest.raises(ConfigError, match=r"strategy.kl_coef=0.1: Tinker's built-in losses have no KL term"):
        make(tmp_path, service, kl_coef=0.1)


def test_several_updates_per_step_are_that_many_backward_and_optimiser_steps(tmp_path: Path) -> None:
    service = Service()
    make(tmp_path, service, updates_per_step=3).train_step(EXAMPLES, step=1, out_dir=tmp_path)
    assert [n for n in names(service.calls) if n in ("forward_backward", "optim_step")] == [
        "forward_backward", "optim_step"] * 3  # fmt: skip
    assert names(service.calls)[-2:] == [
        "save_state",
        "save_weights_for_sampler",
    ]  # saved once, after the last


def test_a_step_cut_short_is_redone_under_new_names_and_a_finished_one_is_taken_as_it_is(
    tmp_path: Path,
) -> None:
    first = Service(fail_on="save_state")  # the step stops between the optimiser step and its checkpoint
    policy = make(tmp_path, first)
    with pytest.raises(tinker.APIConnectionError):
        policy.train_step(EXAMPLES, step=1, out_dir=tmp_path)
    assert policy.version == PolicyVersion(0, None)
    first.fail_on = None  # the same driver tries again: from a fresh client, the old one may have stepped
    retried = policy.train_step(EXAMPLES, step=1, out_dir=tmp_path)
    assert names(first.calls).count("create_lora_training_client") == 2 and retried.path.endswith("-try2")
    (tmp_path / "policy" / "tinker" / "step_00001.json").write_text(json.dumps({"step": 1, "attempt": 2}))

    second = Service()
    resumed = make(tmp_path, second)  # a new driver, same work dir
    version = resumed.train_step(EXAMPLES, step=1, out_dir=tmp_path)
    assert version.path.endswith("-step_00001-try3")  # earlier tries' names may exist on Tinker: never reused
    assert names(second.calls)[:2] == ["create_lora_training_client", "forward_backward"]

    third = Service()
    again = make(tmp_path, third)
    assert again.train_step(EXAMPLES, step=1, out_dir=tmp_path) == version  # finished: nothing redone
    assert third.calls == []
    again.train_step(EXAMPLES, step=2, out_dir=tmp_path)  # the next step trains on from version 1's state
    assert third.calls[0] == ("create_training_client_from_state_with_optimizer", version.path)
    record = json.loads((tmp_path / "policy" / "tinker" / "step_00002.json").read_text())
    assert record["state"].endswith("-step_00002-try1") and record["sampler"].startswith(
        "tinker://run/sampler_weights/"
    )


def test_a_group_of_the_wrong_size_and_an_example_without_tokens_are_errors(tmp_path: Path) -> None:
    from hpc_executor.rl.tinker_policy import TinkerError

    policy = make(tmp_path, Service())
    policy._sampling_client().sample = lambda prompt, num_samples, sampling_params: Done(
        tinker.types.SampleResponse(sequences=[])
    )
    with pytest.raises(TinkerError, match=r"Tinker answered 0 samples of Qwen/Qwen3-8B, not the 3 asked for"):
        policy.sample("Hi", 3, temperature=1.0, max_tokens=5, seed=0)
    with pytest.raises(TinkerError, match=r"1 completion tokens and 0 log-probs"):
        to_datum(tinker, TrainingExample([1], [2], [], 1.0))


def test_a_missing_api_key_is_a_preflight_error_and_preflight_can_ask_for_it(
    tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.delenv("TINKER_API_KEY", raising=False)
    policy = TinkerPolicy(
        OmegaConf.create({"backend": "tinker", "model": MODEL}), TrainSettings(), tmp_path, None
    )
    with pytest.raises(PreflightError, match=r"set the environment variable TINKER_API_KEY"):
        policy.sample("Hi", 1, temperature=1.0, max_tokens=5, seed=0)
    assert policy_env_vars(OmegaConf.create({"backend": "tinker", "model": MODEL})) == ["TINKER_API_KEY"]
    assert policy_env_vars(OmegaConf.create({"backend": "tinker", "api_key_env": "MY_KEY"})) == ["MY_KEY"]
    assert policy_env_vars(OmegaConf.create({"backend": "vllm", "model": MODEL})) == []
    assert policy_env_vars(None) == []
