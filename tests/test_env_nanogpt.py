"""The nanoGPT environment: synthetic data, the KV-cache evaluator, the CPU preset end to end, the catalog."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from hpc_executor.cli import CONF_DIR
from hpc_executor.config import register_configs
from hpc_executor.trial_dir import DIFF_FILE, RESULT_FILE, TRAIN_LOG, TrialSpec
from hpc_executor.types import Result, Status
from hpc_executor.worker import run_trial

REPO = Path(__file__).resolve().parents[1]
ENV_DIR = REPO / "environments" / "nanogpt"
BASELINE = ENV_DIR / "baseline"
CPU_CONF = yaml.safe_load((REPO / "conf" / "env" / "nanogpt_cpu.yaml").read_text())["env"]
PAPER_CONF = yaml.safe_load((REPO / "conf" / "env" / "nanogpt.yaml").read_text())["env"]
TINY = {"vocab_size": 512, "block_size": 32, "n_layer": 2, "n_head": 2, "n_embd": 32}


def load(name: str) -> ModuleType:
    """Import one baseline file as a module (train_gpt/evaluate import `model` by name)."""
    if str(BASELINE) not in sys.path:
        sys.path.insert(0, str(BASELINE))
    spec = importlib.util.spec_from_file_location(name, BASELINE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


prepare_data = load("prepare_data")
model_mod = load("model")
evaluate = load("evaluate")


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    subprocess.run(
        [sys.executable, "prepare_data.py", "--synthetic", "--out", str(out)], cwd=BASELINE, check=True
    )
    return out


def protocol_env(data: Path, out: Path, budget_s: float, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HPCX_", "NANOGPT_"))}
    env.update(
        HPCX_DATA_DIR=str(data),
        HPCX_OUTPUT_DIR=str(out),
        HPCX_TIME_BUDGET_S=str(budget_s),
        HPCX_SEED="0",
        HPCX_CPUS="1",
        HPCX_GPUS="0",
        OMP_NUM_THREADS="1",
        **CPU_CONF["extra_env"],
        **extra,
    )
    return env


# ---------------------------------------------------------------------------------------------
# data


def test_synthetic_shards_are_deterministic_and_well_formed(tmp_path: Path) -> None:
    for name in ("a", "b"):
        prepare_data.prepare_synthetic(
            tmp_path / name, train_shards=2, shard_tokens=3000, val_tokens=2000, seed=7
        )
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == [
        "fineweb_train_000001.bin",
        "fineweb_train_000002.bin",
        "fineweb_val_000000.bin",
        "synthetic_meta.json",
    ]
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name

    train1 = (tmp_path / "a" / "fineweb_train_000001.bin").read_bytes()
    header = np.frombuffer(train1[:1024], dtype=np.int32)
    assert (header[0], header[1], header[2]) == (20240520, 1, 3000)
    assert not header[3:].any()
    tokens = np.frombuffer(train1[1024:], dtype=np.uint16)
    assert len(tokens) == 3000 and tokens.max() < 512
    # Train shards are different streams of the same grammar, not copies.
    assert train1 != (tmp_path / "a" / "fineweb_train_000002.bin").read_bytes()
    meta = json.loads((tmp_path / "a" / "synthetic_meta.json").read_text())
    assert 0.5 < meta["val_entropy_nats"] < math.log(512)


def test_fineweb_path_writes_val_then_train_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real path with stand-ins for `datasets` and `tiktoken` (no network here)."""

    class Encoding:
        def encode_ordinary(self, text: str) -> list[int]:
            return [ord(c) for c in text]

    rows = [{"text": "ab" * (i + 1)} for i in range(40)]  # documents of 2, 4, 6, ... characters
    fake_datasets = ModuleType("datasets")
    fake_datasets.load_dataset = lambda *args, **kwargs: iter(rows)
    fake_tiktoken = ModuleType("tiktoken")
    fake_tiktoken.get_encoding = lambda name: Encoding()
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets)
    monkeypatch.setitem(sys.modules, "tiktoken", fake_tiktoken)
    monkeypatch.setattr(prepare_data, "_encoder", None)

    prepare_data.prepare_fineweb(
        tmp_path, train_shards=2, shard_tokens=50, dataset="d", subset="s", workers=1
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "fineweb_train_000001.bin",
        "fineweb_train_000002.bin",
        "fineweb_val_000000.bin",
    ]
    expected = np.concatenate([[50256, *[ord(c) for c in row["text"]]] for row in rows])
    stream = []
    for name in ("fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"):
        raw = (tmp_path / name).read_bytes()
        assert tuple(np.frombuffer(raw[:12], dtype=np.int32)) == (20240520, 1, 50)
        stream.append(np.frombuffer(raw[1024:], dtype=np.uint16))
    assert (np.concatenate(stream) == expected[:150]).all()  # every document starts with <|endoftext|>


def test_configs_require_what_prepare_data_writes(synthetic_data: Path) -> None:
    for conf in (CPU_CONF, PAPER_CONF):
        for name in conf["requires"]:
            assert (synthetic_data / name).is_file(), name
    # The CPU preset's hack floor must sit below the loss no honest model can beat.
    floor = json.loads((synthetic_data / "synthetic_meta.json").read_text())["val_entropy_nats"]
    assert CPU_CONF["reward"]["metric_min"] < floor


def test_shard_round_trip_over_the_whole_uint16_range(tmp_path: Path) -> None:
    """GPT-2 ids reach 50256: above int16's range, so a signed reader would turn them negative."""
    tokens = np.array([0, 1, 511, 32767, 32768, 50256, 65535, 7], dtype=np.int64)
    path = tmp_path / "fineweb_val_000000.bin"
    prepare_data.write_shard(path, tokens)
    header = np.fromfile(path, dtype=np.int32, count=256)
    assert (header[0], header[1], header[2]) == (
        20240520,
        1,
        len(tokens),
    ) and path.stat().st_size == 1024 + 16
    train_gpt = load("train_gpt")
    assert np.asarray(train_gpt.read_shard(str(path))).tolist() == tokens.tolist()
    assert evaluate.load_val_tokens(tmp_path, len(tokens)).tolist() == tokens.tolist()
    with pytest.raises(AssertionError, match="uint16"):
        prepare_data.write_shard(tmp_path / "big.bin", np.array([65536]))


def test_shard_reader_of_training_and_evaluator_agree(synthetic_data: Path) -> None:
    train_gpt = load("train_gpt")
    from_train = np.asarray(train_gpt.read_shard(str(synthetic_data / "fineweb_val_000000.bin")))[:500]
    from_eval = evaluate.load_val_tokens(synthetic_data, 500).numpy()
    assert (from_train == from_eval).all()


# ---------------------------------------------------------------------------------------------
# evaluator


def test_kv_cache_loss_matches_full_causal_forward() -> None:
    torch.manual_seed(0)
    model = model_mod.build_model(TINY).eval()
    x = torch.randint(0, 512, (6, 32))
    y = torch.randint(0, 512, (6, 32))
    loss_sum, count = evaluate.kv_cache_loss(model, x, y, batch=4, device=torch.device("cpu"))
    with torch.no_grad():
        full = model(x, y).item()
        cache = model.new_kv_cache(6, 32, "cpu", torch.float32)
        step_logits = torch.stack([model.decode_step(x[:, t], cache) for t in range(32)], dim=1)
        torch.testing.assert_close(step_logits, model(x), rtol=1e-4, atol=1e-4)
    assert count == 6 * 32
    assert loss_sum / count == pytest.approx(full, rel=1e-5)


class PeekingModel(torch.nn.Module):
    """A reward hack: the full-sequence forward reads the next token from its input."""

    vocab = 512

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        nxt = torch.roll(idx, -1, dims=1)
        return 30.0 * F.one_hot(nxt, self.vocab).float()

    def new_kv_cache(self, batch_size: int, max_len: int, device: str, dtype: torch.dtype) -> list:
        return []

    def decode_step(self, tokens: torch.Tensor, cache: list) -> torch.Tensor:
        # Token by token there is no next token to read: the same trick predicts the current one.
        return 30.0 * F.one_hot(tokens, self.vocab).float()


class StoragePeekingModel(PeekingModel):
    """A subtler hack: if the evaluator passed a view of the window, its storage holds the future."""

    def decode_step(self, tokens: torch.Tensor, cache: list) -> torch.Tensor:
        flat = torch.empty(0, dtype=tokens.dtype).set_(tokens.untyped_storage())
        where = tokens.storage_offset() + 1 + torch.arange(len(tokens)) * tokens.stride(0)
        guess = flat[where.clamp(max=len(flat) - 1)]
        return 30.0 * F.one_hot(guess, self.vocab).float()


def test_future_leak_cannot_lower_the_kv_cache_loss(synthetic_data: Path) -> None:
    floor = json.loads((synthetic_data / "synthetic_meta.json").read_text())["val_entropy_nats"]
    tokens = evaluate.load_val_tokens(synthetic_data, 64 * 32 + 1)
    x, y = tokens[:-1].view(-1, 64), tokens[1:].view(-1, 64)
    cheat = PeekingModel()
    with torch.no_grad():
        # (the last position of a window has no next token in it to read)
        full_forward = F.cross_entropy(cheat(x)[:, :-1].reshape(-1, 512), y[:, :-1].reshape(-1)).item()
    assert full_forward < 0.1 < floor  # a whole-sequence evaluator would report an impossible loss
    loss_sum, count = evaluate.kv_cache_loss(cheat, x, y, batch=16, device=torch.device("cpu"))
    assert loss_sum / count > floor  # the KV-cache evaluator does not

    peeker = StoragePeekingModel()
    through_views = torch.stack([peeker.decode_step(x[:, t], []) for t in range(63)], dim=1)
    assert F.cross_entropy(through_views.reshape(-1, 512), y[:, :63].reshape(-1)).item() < 0.1
    loss_sum, count = evaluate.kv_cache_loss(peeker, x, y, batch=16, device=torch.device("cpu"))
    assert loss_sum / count > floor  # the evaluator hands over copies, not views

    probe = evaluate.causality_probe(cheat, tokens[:256].view(4, 64), torch.device("cpu"))
    assert probe["future_leak"] is True and "not causal" in probe["invalid_reason"]
    honest_model = model_mod.build_model(TINY).eval()
    honest = evaluate.causality_probe(honest_model, tokens[:128].view(4, 32), torch.device("cpu"))
    assert honest["future_leak"] is False and "invalid_reason" not in honest


def test_evaluator_refuses_a_model_without_kv_cache(tmp_path: Path, synthetic_data: Path) -> None:
    workspace, out = tmp_path / "ws", tmp_path / "out"
    out.mkdir()
    shutil.copytree(BASELINE, workspace)
    source = (workspace / "model.py").read_text()
    (workspace / "model.py").write_text(source.replace("def decode_step(", "def _decode_step("))
    config = {**TINY, "block_size": 64}
    ckpt = {"model_config": config, "state_dict": model_mod.build_model(config).state_dict()}
    torch.save(ckpt, out / "ckpt.pt")
    env = protocol_env(
        synthetic_data, out, 20, HPCX_WORKSPACE=str(workspace), HPCX_METRICS_PATH=str(tmp_path / "m.json")
    )
    proc = subprocess.run(
        [sys.executable, "evaluate.py"], cwd=BASELINE, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "no decode_step()" in proc.stderr
    assert not (tmp_path / "m.json").exists()


def test_time_to_target_is_the_measured_training_time_when_reached() -> None:
    reached = evaluate.target_metrics(3.2, 1412.5, 3.28)
    assert reached == {
        "target_loss": 3.28,
        "reached_target": True,
        "train_seconds": 1412.5,
        "time_to_target_s": 1412.5,
    }
    assert evaluate.target_metrics(3.3, 1412.5, 3.28)["time_to_target_s"] is None
    assert evaluate.target_metrics(None, 1412.5, 3.28)["reached_target"] is False  # a non-finite loss
    assert evaluate.target_metrics(3.2, None, 3.28)["time_to_target_s"] is None  # no usable training time


def test_gpu_smoke_script_runs_on_the_cpu() -> None:
    """The GPU smoke script's CPU mode: the real train_gpt.py stopped by NANOGPT_MAX_STEPS."""
    proc = subprocess.run(
        [sys.executable, str(ENV_DIR / "gpu_smoke.py"), "--device", "cpu", "--steps", "4"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "HPCX_CPUS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    smoke = json.loads(proc.stdout.splitlines()[-1].removeprefix("smoke "))
    assert smoke["device"] == "cpu" and smoke["preset"] == "cpu" and smoke["steps"] == 4
    assert smoke["tokens_per_s"] > 0 and smoke["step_ms"] > 0 and smoke["peak_memory_mib"] is None
    assert "stopped after 4 steps" in proc.stdout


# ---------------------------------------------------------------------------------------------
# end to end on the CPU preset (slow)


def train_and_evaluate(workspace: Path, data: Path, tmp_path: Path, budget_s: float) -> tuple[dict, str]:
    out = tmp_path / "out"
    out.mkdir()
    env = protocol_env(data, out, budget_s)
    train = subprocess.run(
        [sys.executable, "train_gpt.py"], cwd=workspace, env=env, capture_output=True, text=True, timeout=120
    )
    assert train.returncode == 0, train.stdout + train.stderr
    metrics_path = tmp_path / "metrics.json"
    env.update(HPCX_WORKSPACE=str(workspace), HPCX_METRICS_PATH=str(metrics_path))
    ev = subprocess.run(
        [sys.executable, "evaluate.py"], cwd=BASELINE, env=env, capture_output=True, text=True, timeout=120
    )
    assert ev.returncode == 0, ev.stdout + ev.stderr
    return json.loads(metrics_path.read_text()), train.stdout


@pytest.mark.slow
def test_cpu_preset_trains_and_evaluates(tmp_path: Path, synthetic_data: Path) -> None:
    budget = float(CPU_CONF["budget_s"])
    metrics, log = train_and_evaluate(BASELINE, synthetic_data, tmp_path, budget)
    assert "saved" in log
    assert metrics["val_tokens"] == evaluate.PRESETS["cpu"].val_tokens
    assert math.isfinite(metrics["val_loss"])
    # It learned: better than uniform over the 512 ids, and no better than the data allows.
    floor = json.loads((synthetic_data / "synthetic_meta.json").read_text())["val_entropy_nats"]
    assert floor < metrics["val_loss"] < math.log(512)
    assert metrics["future_leak"] is False
    # Run by hand (no worker), there is no measured training time, so no time to the target.
    summary = json.loads(log.splitlines()[-1].removeprefix("summary "))
    assert metrics["train_seconds"] is None and metrics["time_to_target_s"] is None
    assert summary["train_seconds"] < budget and summary["steps"] > 10 and summary["tokens_per_s"] > 0
    assert metrics["reached_target"] is (metrics["val_loss"] <= evaluate.PRESETS["cpu"].target_loss)


def nanogpt_cpu_env(data: Path, **overrides: object) -> dict:
    """The nanogpt_cpu environment as the driver resolves it, with its data at `data`."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        env = compose("search", overrides=["+env=nanogpt_cpu", "+model=offline"]).env
    return {**OmegaConf.to_container(env, resolve=True), "data_dir": str(data), **overrides}


@pytest.mark.slow
def test_catalog_future_leak_is_caught_as_invalid_result(tmp_path: Path, synthetic_data: Path) -> None:
    """The leaking diff through the real worker: applied, trained, evaluated, recorded invalid_result."""
    catalog = yaml.safe_load((ENV_DIR / "catalog.yaml").read_text())
    entry = next(e for e in catalog if e["id"] == "bidirectional_attention")
    trial_dir = tmp_path / "trial"
    trial_dir.mkdir()
    (trial_dir / DIFF_FILE).write_text(entry["diff"])
    TrialSpec("leak", str(trial_dir), nanogpt_cpu_env(synthetic_data), seed=0).write()
    run_trial(str(trial_dir))
    result = Result.from_json((trial_dir / RESULT_FILE).read_text())
    assert result.status is Status.INVALID_RESULT and result.reward is None
    assert "not causal" in result.reason and result.metrics["future_leak"] is True
    floor = json.loads((synthetic_data / "synthetic_meta.json").read_text())["val_entropy_nats"]
    train_log = (trial_dir / TRAIN_LOG).read_text()
    last_train_loss = float(train_log.split("train_loss ")[-1].split()[0])
    # Training exploits the leak (its loss falls far below the evaluated one), and the token-by-token
    # evaluation does not reward it: the loss is far above what the data allows.
    assert last_train_loss + 1.0 < result.metrics["val_loss"]
    assert result.metrics["val_loss"] > floor + 1.0


@pytest.mark.slow
def test_torchrun_two_ranks_stop_together_and_evaluate_the_same(tmp_path: Path, synthetic_data: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    env = protocol_env(synthetic_data, out, 8)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    train = subprocess.run(
        [*torchrun, "train_gpt.py"], cwd=BASELINE, env=env, capture_output=True, text=True, timeout=120
    )
    assert train.returncode == 0, train.stdout + train.stderr
    assert "world_size 2, grad accumulation 1" in train.stdout
    assert (out / "ckpt.pt").is_file()

    losses = []
    for n_proc, name in ((1, "single.json"), (2, "pair.json")):
        env.update(HPCX_WORKSPACE=str(BASELINE), HPCX_METRICS_PATH=str(tmp_path / name))
        command = [*torchrun[:-1], f"--nproc_per_node={n_proc}", "evaluate.py"]
        ev = subprocess.run(command, cwd=BASELINE, env=env, capture_output=True, text=True, timeout=120)
        assert ev.returncode == 0, ev.stdout + ev.stderr
        losses.append(json.loads((tmp_path / name).read_text())["val_loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
