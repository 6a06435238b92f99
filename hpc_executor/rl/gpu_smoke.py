"""GPU smoke test of the vLLM + LoRA policy: two RL steps with a small open model on one GPU.

    python -m hpc_executor.rl.gpu_smoke --model Qwen/Qwen2.5-0.5B-Instruct   # or a local model directory

No Slurm: the local scheduler runs ``vllm serve`` (with runtime LoRA) and each update (peft +
transformers, ``hpc_executor.rl.update.run_update``) as jobs on this machine, exactly as a run
would. Each step samples a group from one ideation-style prompt, rewards each sample by a
synthetic score (how close its length is to half of --max-tokens: a reward with spread, so the
advantages are not all zero), takes one update, and samples the next step from the new adapter.
The server is stopped for the update (``serve_during_execution: false``), so server and update
never share the GPU. It prints, per step, sampling tokens/s (completion tokens over the group
request's wall time), the server's start time, and the update's wall time (job start, model load,
one step, adapter write), then a ``smoke {json}`` line.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

PROMPT = (
    "You are an AI researcher improving a small GPT's training recipe. Propose one concrete idea "
    "(a change to the optimizer, the schedule or the architecture) in two sentences.\n\nIdea:"
)
NEEDED = {  # module -> what installs it
    "torch": "pip install -e '.[gpu]'",
    "vllm": "pip install -e '.[gpu]' (vLLM 0.10.2 or newer)",
    "peft": "pip install peft",
    "hpc_executor.rl.update": "the peft update (hpc_executor/rl/update.py) is missing from this checkout",
}


@dataclass(frozen=True)
class StepFigures:
    step: int
    completion_tokens: int
    sampling_s: float
    server_start_s: float
    update_s: float
    mean_reward: float

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.sampling_s if self.sampling_s else 0.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m hpc_executor.rl.gpu_smoke",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", required=True, help="a small open model: a Hugging Face directory or hub id"
    )
    parser.add_argument("--steps", type=int, default=2, help="RL steps (default 2)")
    parser.add_argument("--group", type=int, default=32, help="samples per step (default 32)")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens per sample (default 256)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-5)
    parser.add_argument("--startup-timeout-s", type=float, default=900.0, help="for vllm serve to answer")
    parser.add_argument("--work-dir", type=Path, default=None, help="default: a temporary directory")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.group < 2 or args.max_tokens < 1:
        parser.error(
            "--steps must be at least 1, --group at least 2 (advantages need a group), --max-tokens at least 1"
        )
    return args


def missing_requirements() -> list[str]:
    """What this machine lacks for the smoke test, each with what to do; empty when it can run."""
    problems = [
        f"{module} is not importable: {fix}" for module, fix in NEEDED.items() if not _importable(module)
    ]
    if not problems:
        import torch

        if not torch.cuda.is_available():
            problems.append("torch sees no CUDA device: run this on a machine with a GPU (nvidia-smi)")
    return problems


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def synthetic_reward(tokens: int, max_tokens: int) -> float:
    """1 at half of max_tokens, falling linearly to 0 at 0 and at max_tokens."""
    return 1.0 - abs(tokens - max_tokens / 2) / (max_tokens / 2)


def run_smoke(args: argparse.Namespace, work_dir: Path) -> list[StepFigures]:
    from hpc_executor.config import LocalSchedulerConfig
    from hpc_executor.rl.advantages import advantages
    from hpc_executor.rl.policy import TrainingExample, TrainSettings
    from hpc_executor.rl.vllm_policy import VllmLoraPolicy
    from hpc_executor.scheduling import make_scheduler

    scheduler = make_scheduler(OmegaConf.structured(LocalSchedulerConfig()), work_dir / "jobs")
    policy_cfg = OmegaConf.create({
        "backend": "vllm", "model": args.model, "serve_during_execution": False,
        "update_gpus": 1, "update_cpus": 4, "update_mem_gb": 32, "update_time_limit_min": 30,
        "serve": {"gpus": 1, "cpus": 4, "mem_gb": 32, "time_limit_min": 60, "startup_timeout_s": args.startup_timeout_s,
                  "command": ["vllm", "serve", "{model}", "--port", "{port}", "--tensor-parallel-size", "{gpus}",
                              "--logprobs-mode", "processed_logprobs", "--max-model-len", "4096"]},
    })  # fmt: skip
    train = TrainSettings(loss="grpo_clip", learning_rate=args.learning_rate, lora_rank=args.lora_rank)
    policy = VllmLoraPolicy(policy_cfg, train, work_dir / "policy", scheduler)
    figures = []
    try:
        for step in range(1, args.steps + 1):
            start = time.perf_counter()
            policy.sample(
                PROMPT, 1, temperature=1.0, max_tokens=1, seed=0
            )  # serves (again), loads the adapter
            server_start_s = time.perf_counter() - start
            start = time.perf_counter()
            samples = policy.sample(
                PROMPT, args.group, temperature=1.0, max_tokens=args.max_tokens, seed=step
            )
            sampling_s = time.perf_counter() - start
            rewards = [synthetic_reward(len(s.tokens), args.max_tokens) for s in samples]
            credit = advantages(rewards, "grpo")
            examples = [
                TrainingExample(s.prompt_tokens, s.tokens, s.logprobs, a)
                for s, a in zip(samples, credit, strict=True)
            ]
            start = time.perf_counter()
            policy.train_step(examples, step=step, out_dir=work_dir / "policy" / "versions")
            update_s = time.perf_counter() - start
            figures.append(StepFigures(step, sum(len(s.tokens) for s in samples), sampling_s, server_start_s,
                                       update_s, sum(rewards) / len(rewards)))  # fmt: skip
            print(f"step {step}: {figures[-1].tokens_per_s:.0f} sampling tokens/s, server up in {server_start_s:.1f} s, "
                  f"update {update_s:.1f} s, mean reward {figures[-1].mean_reward:.3f}", flush=True)  # fmt: skip
        policy.sample(PROMPT, 1, temperature=1.0, max_tokens=8, seed=0)  # the last adapter loads and samples
    finally:
        policy.close()
    return figures


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    problems = missing_requirements()
    if problems:
        raise SystemExit("gpu_smoke cannot run here:\n  - " + "\n  - ".join(problems))
    import torch

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rl_gpu_smoke_") as tmp:
        figures = run_smoke(args, args.work_dir or Path(tmp))
    result = {
        "model": args.model,
        "device": torch.cuda.get_device_name(),
        "group": args.group,
        "max_tokens": args.max_tokens,
        "sampling_tokens_per_s": [round(f.tokens_per_s, 1) for f in figures],
        "server_start_s": [round(f.server_start_s, 1) for f in figures],
        "update_s": [round(f.update_s, 1) for f in figures],
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print("smoke " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
