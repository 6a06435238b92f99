"""The CPU policy end to end on the tiny model built in code: sampling with log-probs, the LoRA
update and its versions, a few RL steps on a toy reward, and the bad inputs."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from hpc_executor.errors import ConfigError
from hpc_executor.idea_parsing import parse_ideas
from hpc_executor.llm.offline import load_catalog, recipe_of
from hpc_executor.rl.advantages import advantages
from hpc_executor.rl.lora import VERSION_MARKER, AdapterError, PolicyUpdateError
from hpc_executor.rl.policy import PolicyVersion, Sample, TrainingExample, TrainSettings
from hpc_executor.rl.tiny_model import COMPLETE, build_tiny_model, catalog_texts
from hpc_executor.rl.transformers_policy import TransformersPolicy
from hpc_executor.rl.update import (
    OPTIMIZER_FILE,
    UpdateSpec,
    completed_version,
    read_stats,
    run_update,
    write_examples,
)

CATALOG = str(Path(__file__).parent.parent / "environments" / "tiny" / "catalog.yaml")
PROMPT = "Propose one idea for the tiny character model.\n"
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(
        tmp_path_factory.mktemp("tiny") / "base", catalog_texts(CATALOG), seed=0, prompt=PROMPT
    )


def make_policy(base: Path, work_dir: Path, **train: float) -> TransformersPolicy:
    settings = TrainSettings(**{"learning_rate": 1e-2, "lora_rank": 8, **train})  # type: ignore[arg-type]
    return TransformersPolicy(OmegaConf.create({"model": str(base)}), settings, work_dir)


def examples_of(samples: list[Sample], advs: list[float]) -> list[TrainingExample]:
    return [
        TrainingExample(s.prompt_tokens, s.tokens, s.logprobs, a) for s, a in zip(samples, advs, strict=True)
    ]


def first_update(policy: TransformersPolicy, tmp_path: Path, *, seed: int) -> tuple[list[Sample], UpdateSpec]:
    """Three samples, their examples on disk, and the spec of the update to version 1 on them."""
    samples = policy.sample(PROMPT, 3, temperature=1.0, max_tokens=MAX_TOKENS, seed=seed)
    examples_path = tmp_path / "examples.jsonl"
    write_examples(examples_path, examples_of(samples, [1.0, 0.0, -1.0]))
    spec = UpdateSpec(
        policy.base_model, PolicyVersion(0, None), str(examples_path), str(tmp_path / "v"), 1, policy.train
    )
    return samples, spec


def total_logprob(policy: TransformersPolicy, sample: Sample) -> float:
    return sum(policy.token_logprobs(sample.prompt_tokens, sample.tokens))


def test_the_build_is_deterministic_and_loads_as_a_hugging_face_model(base: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again", catalog_texts(CATALOG), seed=0, prompt=PROMPT)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (base / name).read_bytes(), name
    assert AutoModelForCausalLM.from_pretrained(base).config.vocab_size == len(
        AutoTokenizer.from_pretrained(base)
    )
    # a finished build is reused, not redone
    stamp = (again / "model.safetensors").stat().st_mtime_ns
    assert build_tiny_model(again, catalog_texts(CATALOG), seed=0, prompt=PROMPT) == again
    assert (again / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ConfigError, match="built from other texts, prompt or seed"):
        build_tiny_model(again, catalog_texts(CATALOG), seed=1, prompt=PROMPT)
    with pytest.raises(ConfigError, match="needs some texts"):
        build_tiny_model(tmp_path / "empty", [" "], seed=0)


def test_the_tiny_model_samples_diverse_catalog_ideas(base: Path, tmp_path: Path) -> None:
    policy = make_policy(base, tmp_path)
    catalog = load_catalog(CATALOG)
    entries = []
    for sample in policy.sample(PROMPT, 32, temperature=1.0, max_tokens=MAX_TOKENS, seed=3):
        ideas = parse_ideas(sample.text)
        steps = recipe_of(ideas[0][1]) if ideas else []
        if steps and all(step.entry_id in catalog for step in steps):
            entries.append(steps[0].entry_id)
    assert len(entries) >= 16, f"only {len(entries)} of 32 samples are catalog ideas"
    assert len(set(entries)) >= 8, f"only {len(set(entries))} distinct ideas"


def test_model_tiny_is_built_under_the_work_dir_from_the_catalog(base: Path, tmp_path: Path) -> None:
    shutil.copytree(base, tmp_path / "base")  # the build the constructor finds and reuses
    cfg = OmegaConf.create({"model": "tiny", "catalog": CATALOG, "warm_prompt": PROMPT})
    policy = TransformersPolicy(cfg, TrainSettings(), tmp_path)
    assert policy.base_model == str(tmp_path / "base")
    assert (tmp_path / "base" / COMPLETE).is_file()
    with pytest.raises(ConfigError, match=r"set policy\.catalog"):
        TransformersPolicy(OmegaConf.create({"model": "tiny"}), TrainSettings(), tmp_path / "other")
    with pytest.raises(ConfigError, match=r"policy\.model is not set"):
        TransformersPolicy(OmegaConf.create({}), TrainSettings(), tmp_path / "other")


def test_sampling_log_probs_are_the_tempered_distribution_and_seeded(base: Path, tmp_path: Path) -> None:
    policy = make_policy(base, tmp_path, temperature=0.7)
    samples = policy.sample(PROMPT, 4, temperature=0.7, max_tokens=MAX_TOKENS, seed=5)
    eos = policy.tokenizer.eos_token_id
    for sample in samples:
        assert len(sample.tokens) == len(sample.logprobs) <= MAX_TOKENS
        assert eos not in sample.tokens[:-1]
        # log_softmax(logits / 0.7) of each drawn token, recomputed in one forward pass
        recomputed = policy.token_logprobs(sample.prompt_tokens, sample.tokens)
        assert recomputed == pytest.approx(sample.logprobs, abs=1e-4)
    assert policy.sample(PROMPT, 4, temperature=0.7, max_tokens=MAX_TOKENS, seed=5) == samples
    assert policy.sample(PROMPT, 4, temperature=0.7, max_tokens=MAX_TOKENS, seed=6) != samples
    with pytest.raises(ConfigError, match="temperature"):
        policy.sample(PROMPT, 4, temperature=1.0, max_tokens=MAX_TOKENS, seed=5)


def test_the_adapter_round_trip(base: Path, tmp_path: Path) -> None:
    policy = make_policy(base, tmp_path)
    samples = policy.sample(PROMPT, 6, temperature=1.0, max_tokens=MAX_TOKENS, seed=1)
    base_logprobs = [policy.token_logprobs(s.prompt_tokens, s.tokens) for s in samples]
    version = policy.train_step(
        examples_of(samples, [1.0, -0.2, -0.2, -0.2, -0.2, -0.2]), step=1, out_dir=tmp_path / "v"
    )
    assert version == PolicyVersion(1, str(tmp_path / "v" / "step_00001"))
    assert policy.version == version
    assert total_logprob(policy, samples[0]) > sum(base_logprobs[0]) + 0.5
    assert math.isfinite(read_stats(version)["loss"])

    fresh = make_policy(base, tmp_path / "fresh")  # a resumed driver: a new process, the saved version
    fresh.use(version)
    for sample in samples:
        assert fresh.token_logprobs(sample.prompt_tokens, sample.tokens) == policy.token_logprobs(
            sample.prompt_tokens, sample.tokens
        )
    fresh.use(PolicyVersion(0, None))
    assert [fresh.token_logprobs(s.prompt_tokens, s.tokens) for s in samples] == base_logprobs


def test_rerunning_a_finished_update_returns_it_untouched(base: Path, tmp_path: Path) -> None:
    policy = make_policy(base, tmp_path)
    _, spec = first_update(policy, tmp_path, seed=2)
    examples_path = Path(spec.examples_path)
    version = run_update(spec)
    files = {p: p.stat().st_mtime_ns for p in Path(str(version.path)).iterdir()}
    stale = tmp_path / "v" / ".step_00002-killed"  # a try of the next step killed before its rename
    stale.mkdir()
    examples_path.rename(tmp_path / "aside.jsonl")  # a finished step needs nothing, not even its inputs
    assert run_update(spec) == version
    assert {p: p.stat().st_mtime_ns for p in Path(str(version.path)).iterdir()} == files
    (tmp_path / "aside.jsonl").rename(examples_path)
    spec2 = UpdateSpec(str(base), version, str(examples_path), str(tmp_path / "v"), 2, policy.train)
    second = run_update(spec2)
    assert not stale.exists()
    assert completed_version(tmp_path / "v", 2) == second
    with pytest.raises(PolicyUpdateError, match="starts from the version before it"):
        run_update(UpdateSpec(str(base), version, str(examples_path), str(tmp_path / "v"), 5, policy.train))


def test_a_step_where_every_reward_was_equal_changes_nothing(base: Path, tmp_path: Path) -> None:
    policy = make_policy(base, tmp_path)
    samples = policy.sample(PROMPT, 4, temperature=1.0, max_tokens=MAX_TOKENS, seed=4)
    policy.train_step(examples_of(samples, [1.0, -1.0, 0.5, -0.5]), step=1, out_dir=tmp_path / "v")
    before = [policy.token_logprobs(s.prompt_tokens, s.tokens) for s in samples]
    # every idea failed: all rewards 0, so all advantages 0; AdamW's momentum from step 1 must not move the weights
    zeros = advantages([0.0] * 4, "grpo")
    version = policy.train_step(examples_of(samples, zeros), step=2, out_dir=tmp_path / "v")
    assert [policy.token_logprobs(s.prompt_tokens, s.tokens) for s in samples] == before
    stats = read_stats(version)
    assert stats["skipped"] == 1.0
    assert all(math.isfinite(v) for v in stats.values())


def test_the_kl_penalty_is_measured_against_the_base(base: Path, tmp_path: Path) -> None:
    policy = make_policy(base, tmp_path, kl_coef=0.5)
    samples = policy.sample(PROMPT, 4, temperature=1.0, max_tokens=MAX_TOKENS, seed=9)
    first = policy.train_step(examples_of(samples, [1.0, -1.0, 0.5, -0.5]), step=1, out_dir=tmp_path / "v")
    assert read_stats(first)["kl_ref"] == pytest.approx(0.0, abs=1e-6)  # a fresh adapter is the base
    # with a KL term even equal rewards teach something: the pull back towards the base
    second = policy.train_step(examples_of(samples, [0.0] * 4), step=2, out_dir=tmp_path / "v")
    stats = read_stats(second)
    assert stats["kl_ref"] > 0 and stats["skipped"] == 0.0
    assert stats["loss"] == pytest.approx(stats["pg_loss"] + 0.5 * stats["kl_ref"])


def test_several_updates_per_step_move_off_the_samples_version_within_the_clip(
    base: Path, tmp_path: Path
) -> None:
    one = make_policy(base, tmp_path / "one")
    samples = one.sample(PROMPT, 4, temperature=1.0, max_tokens=MAX_TOKENS, seed=5)
    examples = examples_of(samples, [1.0, -1.0, 0.5, -0.5])
    single = read_stats(one.train_step(examples, step=1, out_dir=tmp_path / "one" / "v"))
    assert single["passes"] == 1.0 and single["kl_old"] == pytest.approx(0.0, abs=1e-6)

    four = make_policy(base, tmp_path / "four", updates_per_step=4)
    stats = read_stats(four.train_step(examples, step=1, out_dir=tmp_path / "four" / "v"))
    # the last of four passes computes its ratios on weights three steps away from the sampler's
    assert stats["passes"] == 4.0 and stats["kl_old"] > 1e-4 and stats["mean_ratio"] != pytest.approx(1.0)
    assert stats["first_loss"] == pytest.approx(single["loss"], abs=1e-6)  # the first pass is the single step
    assert stats["loss"] < stats["first_loss"]  # each pass lowered the surrogate
    gain = [total_logprob(p, samples[0]) for p in (one, four)]
    assert gain[1] > gain[0] + 0.5  # the best-rewarded sample gained more with more passes


def test_a_broken_version_gives_an_error_that_says_what_to_do(base: Path, tmp_path: Path) -> None:
    policy = make_policy(base, tmp_path)
    samples = policy.sample(PROMPT, 2, temperature=1.0, max_tokens=MAX_TOKENS, seed=7)
    version = policy.train_step(examples_of(samples, [1.0, -1.0]), step=1, out_dir=tmp_path / "v")
    path = Path(str(version.path))
    with pytest.raises(AdapterError, match=r"is missing; delete .* and rerun the update of step 3"):
        policy.use(PolicyVersion(3, str(tmp_path / "v" / "step_00003")))

    (path / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError, match=r"cannot be loaded .*; delete .* and rerun the update of step 1"):
        make_policy(base, tmp_path / "fresh").use(version)

    (path / VERSION_MARKER).unlink()
    with pytest.raises(AdapterError, match="unfinished"):
        policy.use(version)

    shutil.rmtree(path)
    policy.use(PolicyVersion(0, None))
    version = policy.train_step(examples_of(samples, [1.0, -1.0]), step=1, out_dir=tmp_path / "v")  # redone
    (path / OPTIMIZER_FILE).unlink()
    with pytest.raises(AdapterError, match=r"optimiser state .* cannot be loaded"):
        policy.train_step(examples_of(samples, [1.0, -1.0]), step=2, out_dir=tmp_path / "v")


def test_bad_examples_files_are_refused(tmp_path: Path, base: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        json.dumps({"prompt_tokens": [1], "tokens": [5, 6], "logprobs": [-1.0], "advantage": 1.0}) + "\n"
    )
    spec = UpdateSpec(str(base), PolicyVersion(0, None), str(bad), str(tmp_path / "v"), 1, TrainSettings())
    with pytest.raises(PolicyUpdateError, match=r"bad\.jsonl:1 has 2 tokens, 1 log-probs"):
        run_update(spec)
    bad.write_text("{not json\n")
    with pytest.raises(PolicyUpdateError, match=r"bad\.jsonl:1 is not a TrainingExample"):
        run_update(spec)
    bad.write_text("")
    with pytest.raises(PolicyUpdateError, match="is empty"):
        run_update(spec)
    bad.unlink()
    with pytest.raises(PolicyUpdateError, match="does not exist"):
        run_update(spec)


def test_the_update_runs_as_a_local_scheduler_job(base: Path, tmp_path: Path) -> None:
    from hpc_executor.config import LocalSchedulerConfig
    from hpc_executor.scheduling import LocalScheduler, Shape

    policy = make_policy(base, tmp_path)
    samples, spec = first_update(policy, tmp_path, seed=8)
    scheduler = LocalScheduler(OmegaConf.structured(LocalSchedulerConfig()), tmp_path / "jobs")
    job = scheduler.submit_call(
        run_update, (spec,), Shape(gpus=0, cpus=1, mem_gb=2, time_limit_s=300), "rl-update", "updatetoken1"
    )
    deadline = time.monotonic() + 240
    while not scheduler.states([job])[job].finished:
        assert time.monotonic() < deadline, "the update job did not finish"
        time.sleep(0.5)
    version = completed_version(tmp_path / "v", 1)
    assert version is not None, scheduler.job_log(job)
    policy.use(version)  # the job's version loads here
    assert total_logprob(policy, samples[0]) > sum(samples[0].logprobs)


def toy_rl(
    base: Path, work_dir: Path, *, seed: int, steps: int, group: int, word: str, learning_rate: float
) -> list[float]:
    """Mean reward per step of GRPO on 'reward 1 when the sample says ``word``'."""
    policy = make_policy(base, work_dir, seed=seed, learning_rate=learning_rate)
    means = []
    for step in range(steps + 1):
        samples = policy.sample(
            PROMPT, group, temperature=1.0, max_tokens=MAX_TOKENS, seed=seed * 1000 + step
        )
        rewards = [float(word in s.text) for s in samples]
        means.append(sum(rewards) / group)
        if step < steps:
            advs = advantages(rewards, "grpo")
            policy.train_step(examples_of(samples, advs), step=step + 1, out_dir=work_dir / "versions")
    return means


def test_a_few_rl_steps_on_a_toy_reward_raise_the_mean(base: Path, tmp_path: Path) -> None:
    # seeds 0, 1, 2 went 0.25 -> 0.47, 0.06 -> 0.66, 0.19 -> 0.56 over these 6 steps
    means = toy_rl(base, tmp_path, seed=0, steps=6, group=32, word="learning rate", learning_rate=1e-2)
    assert sum(means[-2:]) > sum(means[:2]) + 0.2, means
