"""strategy=rl's step loop with the fake categorical policy (tests/fakes/policy.py) on the quick
environment: a group sampled, implemented, run, rewarded and learnt from per step; the bad inputs
(no parseable idea, every idea failed, an update that raises, a backend that is not installed, bad
settings); the offline implementer mapping sampled text onto the catalog."""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import pandas as pd
import pytest
from conftest import QUICK_DIR, TEST_CONF, quick_env_config, run_search
from fakes.policy import CRASH, HIGHER_LR, LOGITS_FILE, NO_IDEA, TEXTS
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict

from hpc_executor import ledger as ledger_module
from hpc_executor.cli import CONF_DIR, preflight
from hpc_executor.config import register_configs
from hpc_executor.environment import Environment
from hpc_executor.errors import ConfigError, HpcExecutorError, PreflightError
from hpc_executor.implementer import Implementer
from hpc_executor.ledger import Ledger
from hpc_executor.llm import LLMSpec
from hpc_executor.llm.offline import OfflineLLM, catalog_recipe, load_catalog
from hpc_executor.rl import backends, records
from hpc_executor.rl.advantages import advantages
from hpc_executor.rl.loop import parse_sample, policy_section, split_thinking
from hpc_executor.rl.policy import Sample
from hpc_executor.search import Search
from hpc_executor.strategies import make_strategy
from hpc_executor.types import Idea

FAKE = "fakes.policy:FakePolicy"
SEAM_COLUMNS = ["step", "sample_index", "text", "thinking_chars", "answer_chars", "idea_id", "title",
                "description", "executed", "reward"]  # fmt: skip


def composed(*overrides: str) -> DictConfig:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("search", overrides=[f"hydra.searchpath=[file://{TEST_CONF}]", *overrides])


def with_texts(cfg: DictConfig, texts: list[str]) -> DictConfig:
    """The fake policy drawing from ``texts`` only."""
    with open_dict(cfg):
        cfg.model.policy.texts = texts
    return cfg


def rl_config(*overrides: str) -> DictConfig:
    return composed("+env=quick", "+model=tiny_policy", "strategy=rl", f"model.policy.backend={FAKE}",
                    "strategy.steps=2", "strategy.group_size=4", "strategy.learning_rate=1.0", "sandbox=none",
                    "run_baseline=false", "report.enabled=false", "scheduler.max_parallel=5", *overrides)  # fmt: skip


def table(run_dir: Path, sql: str) -> pd.DataFrame:
    db = sqlite3.connect(run_dir / "ledger.sqlite")
    try:
        return pd.read_sql_query(sql, db)
    finally:
        db.close()


def test_each_step_samples_a_group_runs_it_rewards_it_and_updates_the_policy(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO, "hpc_executor.search")
    run_dir = tmp_path / "run"
    Search(rl_config("run_baseline=true", "strategy.reward_relative_to_baseline=true"), run_dir).run()

    steps = table(run_dir, "SELECT * FROM rl_steps ORDER BY step")
    assert list(steps.state) == ["updated", "updated"] and steps.error.isna().all()
    assert "# Research environment: quick" in steps.prompt[0] and "Propose 1 new" in steps.prompt[0]
    samples = table(run_dir, "SELECT * FROM rl_samples ORDER BY step, sample_index")
    assert len(samples) == 8 and set(samples.text) <= set(TEXTS)
    # step 0 was drawn by the base model, step 1 by the version step 0's update wrote
    assert (samples[samples.step == 0].policy_step == 0).all() and steps.version_step[0] == 1
    assert (samples[samples.step == 1].policy_step == 1).all()
    assert (samples[samples.step == 1].policy_path == str(run_dir / "policy" / "v0001")).all()
    assert (run_dir / "policy" / "v0001" / "version.json").exists()

    frame = Ledger(run_dir).rl_samples_frame()
    assert list(frame.columns) == SEAM_COLUMNS
    outcomes = pd.DataFrame(Ledger(run_dir).outcomes()).set_index("idea_id")
    baseline = outcomes.loc["baseline", "reward"]
    for row in frame.itertuples():
        if row.idea_id is None:
            assert row.reward == 0.0 and samples.no_idea_reason[row.Index]
        elif not row.executed:
            assert row.reward == 0.0 and outcomes.loc[row.idea_id, "status"] != "ok"
        else:  # relative to the measured baseline
            assert row.reward == pytest.approx(outcomes.loc[row.idea_id, "reward"] / baseline)
    assert frame.idea_id.isna().any() and frame.executed.any(), "the fake draws both kinds"
    for step, group in samples.groupby("step"):
        assert group.advantage.tolist() == pytest.approx(advantages(group.reward.tolist(), "grpo")), step
        assert group.shaped_reward.tolist() == group.reward.tolist(), "no mitigation is on"

    ideas = table(run_dir, "SELECT * FROM ideas WHERE kind = 'rl'")
    assert len(ideas) == frame.idea_id.notna().sum() and set(ideas.epoch) == {0, 1}
    calls = table(run_dir, "SELECT * FROM llm_calls WHERE purpose = 'implement'")
    assert len(calls) == len(ideas), "each idea implemented once"
    trials = table(run_dir, "SELECT * FROM trials WHERE idea_id != 'baseline'")
    assert sorted(trials.idea_id) == sorted(ideas.idea_id) and (trials.state == "done").all()

    recorded = records.step_samples(Ledger(run_dir), 1)
    assert [s["tokens"] for s in recorded] == [list(t.encode()) for t in samples[samples.step == 1].text]
    assert all(len(s["logprobs"]) == len(s["tokens"]) and s["prompt_tokens"] for s in recorded)
    exported = pd.read_parquet(ledger_module.export_parquet(run_dir) / "rl_samples.parquet")
    assert records.unpack_ints(exported.tokens[0]) == list(exported.text[0].encode())

    log = caplog.text
    assert "rl step 1/2 | samples 4 | executed" in log and "rl step 2/2 | samples 4 | executed" in log
    assert "samples gave no idea (reward 0): the answer holds no idea" in log
    assert "RL steps" in capsys.readouterr().out


def test_the_policy_moves_towards_the_ideas_that_earned_more(tmp_path: Path) -> None:
    cfg = with_texts(rl_config("strategy.steps=1", "strategy.group_size=6"), [HIGHER_LR, CRASH])
    Search(cfg, tmp_path / "run").run()
    logits = pd.read_json(tmp_path / "run" / "policy" / "v0001" / "logits.json", typ="series").tolist()
    assert logits[0] > 0 > logits[1], "the idea that ran is more likely, the one that crashed less"


def test_a_step_where_every_idea_failed_is_recorded_and_its_update_skipped(tmp_path: Path) -> None:
    cfg = with_texts(rl_config(), [CRASH, NO_IDEA])
    run_dir = tmp_path / "run"
    Search(cfg, run_dir).run()
    steps = table(run_dir, "SELECT * FROM rl_steps")
    assert list(steps.state) == ["updated", "updated"] and list(steps.version_step) == [0, 0]
    assert steps.update_note.str.contains("every advantage is 0").all()
    samples = table(run_dir, "SELECT * FROM rl_samples")
    assert (samples.reward == 0).all() and (samples.advantage == 0).all() and samples.advantage.notna().all()
    assert (samples.policy_step == 0).all() and not (run_dir / "policy" / "v0001").exists()


def test_an_update_that_raises_stops_the_run_and_the_same_command_retries_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events = tmp_path / "policy-events.log"
    monkeypatch.setenv("FAKE_POLICY_LOG", str(events))
    monkeypatch.setenv("FAKE_POLICY_FAIL_UPDATE", "1")
    run_dir = tmp_path / "run"
    with pytest.raises(HpcExecutorError, match=r"RL step 1: the policy update .* failed: RuntimeError: CUDA out "
                       r"of memory.*run the same command again: the update is retried"):  # fmt: skip
        Search(rl_config(), run_dir).run()
    steps = table(run_dir, "SELECT * FROM rl_steps")
    assert list(steps.state) == ["updating"] and steps.update_attempts[0] == 1
    assert steps.error[0].startswith("RuntimeError: CUDA out of memory")

    monkeypatch.delenv("FAKE_POLICY_FAIL_UPDATE")
    Search(rl_config(), run_dir).run()
    steps = table(run_dir, "SELECT * FROM rl_steps")
    assert list(steps.state) == ["updated", "updated"] and steps.update_attempts[0] == 2
    assert steps.error.isna().all()
    lines = events.read_text().splitlines()
    assert sum(line.startswith("sample") for line in lines) == 2, "step 1's group was not drawn again"
    assert lines.count("update 1 start") == 2 and lines.count("update 1 done") == 1
    calls = table(run_dir, "SELECT idea_id FROM patches")
    assert len(calls) == len(table(run_dir, "SELECT * FROM ideas")), "nothing implemented twice"


def test_a_sampling_call_that_raises_stops_the_run_before_anything_is_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_POLICY_FAIL_SAMPLE", "1")
    run_dir = tmp_path / "run"
    with pytest.raises(HpcExecutorError, match=r"RL step 1: sampling from the policy .* failed: ConnectionError: "
                       r"the policy's server went away.*run the same command again"):  # fmt: skip
        Search(rl_config(), run_dir).run()
    assert table(run_dir, "SELECT count(*) AS n FROM rl_steps").n[0] == 0


def test_a_version_that_fails_to_load_stops_the_run_with_what_to_fix(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    Search(rl_config("strategy.steps=1"), run_dir).run()
    (run_dir / "policy" / "v0001" / LOGITS_FILE).write_text("{not json")
    with pytest.raises(
        HpcExecutorError, match=r"could not load version v1 .*JSONDecodeError.*run the same command"
    ):
        Search(rl_config("strategy.steps=2"), run_dir).run()
    assert len(table(run_dir, "SELECT * FROM rl_steps")) == 1, "step 1 done, step 2 not begun"


def test_a_step_whose_ideas_were_left_unimplemented_waits_for_a_larger_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = tmp_path / "run"
    with monkeypatch.context() as spent:  # as a spent LLM budget leaves them
        spent.setattr(Search, "implement", lambda self, epoch: None)
        with pytest.raises(HpcExecutorError, match=r"RL step 1: \d of its ideas have no result yet .* raise "
                           r"budget_usd or budget_gpu_hours and run the same command again"):  # fmt: skip
            Search(rl_config("strategy.steps=1"), run_dir).run()
    assert list(table(run_dir, "SELECT state FROM rl_steps").state) == ["sampled"]
    Search(rl_config("strategy.steps=1"), run_dir).run()
    assert list(table(run_dir, "SELECT state FROM rl_steps").state) == ["updated"]


def test_a_bad_mitigation_setting_stops_before_any_step(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match=r"jaccard_penalty.coef"):
        Search(rl_config("strategy.mitigations.jaccard_penalty.coef=-1"), run_dir).run()
    assert table(run_dir, "SELECT count(*) AS n FROM rl_steps").n[0] == 0


def test_the_jaccard_penalty_shapes_a_repeated_idea_by_its_coef(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    Search(rl_config("strategy.mitigations.jaccard_penalty.enabled=true"), run_dir).run()
    frame = Ledger(run_dir).rl_samples_frame()
    samples = table(run_dir, "SELECT step, sample_index, shaped_reward FROM rl_samples")
    frame = frame.merge(samples, on=["step", "sample_index"])
    first = set(frame[(frame.step == 0) & frame.idea_id.notna()].title)
    repeats = frame[(frame.step == 1) & frame.executed & frame.title.isin(first)]
    assert len(repeats), "the fake draws the same ideas again"
    # an exact repeat of a previous step's idea has similarity 1: it pays the whole coef (0.5)
    assert repeats.shaped_reward.tolist() == pytest.approx((repeats.reward - 0.5).tolist())
    assert (frame[frame.step == 0].shaped_reward == frame[frame.step == 0].reward).all(), (
        "nothing before step 0"
    )


# -- settings and backends -------------------------------------------------------------------------
def test_steps_and_group_size_count_the_run_whatever_the_environment_preset() -> None:
    cfg = composed("+env=nanogpt", "+model=tiny_policy", "strategy=rl", "strategy.group_size=128",
                   "strategy.steps=7")  # fmt: skip
    assert cfg.strategy.batch_size == 80, "nanogpt's preset sets evolution's batch"
    make_strategy(cfg.strategy, 0)
    assert (cfg.strategy.epochs, cfg.strategy.batch_size) == (7, 128)
    assert OmegaConf.to_container(cfg.strategy.mitigations) == {
        "length_reward": {"enabled": False, "cap": 0.3, "per_char": 0.0001},
        "jaccard_penalty": {"enabled": False, "coef": 0.5}, "novelty_bonus": {"enabled": False, "coef": 0.5},
        "fitness_sharing": {"enabled": False, "exponent": 1.0},
    }  # fmt: skip


@pytest.mark.parametrize(
    ("override", "says"),
    [("strategy.loss=ppo", "strategy.loss='ppo' is unknown; choose one of grpo_clip, reinforce"),
     ("strategy.advantage=best", "strategy.advantage='best' is unknown"),
     ("strategy.temperature=0", "strategy.temperature=0.0 must be above 0"),
     ("strategy.kl_coef=-1", "strategy.kl_coef=-1.0 must be 0"),
     ("strategy.group_size=1", "strategy.group_size=1 is below its lowest sensible value 2"),
     ("strategy.steps=0", "strategy.steps=0 is below"),
     ("strategy.updates_per_step=0", "strategy.updates_per_step=0 is below its lowest sensible value 1"),
     ("model.policy.backend=torchrl", "model.policy.backend='torchrl' is unknown; choose one of transformers"),
     ("model.policy.backend=no_such_module_xyz:Policy", "its module no_such_module_xyz is not in this installation"),
     ("model.policy.backend=fakes.policy:LOGITS_FILE", "fakes.policy has no Policy class LOGITS_FILE")],
)  # fmt: skip
def test_bad_settings_stop_the_run_before_any_work(tmp_path: Path, override: str, says: str) -> None:
    with pytest.raises(PreflightError, match="cannot start") as caught:
        Search(rl_config(override), tmp_path / "run")
    assert says in str(caught.value)
    assert not (tmp_path / "run" / "ledger.sqlite").exists()


def test_a_model_without_a_policy_is_told_which_to_use(tmp_path: Path) -> None:
    with pytest.raises(PreflightError, match=r"needs a policy section .* use \+model=tiny_policy"):
        Search(composed("+env=quick", "+model=offline", "strategy=rl", "sandbox=none"), tmp_path / "run")


def test_a_backend_whose_package_is_not_installed_names_what_installs_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "needs_sdk.py").write_text("import not_an_installed_sdk  # noqa\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(backends.BACKENDS, "tinker",
                        backends.Backend("needs_sdk", "TinkerPolicy", "pip install -e '.[tinker]'"))  # fmt: skip
    with pytest.raises(ConfigError) as caught:
        backends.make_policy(OmegaConf.create({"backend": "tinker", "model": "m"}), None, tmp_path, None)  # type: ignore[arg-type]
    assert str(caught.value) == (
        "model.policy.backend='tinker' needs the Python package 'not_an_installed_sdk', which is not installed: "
        "pip install -e '.[tinker]'"
    )


def test_the_tiny_model_is_told_the_catalog_and_the_prompt_it_warms_up_on(tmp_path: Path) -> None:
    catalog = QUICK_DIR / "catalog.yaml"
    tiny = policy_section(
        OmegaConf.create({"backend": "transformers", "model": "tiny"}), catalog, "the prompt"
    )
    assert (tiny.catalog, tiny.warm_prompt) == (str(catalog), "the prompt")
    own = OmegaConf.create(
        {"backend": "transformers", "model": "tiny", "catalog": "mine.yaml", "warm_prompt": "p"}
    )
    assert policy_section(own, catalog, "the prompt") == own
    hub = OmegaConf.create({"backend": "vllm", "model": "Qwen/Qwen3-30B-A3B"})
    assert policy_section(hub, catalog, "the prompt") == hub


# -- samples ---------------------------------------------------------------------------------------
def sample(text: str) -> Sample:
    return Sample([1], [2], [-0.5], text)


def test_thinking_is_told_from_the_answer() -> None:
    assert split_thinking("<think>plan</think>\n<idea>x</idea>") == ("plan", "<idea>x</idea>")
    assert split_thinking("plan, the template opened the tag</think>answer") == (
        "plan, the template opened the tag", "answer")  # fmt: skip
    assert split_thinking("<think>cut off at max_tokens") == ("cut off at max_tokens", "")
    assert split_thinking("just an answer") == ("", "just an answer")


def test_a_sample_gives_at_most_one_idea_or_the_reason_it_gave_none() -> None:
    two = parse_sample(sample(HIGHER_LR + "\n" + CRASH), "e0-000")
    assert two.idea == ("Raise the learning rate (lr=0.4)", "Larger steps. (recipe: higher_lr lr=0.4)")
    assert two.idea_id == "e0-000" and two.no_idea_reason is None
    thought = parse_sample(sample(NO_IDEA), "e0-001")
    assert thought.idea is None and thought.idea_id is None
    assert thought.no_idea_reason == "the answer holds no idea (no <idea> block, JSON, list or headings)"
    assert (thought.thinking_chars, thought.answer_chars) == (len("Hmm, the loss is a quadratic."),
                                                              len("I am not sure what would help here."))  # fmt: skip
    assert parse_sample(sample("<think>and on and on"), "x").no_idea_reason == (
        "the sample ended inside its thinking, before any answer")  # fmt: skip
    assert parse_sample(sample("  "), "x").no_idea_reason == "the sample is empty"


# -- the offline implementer on sampled text -------------------------------------------------------
@pytest.fixture
def catalog() -> dict:
    return load_catalog(str(QUICK_DIR / "catalog.yaml"))


@pytest.mark.parametrize(
    ("title", "description", "recipe"),
    [("Raise the learning rate", "(recipe: higher_lr lr=0.4)", "higher_lr lr=0.4"),
     ("x", "(recipe: higer_lr lr=0.4 | momentun beta=0.3)", "higher_lr lr=0.4 | momentum beta=0.3"),
     ("x", "(recipe: higher_lr lr= | )", "higher_lr lr=0.3"),
     ("raise the learnig rate", "Larger steps, no recipe.", "higher_lr lr=0.3"),
     ("Raise the learning rate (lr=0.2) + Add heavy-bal momentum", "", "higher_lr lr=0.3 | momentum beta=0.5"),
     ("Use a transformer", "(recipe: not_in_catalog)", ""),
     ("Raise the learning rate + Use a transformer", "", "")],
)  # fmt: skip
def test_sampled_ideas_are_mapped_onto_the_catalog(catalog: dict, title: str, description: str,
                                                   recipe: str) -> None:  # fmt: skip
    assert " | ".join(s.render() for s in catalog_recipe(title, description, catalog)) == recipe


def test_an_idea_named_by_its_title_alone_is_implemented() -> None:
    implementer = Implementer(OfflineLLM(LLMSpec(provider="offline", model="scripted-stand-in")),
                              Environment(quick_env_config()), 1, 0, 0)  # fmt: skip
    patch, _ = implementer.implement(Idea("e0-000", 0, "raise the learnig rate", "Take larger steps."))
    assert patch.status == "applied" and "+LEARNING_RATE = 0.3" in (patch.diff or "")


def test_a_tinker_policy_without_its_key_is_a_preflight_error(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tinker")
    monkeypatch.delenv("TINKER_API_KEY", raising=False)
    cfg = composed("+env=quick", "+model=tiny_policy", "strategy=rl", "model.policy.backend=tinker",
                   "model.policy.model=Qwen/Qwen3-30B-A3B", "sandbox=none")  # fmt: skip
    with pytest.raises(
        PreflightError, match=r"TINKER_API_KEY is not set \(needed by the RL policy tinker:Qwen"
    ):
        preflight(cfg, Environment(cfg.env))


def test_the_readme_command_runs_the_tiny_policy_and_prints_the_step_table(tmp_path: Path) -> None:
    """README's CPU preset (strategy=rl_tiny), shorter: the tiny causal LM the code builds is sampled,
    rewarded by real trials of the quick environment, and updated with peft on the CPU."""
    pytest.importorskip("peft")
    done = run_search("+env=quick", "+model=tiny_policy", "strategy=rl_tiny", "strategy.steps=2",
                      "strategy.group_size=4", "report.enabled=false", f"hydra.run.dir={tmp_path / 'run'}",
                      cwd=tmp_path, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "RL steps" in done.stdout and "distinct" in done.stdout
    steps = table(tmp_path / "run", "SELECT step, state, version_step FROM rl_steps ORDER BY step")
    assert list(steps.state) == ["updated", "updated"]
    samples = table(tmp_path / "run", "SELECT step, policy_step, tokens, logprobs FROM rl_samples")
    assert len(samples) == 8 and samples.tokens.map(len).min() > 0
    # seed 0's first group earns unequal rewards, so its update runs and step 1 samples from it
    assert steps.version_step[0] == 1 and (tmp_path / "run" / "policy" / "v0001" / "version.json").exists()
    assert (samples[samples.step == 1].policy_step == 1).all()
    # the preset's settings reached the update: rank 8, four clipped passes
    update = json.loads((tmp_path / "run" / "policy" / "v0001" / "step_00001" / "update.json").read_text())
    assert update["passes"] == 4.0
    adapter = json.loads(
        (tmp_path / "run" / "policy" / "v0001" / "step_00001" / "adapter_config.json").read_text()
    )
    assert adapter["r"] == 8
