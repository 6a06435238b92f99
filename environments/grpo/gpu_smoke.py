"""GPU smoke test of the GRPO environment: a tiny random Qwen2 through grpo.py's real GRPO step.

    python environments/grpo/gpu_smoke.py                 # GPU: vLLM rollouts if importable, else HF generate
    python environments/grpo/gpu_smoke.py --device cpu    # tiny sizes, HF generate (what the tests run)

It builds prepare_data.py's byte-level tokenizer and a randomly initialised Qwen2 from a config (no
download), writes the synthetic problems, loads them the way grpo.py does (vLLM started first, the
policy in bf16 on a GPU) and runs `grpo_step` a few times: sample, reward, train, push the weights
into vLLM. Per step and on average (the first step, with vLLM's and the allocator's warm-up, is left
out of the means) it prints rollout tokens/s, rollout and train-step seconds, and peak GPU memory
of the training side (vLLM preallocates its own share, `--vllm-memory`). A random model rarely
stops early, so rollouts run to --max-new-tokens. Minutes on one H100, most of it vLLM's start.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import tempfile
import time
from pathlib import Path

BASELINE = Path(__file__).resolve().parent / "baseline"
SIZES = {  # (hidden, layers, heads, prompts, group, max_new_tokens, micro_batch, steps)
    # head size 64: vLLM's attention kernels take no head smaller than 32
    "cuda": (256, 4, 4, 64, 8, 256, 32, 4),
    "cpu": (64, 2, 4, 4, 4, 16, 8, 2),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--prompts", type=int, default=None, help="prompts per step")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--vllm-memory", type=float, default=0.3, help="vLLM's gpu_memory_utilization")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(BASELINE))
    sys.dont_write_bytecode = True  # keep baseline/ pristine
    import grpo
    import prepare_data
    import torch

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no GPU")
    device = torch.device("cuda" if cuda else "cpu")
    hidden, layers, heads, prompts, group, max_new, micro, steps = SIZES[device.type]
    if not cuda:
        torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="grpo_smoke_") as tmp:
        model_dir = Path(tmp, "model")
        prepare_data.prepare_synthetic(Path(tmp))
        tokenizer = prepare_data.build_tiny_tokenizer()
        tokenizer.save_pretrained(model_dir)
        prepare_data.tiny_qwen2(tokenizer, hidden, layers, heads).save_pretrained(model_dir)
        cfg = dataclasses.replace(
            grpo.PRESETS["paper" if cuda else "cpu"],
            model=str(model_dir),
            prompts_per_step=args.prompts or prompts,
            group_size=group,
            max_new_tokens=args.max_new_tokens or max_new,
            micro_batch_size=micro,
            train_batch_size=(args.prompts or prompts) * group // 2,  # two optimizer steps, so the clip acts
            gradient_checkpointing=False,
            vllm_gpu_memory_utilization=args.vllm_memory,
        )
        train = grpo.read_jsonl(Path(tmp, "train.jsonl"))
        t0 = time.perf_counter()
        tokenizer, policy, generator = grpo.load_models(cfg, seed=0, device=device)
        load_s = time.perf_counter() - t0
        optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, betas=cfg.betas)
        rng = random.Random(0)
        records = []
        for step in range(1, (args.steps or steps) + 1):
            stats = grpo.grpo_step(
                policy, optimizer, generator, tokenizer, rng.sample(train, cfg.prompts_per_step), cfg, device
            )
            record = {
                "step": step,
                "rollout_tokens": stats["response_tokens"],
                "rollout_tokens_per_s": round(stats["response_tokens"] / stats["rollout_s"]),
                "rollout_s": stats["rollout_s"],
                "train_s": stats["train_s"],
                "loss": stats["loss"],
            }
            print(json.dumps(record), flush=True)
            records.append(record)
    timed = records[1:] or records
    summary = {
        "env": "grpo",
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "backend": "vllm" if isinstance(generator, grpo.VLLMGenerator) else "hf",
        "parameters": sum(p.numel() for p in policy.parameters()),
        "responses_per_step": cfg.prompts_per_step * cfg.group_size,
        "load_s": round(load_s, 1),
        "rollout_tokens_per_s": round(
            sum(r["rollout_tokens"] for r in timed) / sum(r["rollout_s"] for r in timed)
        ),
        "train_step_s": round(sum(r["train_s"] for r in timed) / len(timed), 3),
        "peak_memory_mib": torch.cuda.max_memory_allocated(device) // 2**20 if cuda else None,
    }
    print("smoke " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
