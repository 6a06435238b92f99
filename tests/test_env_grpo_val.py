"""The GRPO environment picks its checkpoint on a validation sample of the training problems, never on
the test set: prepare_data writes val.jsonl, the training reads it (and never test.jsonl), and under
the sandbox the training cannot see test.jsonl while the evaluator scores on it."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_env_grpo import (  # noqa: F401
    BASELINE,
    CONF,
    CPU_CONF,
    cpu_data,
    grpo_diff,
    grpo_modules,
    load_module,
    needs_transformers,
    run_script,
)

from hpc_executor.environment import Environment
from hpc_executor.sandbox import resolve_sandbox
from hpc_executor.trial_dir import DIFF_FILE, RESULT_FILE, TRAIN_LOG, TrialSpec
from hpc_executor.types import Result, Status
from hpc_executor.worker import run_trial


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_validation_split_is_a_fixed_sample_of_the_training_problems() -> None:
    prepare = load_module("grpo_env_prepare_val", BASELINE / "prepare_data.py")
    train = [{"problem": f"p{i}", "solution": "", "answer": str(i)} for i in range(7500)]
    val = prepare.validation_split(train, prepare.MATH_VAL)
    assert val == prepare.validation_split(train, prepare.MATH_VAL), "the same sample every time"
    assert len(val) == 500 and len({row["problem"] for row in val}) == 500
    assert all(row in train for row in val)
    assert val != train[:500] and val != sorted(val, key=train.index), "drawn, not the first 500"


def test_synthetic_data_has_a_validation_split_as_large_as_its_test_set(tmp_path: Path) -> None:
    result = run_script("prepare_data.py", BASELINE, {"HPCX_DATA_DIR": str(tmp_path)}, "--synthetic")
    assert result.returncode == 0, result.stderr
    train, val, test = (read_rows(tmp_path / f"{name}.jsonl") for name in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (256, 32, 32), "training data unchanged: 256"
    assert all(row in train for row in val)


def test_training_selects_on_val_and_never_reads_the_test_set(
    grpo_modules,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    grpo = grpo_modules
    read, evaluated = [], []

    def read_jsonl(path: Path) -> list[dict]:
        read.append(path.name)
        return [{"problem": path.name, "answer": "1"}] * 8

    monkeypatch.setattr(grpo, "read_jsonl", read_jsonl)
    monkeypatch.setattr(
        grpo,
        "evaluate_and_keep",
        lambda policy, gen, rows, cfg, step, best: evaluated.append({r["problem"] for r in rows}) or 1.0,
    )
    monkeypatch.setattr(grpo, "grpo_step", lambda *args: {"seconds": 1.0})
    monkeypatch.setattr(grpo, "save_policy", lambda *args: None)
    monkeypatch.setattr(grpo, "load_models", lambda cfg, seed, device: (None, torch.nn.Linear(1, 1), None))
    monkeypatch.setattr(grpo, "load_config", lambda data_dir: grpo.PRESETS["cpu"])
    monkeypatch.setenv("HPCX_OUTPUT_DIR", str(tmp_path))
    monkeypatch.setenv("HPCX_DATA_DIR", str(tmp_path))
    grpo.main()
    assert sorted(read) == ["train.jsonl", "val.jsonl"]
    assert evaluated == [{"val.jsonl"}] * 3  # before steps 0, 2 and 4: the cadence is unchanged


def test_no_editable_file_names_the_test_set() -> None:
    for conf in (CONF, CPU_CONF):
        for name in conf["editable"]:
            assert "test.jsonl" not in (BASELINE / name).read_text(), name
        assert conf["eval_only"] == ["test.jsonl"] == conf["eval_data"]
        assert "val.jsonl" in conf["requires"]


def test_a_data_dir_prepared_before_val_existed_asks_to_prepare_again(tmp_path: Path) -> None:
    for name in ("train.jsonl", "test.jsonl"):
        (tmp_path / name).write_text("{}\n")
    problems = Environment({**CONF, "data_dir": str(tmp_path)}).problems()
    assert len(problems) == 1
    assert "data missing in" in problems[0] and ": val.jsonl;" in problems[0]
    assert "prepare_data.py" in problems[0]


# A probe that changes nothing the training does: it logs which files the training sees in its data.
DATA_VIEW_PROBE = grpo_diff(
    "cfg = load_config(data_dir)",
    "    cfg = load_config(data_dir)\n"
    '    log(event="data_view", files=sorted(p.name for p in data_dir.iterdir()))\n',
)


@needs_transformers
@pytest.mark.slow
@pytest.mark.skipif(
    resolve_sandbox("auto").kind != "bwrap", reason="bubblewrap cannot run here (resolve_sandbox('auto'))"
)
def test_under_bwrap_the_cpu_baseline_trains_without_the_test_set_and_scores_on_it(
    cpu_data: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    shutil.copytree(cpu_data, data)  # the module's data stays as the other tests expect it
    trial_dir = tmp_path / "trial"
    trial_dir.mkdir()
    (trial_dir / DIFF_FILE).write_text(DATA_VIEW_PROBE)
    TrialSpec("grpo", str(trial_dir), {**CPU_CONF, "data_dir": str(data)}, seed=0, sandbox="bwrap").write()
    run_trial(str(trial_dir))
    result = Result.from_json((trial_dir / RESULT_FILE).read_text())
    assert result.status is Status.OK, result.reason
    assert result.provenance["sandbox"] == "bwrap"
    events = [
        json.loads(line) for line in (trial_dir / TRAIN_LOG).read_text().splitlines() if line[:1] == "{"
    ]
    view = next(e["files"] for e in events if e["event"] == "data_view")
    assert view == ["tiny_model", "train.jsonl", "val.jsonl"], "test.jsonl is hidden from training"
    assert (data / "test.jsonl").is_file()
    assert result.metrics["n_problems"] == 32, "the evaluator scores on the whole test set"
    assert result.reward == CPU_CONF["reward"]["baseline"]
