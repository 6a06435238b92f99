"""The vLLM + LoRA policy against a fake vLLM (tests/fakes/vllm_server.py): in-process where a test reads
what the policy sent, and as a served-model job through the local scheduler end to end. The update runs
as a real local job too, with a stand-in for the peft update that writes an adapter the fake can load."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import pytest
from fakes.vllm_server import COMPLETION_LENGTH, FakeVllm, fake_update
from omegaconf import OmegaConf
from test_model_server import answers
from test_slurm import slurm

from hpc_executor.config import LocalSchedulerConfig, SlurmSchedulerConfig
from hpc_executor.errors import ConfigError, PreflightError
from hpc_executor.rl.policy import PolicyVersion, TrainingExample, TrainSettings
from hpc_executor.rl.vllm_policy import PolicyServeError, VllmLoraPolicy, update_in_job
from hpc_executor.scheduling import Shape, make_scheduler

TESTS = Path(__file__).resolve().parent
FAKE = TESTS / "fakes" / "vllm_server.py"
MODEL = "org/small-model"


@pytest.fixture(autouse=True)
def _jobs_import_the_fakes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Local jobs are new processes: they find fake_update through PYTHONPATH."""
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    )


def policy_cfg(*extra_serve_args: str, **overrides: object):
    command = [sys.executable, str(FAKE), "{model}", "--port", "{port}", *extra_serve_args]
    cfg = {"backend": "vllm", "model": MODEL, "update_gpus": 0, "update_cpus": 1, "update_mem_gb": 1,
           "serve": {"command": command, "gpus": 0, "cpus": 1, "mem_gb": 1, "startup_timeout_s": 60.0}}  # fmt: skip
    return OmegaConf.create(cfg | overrides)


def make_policy(tmp_path: Path, cfg=None, scheduler_name: str = "local") -> VllmLoraPolicy:
    scheduler = make_scheduler(
        OmegaConf.structured(
            LocalSchedulerConfig() if scheduler_name == "local" else SlurmSchedulerConfig(time_limit_min=5)
        ),
        tmp_path / "submitit",
    )
    return VllmLoraPolicy(cfg or policy_cfg(), TrainSettings(lora_rank=8), tmp_path / "policy", scheduler,
                          update=fake_update, sleep=lambda s: threading.Event().wait(0.2))  # fmt: skip


@pytest.fixture
def fake():
    with FakeVllm(MODEL) as server:
        yield server


def attached(tmp_path: Path, fake: FakeVllm) -> VllmLoraPolicy:
    """A policy whose server is the in-process fake (as if adopted)."""
    policy = make_policy(tmp_path)
    policy.server.url = fake.url + "/v1"
    return policy


def examples(advantage: float = 0.0) -> list[TrainingExample]:
    return [
        TrainingExample([72, 105], [97, 98], [-0.5, -0.51], advantage),
        TrainingExample([72, 105], [99], [-0.5], -advantage),
    ]


def expected_tokens(seed: int, index: int, shift: int = 0) -> list[int]:
    return [97 + (seed + index + k + shift) % 26 for k in range(COMPLETION_LENGTH)]


def test_samples_carry_the_prompt_ids_and_each_completions_token_ids_and_logprobs(
    tmp_path: Path, fake: FakeVllm
) -> None:
    samples = attached(tmp_path, fake).sample("Hi", 3, temperature=0.7, max_tokens=5, seed=7)
    assert [s.prompt_tokens for s in samples] == [[72, 105]] * 3
    assert [s.tokens for s in samples] == [expected_tokens(7, i) for i in range(3)]
    assert samples[0].logprobs == pytest.approx([-0.5, -0.51, -0.52, -0.53, -0.54])
    assert samples[1].text == "".join(map(chr, expected_tokens(7, 1)))
    (_, body), *_ = [r for r in fake.requests if r[0] == "/v1/completions"]
    # the prompt goes as the token ids recorded, plain temperature sampling, the sampled token's log-prob by id
    assert body | {"prompt": body["prompt"]} == {"model": MODEL, "prompt": [72, 105], "n": 3, "temperature": 0.7,
                                                 "max_tokens": 5, "seed": 7, "top_p": 1.0, "top_k": -1, "logprobs": 0,
                                                 "return_tokens_as_token_ids": True}  # fmt: skip


def test_a_group_without_completions_is_a_clear_error(tmp_path: Path, fake: FakeVllm) -> None:
    fake.script["empty_completions"] = True
    with pytest.raises(
        PolicyServeError, match=r"answered 0 completions for org/small-model, not the 4 asked for"
    ):
        attached(tmp_path, fake).sample("Hi", 4, temperature=1.0, max_tokens=5, seed=0)


def test_completions_without_token_ids_are_refused(tmp_path: Path, fake: FakeVllm) -> None:
    from hpc_executor.rl.vllm_policy import parse_completions

    answer = {
        "choices": [
            {"index": 0, "text": "ab", "logprobs": {"tokens": ["a", "b"], "token_logprobs": [-1.0, -2.0]}}
        ]
    }
    with pytest.raises(PolicyServeError, match=r"names token 'a', not token_id:N"):
        parse_completions(answer, [1], 1, MODEL)
    answer = {"choices": [{"index": 0, "text": "ab", "logprobs": None}]}
    with pytest.raises(PolicyServeError, match=r"has no per-token log-probs"):
        parse_completions(answer, [1], 1, MODEL)


def test_a_version_is_loaded_as_its_adapter_and_sampled_from(tmp_path: Path, fake: FakeVllm) -> None:
    policy = attached(tmp_path, fake)
    version = policy.train_step(examples(), step=1, out_dir=tmp_path / "policy" / "versions")
    assert version == PolicyVersion(1, str(tmp_path / "policy" / "versions" / "step_00001"))
    assert fake.adapters == {"step_00001": 1}
    samples = policy.sample("Hi", 2, temperature=1.0, max_tokens=5, seed=3)
    assert [s.tokens for s in samples] == [expected_tokens(3, i, shift=1) for i in range(2)]
    assert fake.requests[-1][1]["model"] == "step_00001"
    # the next version replaces it on the server: one adapter resident
    policy.train_step(examples(), step=2, out_dir=tmp_path / "policy" / "versions")
    assert fake.adapters == {"step_00002": 2}
    # the examples reached the update as written
    written = json.loads((tmp_path / "policy" / "versions" / "step_00002" / "examples.json").read_text())
    assert [e["tokens"] for e in written] == [[97, 98], [99]]


def test_an_adapter_that_does_not_load_says_which_and_why(tmp_path: Path, fake: FakeVllm) -> None:
    policy = attached(tmp_path, fake)
    missing = tmp_path / "no-such-adapter"
    with pytest.raises(
        PolicyServeError,
        match=rf"could not load policy version 3's adapter {missing} \(HTTP 404: Loading lora step_00003 failed: No adapter found",
    ):
        policy.use(PolicyVersion(3, str(missing)))
    assert policy.version == PolicyVersion(0, None)  # the base is still what it samples
    fake.script["load_error"] = [400, "LoRA rank 64 is greater than max_lora_rank 8"]
    # the update is done when the load fails
    with pytest.raises(
        PolicyServeError,
        match=r"version 1's adapter .*step_00001 \(HTTP 400: LoRA rank 64 is greater than max_lora_rank 8",
    ):
        policy.train_step(examples(), step=1, out_dir=tmp_path / "versions")
    assert policy.version == PolicyVersion(0, None)
    # again: loads it, redoes nothing
    version = policy.train_step(examples(), step=1, out_dir=tmp_path / "versions")
    assert fake.adapters == {"step_00001": 1} and policy.version == version
    assert (tmp_path / "versions" / "runs.log").read_text().split() == ["1"]


def test_an_update_job_that_dies_is_an_error_and_running_again_resubmits(
    tmp_path: Path, fake: FakeVllm
) -> None:
    policy = attached(tmp_path, fake)
    out_dir = tmp_path / "versions"
    out_dir.mkdir()
    (out_dir / "DIE").write_text("")
    with pytest.raises(
        PolicyServeError,
        match=r"update job \d+ for step 1 ended \(\w+\) without writing version 1; running the step again resubmits it",
    ):
        policy.train_step(examples(), step=1, out_dir=out_dir)
    assert policy.version == PolicyVersion(0, None)  # still sampling the base
    (out_dir / "DIE").unlink()
    version = policy.train_step(examples(), step=1, out_dir=out_dir)
    assert version.step == 1 and (out_dir / "runs.log").read_text().split() == ["1", "1"]


@pytest.mark.parametrize("id_recorded", [True, False], ids=["job_id", "token_only"])
def test_a_resumed_driver_waits_for_the_update_job_it_recorded_instead_of_resubmitting(
    tmp_path: Path, fake: FakeVllm, id_recorded: bool
) -> None:
    """The killed driver recorded the job's id, or only its intent (the token) before submitting."""
    first = attached(tmp_path, fake)  # the driver that submitted the update, then was killed
    out_dir = tmp_path / "versions"
    out_dir.mkdir()
    hold = tmp_path / "hold"  # the job runs until this file is gone
    hold.write_text("")
    done_file = tmp_path / "policy" / "vllm" / "updates" / "step_00001.done.json"
    done_file.parent.mkdir(parents=True)
    fields = {"base_model": MODEL, "previous": PolicyVersion(0, None), "examples_path": str(tmp_path / "ex.jsonl"),
              "out_dir": str(out_dir), "step": 1, "train": TrainSettings(lora_rank=8)}  # fmt: skip
    # the recorded job's examples differ from those the resumed driver passes: the version tells who wrote it
    recorded = [TrainingExample([72, 105], [97], [-0.5], 3.0)]
    (tmp_path / "ex.jsonl").write_text("".join(json.dumps(asdict(e)) + "\n" for e in recorded))
    intent = {"token": uuid.uuid4().hex[:12], "since": time.time(), "step": 1}
    job_id = first.scheduler.submit_call(update_in_job, (held_update, fields | {"hold": str(hold)}, str(done_file)),
                                         Shape(0, 1, 1, 300), "rl-update-1", token=intent["token"])  # fmt: skip
    saved = intent | {"job_id": job_id if id_recorded else None}
    (done_file.parent / "step_00001.json").write_text(json.dumps(saved))

    resumed = make_policy(tmp_path)  # a new driver: same work dir, a new scheduler object
    resumed.server.url = fake.url + "/v1"
    threading.Timer(1.5, hold.unlink).start()
    version = resumed.train_step(examples(), step=1, out_dir=out_dir)
    assert version.step == 1
    assert json.loads((Path(version.path) / "fake_weights.json").read_text()) == {
        "shift": 4
    }  # 1 + advantage 3
    assert (out_dir / "runs.log").read_text().split() == ["1"]  # one run: the recorded one
    # and a finished step is taken as it is: nothing is submitted again
    again = make_policy(tmp_path)
    again.server.url = fake.url + "/v1"
    assert again.train_step(examples(), step=1, out_dir=out_dir) == version
    assert (out_dir / "runs.log").read_text().split() == ["1"]


def held_update(fields: dict) -> PolicyVersion:
    """fake_update, once the file ``fields["hold"]`` is gone."""
    while Path(fields["hold"]).exists():
        threading.Event().wait(0.1)
    return fake_update({k: v for k, v in fields.items() if k != "hold"})


@pytest.mark.parametrize("scheduler_name", ["local", pytest.param("slurm", marks=slurm)])
def test_served_as_a_job_started_adopted_stopped_for_trials_and_started_again(
    tmp_path: Path, scheduler_name: str
) -> None:
    policy = make_policy(tmp_path, policy_cfg(serve_during_execution=False), scheduler_name)
    command = policy.server.command()
    assert command == ["env", "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True", sys.executable, str(FAKE), MODEL, "--port",
                       "{port}", "--enable-lora", "--max-lora-rank", "8", "--max-loras", "2"]  # fmt: skip
    try:
        first = policy.sample("Hi", 2, temperature=1.0, max_tokens=5, seed=1)
        assert [s.tokens for s in first] == [expected_tokens(1, i) for i in range(2)]
        url, job_id = policy.server.url, policy.server.job_id
        assert url and answers(url)

        restarted = make_policy(tmp_path, scheduler_name=scheduler_name)  # a killed driver adopts the server
        restarted._ensure_server()
        assert restarted.server.job_id == job_id

        # the update stops the server first
        version = policy.train_step(examples(), step=1, out_dir=tmp_path / "versions")
        assert policy.server.url is None and not answers(url)
        # sampling serves it again, with the new adapter
        samples = policy.sample("Hi", 1, temperature=1.0, max_tokens=5, seed=1)
        assert samples[0].tokens == expected_tokens(1, 0, shift=1) and version.step == 1
        serving = policy.server.job_id
        policy.suspend()  # trials execute: no GPUs held, and the job is gone before suspend returns
        assert policy.server.url is None
        assert policy.scheduler.states([serving])[serving].finished
    finally:
        policy.close()


def test_a_model_vllm_cannot_serve_with_lora_is_a_preflight_error_naming_it(tmp_path: Path) -> None:
    policy = make_policy(tmp_path, policy_cfg("--no-lora-architecture"))
    with pytest.raises(
        PreflightError,
        match=r"model.policy.model=org/small-model: vLLM cannot serve this model with LoRA(.|\n)*does not support LoRA, but LoRA is enabled",
    ):
        policy.sample("Hi", 1, temperature=1.0, max_tokens=5, seed=0)


def test_unknown_policy_keys_and_a_missing_model_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"model.policy \(backend vllm\): Key 'gpu_count' not in 'VllmPolicyConfig'; its keys are backend, model, serve",
    ):
        make_policy(tmp_path, policy_cfg(gpu_count=2))
    with pytest.raises(ConfigError, match=r"model.policy.model is not set"):
        make_policy(tmp_path, policy_cfg(model=""))
