"""The RL GPU smoke script's CPU-checkable parts: its arguments, and the message it gives on a machine
without CUDA or vLLM (the two steps themselves need a GPU and a model's weights)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from hpc_executor.rl import gpu_smoke


def test_arguments_and_their_defaults() -> None:
    args = gpu_smoke.parse_args(["--model", "Qwen/Qwen2.5-0.5B-Instruct"])
    assert (args.model, args.steps, args.group, args.max_tokens, args.work_dir) == (
        "Qwen/Qwen2.5-0.5B-Instruct",
        2,
        32,
        256,
        None,
    )
    with pytest.raises(SystemExit) as exit_info:
        gpu_smoke.parse_args(["--model", "m", "--group", "1"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit):
        gpu_smoke.parse_args([])  # --model is required


def test_each_missing_requirement_is_named_with_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a)
    )
    problems = gpu_smoke.missing_requirements()
    assert "vllm is not importable: pip install -e '.[gpu]' (vLLM 0.10.2 or newer)" in problems
    assert not any(p.startswith("torch ") for p in problems)  # torch is there (the CPU build)


def test_without_cuda_it_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(gpu_smoke, "_importable", lambda module: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_smoke.missing_requirements() == [
        "torch sees no CUDA device: run this on a machine with a GPU (nvidia-smi)"
    ]


def test_on_this_machine_it_stops_with_the_reasons_before_starting_anything(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "hpc_executor.rl.gpu_smoke", "--model", "org/m",
                           "--work-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 1
    assert (
        proc.stderr.startswith("gpu_smoke cannot run here:\n  - ") and "vllm is not importable" in proc.stderr
    )
    assert list(tmp_path.iterdir()) == []


def test_the_synthetic_reward_peaks_at_half_the_length() -> None:
    assert [gpu_smoke.synthetic_reward(t, 100) for t in (0, 25, 50, 75, 100)] == [0.0, 0.5, 1.0, 0.5, 0.0]
