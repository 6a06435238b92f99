"""Frozen evaluator of the GRPO environment (protected: ideas never see or edit this file).

The training hands over its policy in `$HPCX_OUTPUT_DIR/policy/`: a transformers `save_pretrained`
directory (config.json, safetensors weights, tokenizer). This script loads it (no remote code),
answers every problem of `$HPCX_DATA_DIR/test.jsonl` once with the r1-zero prompt and the sampling
settings fixed here, grades the answers with its own copy of grader.py and writes
{"accuracy", "format_rate", "n_problems", ...} to `$HPCX_METRICS_PATH`. Nothing else the training
wrote is read: answers the training wrote itself, from whatever source, earn nothing.

No policy directory, or one that does not load: exits non-zero with the reason (a crash). A policy
the protocol refuses (code of its own to run, not a causal LM, no safetensors weights): metrics
with `invalid_reason` only (an invalid result).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from grader import R1_ZERO_PROMPT, extract_answer, is_correct

# rollout.py is editable, but the worker runs this script from a pristine copy of the baseline:
# this is the unmodified baseline file, never a trial's version of it.
from rollout import HFGenerator, Sampling, VLLMGenerator
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


@dataclass(frozen=True)
class EvalPreset:
    temperature: float
    max_new_tokens: int
    hf_batch: int  # prompts per HF generate call (vLLM batches itself)


PRESETS = {  # chosen by GRPO_PRESET, which the environment's config sets
    "paper": EvalPreset(temperature=1.0, max_new_tokens=1024, hf_batch=64),  # the paper's evaluation
    "cpu": EvalPreset(temperature=1.0, max_new_tokens=16, hf_batch=32),  # the CPU preset's tiny model
}
SEED = 0  # one sample per problem: the same policy always earns the same reward
VLLM_GPU_MEMORY_UTILIZATION = 0.85  # the training process has exited: the GPU is this script's
MAX_MODEL_LEN = 2048
CAUSAL_LMS = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


class PolicyRefused(ValueError):
    """A policy directory that the protocol does not accept."""


def load_test(data_dir: Path) -> list[dict]:
    with (data_dir / "test.jsonl").open() as f:
        return [json.loads(line) for line in f if line.strip()]


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"cannot read the policy's {path.name}: {exc}") from None
    if not isinstance(data, dict):
        raise SystemExit(f"the policy's {path.name} is not a JSON object")
    return data


def check_policy(policy_dir: Path) -> None:
    """Refuse what the evaluator must not run or cannot score as the protocol's causal LM."""
    config = read_json(policy_dir / "config.json")
    configs = {"config.json": config}
    if (policy_dir / "tokenizer_config.json").exists():
        configs["tokenizer_config.json"] = read_json(policy_dir / "tokenizer_config.json")
    for name, cfg in configs.items():
        if "auto_map" in cfg:  # classes shipped with the checkpoint: code that would run in here
            raise PolicyRefused(f"{name} asks for remote code (auto_map); the evaluator runs none")
    if config.get("model_type") not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise PolicyRefused(f"model_type {config.get('model_type')!r} is not a transformers causal LM")
    architectures = config.get("architectures")
    if not architectures or not set(architectures) <= CAUSAL_LMS:
        raise PolicyRefused(f"architectures {architectures!r} are not transformers causal LMs")
    if not any(policy_dir.glob("*.safetensors")):
        raise PolicyRefused("no *.safetensors weights (pickled weights are never loaded)")


def load_generator(policy_dir: Path, device: torch.device, preset: EvalPreset) -> tuple:
    """(generator, backend name): vLLM on a GPU when it is installed, else HF `generate`."""
    if device.type == "cuda" and importlib.util.find_spec("vllm") is not None:
        # generation_config="vllm": the policy's generation_config.json sets no sampling defaults
        generator = VLLMGenerator(
            str(policy_dir), SEED, VLLM_GPU_MEMORY_UTILIZATION, MAX_MODEL_LEN, generation_config="vllm"
        )
        return generator, "vllm"
    tokenizer = AutoTokenizer.from_pretrained(policy_dir, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        policy_dir,
        dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
        trust_remote_code=False,
        use_safetensors=True,
    ).to(device)
    # The policy's own generation_config.json would fill every sampling option left unset here.
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return HFGenerator(model, tokenizer, preset.hf_batch), "hf"


def evaluate(output_dir: Path, data_dir: Path, preset: EvalPreset) -> dict:
    """Metrics of the policy in output_dir/policy. Raises SystemExit when there is none or it does not
    load; returns an ``invalid_reason`` (the worker's invalid_result) when the protocol refuses it."""
    policy_dir = output_dir / "policy"
    if not policy_dir.is_dir():
        raise SystemExit(f"no policy in {policy_dir}: training must save the policy it hands over there")
    try:
        check_policy(policy_dir)
    except PolicyRefused as exc:
        return {"invalid_reason": f"policy refused: {exc}"}
    test = load_test(data_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        generator, backend = load_generator(policy_dir, device, preset)
    except Exception as exc:  # whatever transformers or vLLM raise on a broken checkpoint
        raise SystemExit(f"cannot load the policy in {policy_dir}: {type(exc).__name__}: {exc}") from exc
    torch.manual_seed(SEED)
    t0 = time.monotonic()
    prompts = [R1_ZERO_PROMPT.format(question=ex["problem"]) for ex in test]
    outputs = generator.generate(prompts, Sampling(1, preset.temperature, preset.max_new_tokens))
    generate_s = time.monotonic() - t0
    correct = sum(is_correct(out, ex["answer"]) for out, ex in zip(outputs, test, strict=True))
    return {
        "accuracy": correct / len(test),
        "format_rate": sum(extract_answer(out) is not None for out in outputs) / len(test),
        "n_correct": correct,
        "n_problems": len(test),
        "backend": backend,
        "max_new_tokens": preset.max_new_tokens,
        "generate_s": round(generate_s, 2),
    }


def main() -> None:
    try:
        output_dir = Path(os.environ["HPCX_OUTPUT_DIR"])
        data_dir = Path(os.environ["HPCX_DATA_DIR"])
        metrics_path = Path(os.environ["HPCX_METRICS_PATH"])
    except KeyError as exc:
        raise SystemExit(f"missing environment variable {exc}") from None
    preset_name = os.environ.get("GRPO_PRESET", "paper")
    if preset_name not in PRESETS:
        raise SystemExit(f"unknown GRPO_PRESET {preset_name!r}: choose one of {sorted(PRESETS)}")
    torch.set_num_threads(int(os.environ.get("HPCX_CPUS", "1")))
    metrics = evaluate(output_dir, data_dir, PRESETS[preset_name])
    tmp = metrics_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(metrics, indent=2))
    tmp.replace(metrics_path)
    print(json.dumps(metrics), file=sys.stderr)


if __name__ == "__main__":
    main()
