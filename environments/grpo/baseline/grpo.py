"""GRPO post-training of a math model with the r1-zero prompt (editable).

Each step samples `prompts_per_step` training problems, draws `group_size` responses per problem,
rewards 1 for a correctly formatted and correct answer, turns rewards into group-normalised
advantages and takes `train_batch_size`-sized optimizer steps over the rollouts with the clipped
GRPO loss. Every `eval_every` steps the policy answers all test problems and the raw responses go
to $HPCX_OUTPUT_DIR/eval_step_<step>.jsonl; the frozen evaluator grades those files (the reward is
the best accuracy over them, and it grades at most 11 files: more than that is refused).

Presets (GRPO_PRESET): `paper` = Qwen2.5-Math-1.5B on MATH on one GPU with vLLM rollouts;
`cpu` = the same code with a tiny model, tiny batches and HF `generate`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from grpo_loss import group_advantages, per_token_loss, sequence_loss
from reward import R1_ZERO_PROMPT, r1_zero_reward
from rollout import HFGenerator, Sampling, VLLMGenerator
from transformers import AutoModelForCausalLM, AutoTokenizer


@dataclass
class Config:
    model: str = "Qwen/Qwen2.5-Math-1.5B"  # GRPO_MODEL overrides: a hub id or a local path
    n_steps: int = 20
    prompts_per_step: int = 128
    group_size: int = 8
    train_batch_size: int = 256  # responses per optimizer step: 4 steps per rollout batch, so clipping bites
    micro_batch_size: int = 4  # responses per forward/backward (gradient accumulation)
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    loss_type: str = "grpo_clip"  # grpo_clip | reinforce
    clip_range: float = 0.2
    advantage_eps: float = 1e-6
    normalize_std: bool = True
    temperature: float = 1.0
    max_new_tokens: int = 1024
    eval_every: int = 2
    eval_temperature: float = 1.0
    hf_generate_batch: int = 64  # prompts per HF generate call (the vLLM path batches itself)
    vllm_gpu_memory_utilization: float = 0.55
    max_model_len: int = 2048
    gradient_checkpointing: bool = True


PRESETS = {
    "paper": Config(),
    # Same code, sized for one CPU thread in well under a minute. The model is built by
    # `prepare_data.py --synthetic --tiny-model` under the data directory.
    "cpu": Config(
        model="",
        n_steps=4,
        prompts_per_step=4,
        group_size=4,
        train_batch_size=8,
        micro_batch_size=8,
        max_new_tokens=16,
        hf_generate_batch=32,
        gradient_checkpointing=False,
    ),
}


def load_config(data_dir: Path) -> Config:
    preset = os.environ.get("GRPO_PRESET", "paper")
    if preset not in PRESETS:
        raise SystemExit(f"unknown GRPO_PRESET {preset!r}: choose one of {sorted(PRESETS)}")
    cfg = PRESETS[preset]
    model = os.environ.get("GRPO_MODEL") or cfg.model or str(data_dir / "tiny_model")
    return dataclasses.replace(cfg, model=model)


def read_jsonl(path: Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def log(**fields) -> None:
    print(json.dumps(fields), flush=True)


def response_logprobs(
    policy: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """log pi(token_t | tokens_<t) for t >= 1, shape (batch, seq - 1), computed in float32."""
    logits = policy(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = input_ids[:, 1:].unsqueeze(-1)
    # gather - logsumexp avoids materialising a full log_softmax copy of the vocab-sized logits
    return logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def tokenize_rollouts(tokenizer, prompts: list[str], responses: list[str]) -> tuple[torch.Tensor, ...]:
    """Right-padded prompt+response ids, attention mask, and a mask of response tokens (shifted by one)."""
    seqs, prompt_lens = [], []
    for prompt, response in zip(prompts, responses, strict=True):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"]
        seqs.append(p + r)
        prompt_lens.append(len(p))
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    response_mask = torch.zeros((len(seqs), width - 1), dtype=torch.bool)
    for i, (seq, plen) in enumerate(zip(seqs, prompt_lens, strict=True)):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        attention[i, : len(seq)] = 1
        response_mask[i, plen - 1 : len(seq) - 1] = True  # position t predicts token t + 1
    return input_ids, attention, response_mask


def micro_batch(
    batch: tuple[torch.Tensor, ...], idx: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, ...]:
    """Rows idx of the rollout batch, trimmed to their own longest sequence (padding costs compute)."""
    input_ids, attention, mask = batch
    width = int(attention[idx].sum(dim=1).max())
    return (
        input_ids[idx, :width].to(device),
        attention[idx, :width].to(device),
        mask[idx, : width - 1].to(device),
    )


def train_on_rollouts(
    policy: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: tuple[torch.Tensor, ...],
    advantages: torch.Tensor,
    cfg: Config,
    device: torch.device,
) -> dict[str, float]:
    n = batch[0].shape[0]
    # Log-probs of the policy that sampled the rollouts, for the importance ratio.
    old_logp = torch.zeros(batch[2].shape)
    if cfg.loss_type == "grpo_clip":
        policy.eval()
        with torch.no_grad():
            for idx in torch.arange(n).split(cfg.micro_batch_size):
                ids, attention, _ = micro_batch(batch, idx, device)
                old_logp[idx, : ids.shape[1] - 1] = response_logprobs(policy, ids, attention).cpu()
        policy.train()
    losses, grad_norms = [], []
    for chunk in torch.randperm(n).split(cfg.train_batch_size):
        optimizer.zero_grad(set_to_none=True)
        for idx in chunk.split(cfg.micro_batch_size):
            ids, attention, mask = micro_batch(batch, idx, device)
            logp = response_logprobs(policy, ids, attention)
            old = old_logp[idx, : logp.shape[1]].to(device) if cfg.loss_type == "grpo_clip" else logp.detach()
            token_loss = per_token_loss(logp, old, advantages[idx].to(device), cfg.loss_type, cfg.clip_range)
            loss = sequence_loss(token_loss, mask) * (len(idx) / len(chunk))  # mean over the chunk
            loss.backward()
            losses.append(loss.item())
        grad_norms.append(torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm).item())
        optimizer.step()
    return {"loss": sum(losses) / len(grad_norms), "grad_norm": max(grad_norms)}


def write_eval(generator, test: list[dict], cfg: Config, step: int, output_dir: Path) -> None:
    """Answer every test problem once; the evaluator, not this code, decides what is correct."""
    prompts = [R1_ZERO_PROMPT.format(question=ex["problem"]) for ex in test]
    outputs = generator.generate(prompts, Sampling(1, cfg.eval_temperature, cfg.max_new_tokens))
    path = output_dir / f"eval_step_{step}.jsonl"
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for index, output in enumerate(outputs):
            f.write(json.dumps({"index": index, "output": output}) + "\n")
    tmp.replace(path)


def main() -> None:
    start_time = time.monotonic()
    output_dir = Path(os.environ["HPCX_OUTPUT_DIR"])
    data_dir = Path(os.environ["HPCX_DATA_DIR"])
    budget_s = float(os.environ.get("HPCX_TIME_BUDGET_S", "3300"))
    seed = int(os.environ.get("HPCX_SEED", "0"))
    torch.set_num_threads(int(os.environ.get("HPCX_CPUS", "1")))
    cfg = load_config(data_dir)
    random.seed(seed)
    torch.manual_seed(seed)
    train, test = read_jsonl(data_dir / "train.jsonl"), read_jsonl(data_dir / "test.jsonl")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    use_vllm = device.type == "cuda" and importlib.util.find_spec("vllm") is not None
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # vLLM first: it sizes its KV cache from the memory that is free when it starts.
    vllm = (
        VLLMGenerator(cfg.model, seed, cfg.vllm_gpu_memory_utilization, cfg.max_model_len)
        if use_vllm
        else None
    )
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    policy = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype).to(device)
    if cfg.gradient_checkpointing:
        policy.gradient_checkpointing_enable()
    policy.config.use_cache = False  # training forwards never reuse a KV cache
    policy.train()
    generator = vllm or HFGenerator(policy, tokenizer, cfg.hf_generate_batch)
    optimizer = torch.optim.AdamW(
        policy.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
    )
    log(event="start", config=dataclasses.asdict(cfg), device=str(device), backend="vllm" if vllm else "hf")

    rng = random.Random(seed)
    step_s, eval_s = 0.0, None
    completed, last_eval = 0, None
    for step in range(1, cfg.n_steps + 1):
        # Stop while a step and an evaluation still fit: an unevaluated step earns nothing.
        expected_eval_s = eval_s if eval_s is not None else step_s / 2
        if time.monotonic() - start_time + step_s + expected_eval_s > budget_s:
            log(event="budget_stop", completed_steps=completed)
            break
        t0 = time.monotonic()
        problems = rng.sample(train, cfg.prompts_per_step)
        prompts = [R1_ZERO_PROMPT.format(question=ex["problem"]) for ex in problems]
        responses = generator.generate(prompts, Sampling(cfg.group_size, cfg.temperature, cfg.max_new_tokens))
        answers = [ex["answer"] for ex in problems for _ in range(cfg.group_size)]
        scored = [r1_zero_reward(resp, gt) for resp, gt in zip(responses, answers, strict=True)]
        rewards = torch.tensor([s["reward"] for s in scored])
        advantages = group_advantages(rewards, cfg.group_size, cfg.advantage_eps, cfg.normalize_std)
        batch = tokenize_rollouts(tokenizer, [p for p in prompts for _ in range(cfg.group_size)], responses)
        stats = train_on_rollouts(policy, optimizer, batch, advantages, cfg, device)
        generator.sync(policy)
        completed, step_s = step, max(step_s, time.monotonic() - t0)
        log(
            event="step",
            step=step,
            reward=rewards.mean().item(),
            format_rate=sum(s["format_reward"] for s in scored) / len(scored),
            response_tokens=int(batch[2].sum()) / len(responses),
            seconds=round(time.monotonic() - t0, 2),
            **stats,
        )
        if step % cfg.eval_every == 0:
            t0 = time.monotonic()
            write_eval(generator, test, cfg, step, output_dir)
            eval_s, last_eval = time.monotonic() - t0, step
            log(event="eval_written", step=step, seconds=round(eval_s, 2))
    if last_eval != completed:  # the evaluator needs at least one file, and the last step may be the best
        write_eval(generator, test, cfg, completed, output_dir)
        log(event="eval_written", step=completed)
    log(event="done", seconds=round(time.monotonic() - start_time, 2))


if __name__ == "__main__":
    main()
