"""GRPO post-training of a math model with the r1-zero prompt (editable).

Each step samples `prompts_per_step` training problems, draws `group_size` responses per problem,
rewards 1 for a correctly formatted and correct answer, turns rewards into group-normalised
advantages and takes `train_batch_size`-sized optimizer steps over the rollouts in order with the
clipped GRPO loss (the building blocks are in grpo_loss.py; tokenisation and log-probs are below).
As in the paper, the policy answers all selection problems once before steps 0, 2, ..., 18
(`eval_every` = 2; `eval_cadence`). The paper's were the test set; ours are val.jsonl, a fixed sample
of the training problems, because the test set is the frozen evaluator's alone. The graded answers go
to the log and choose the policy to hand over: at the end, the policy of the best such evaluation is
saved to $HPCX_OUTPUT_DIR/policy/ (save_pretrained: weights, config, tokenizer). The reward is the
frozen evaluator's own evaluation of that saved policy; nothing else this script writes is read.

Presets (GRPO_PRESET): `paper` = Qwen2.5-Math-1.5B on MATH on one GPU with vLLM rollouts;
`cpu` = the same code with a tiny model, tiny batches and HF `generate`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from grader import R1_ZERO_PROMPT, extract_answer, is_correct
from grpo_loss import group_normalized_rewards, masked_mean, microbatch_train_step
from reward import r1_zero_reward
from rollout import HFGenerator, Sampling, VLLMGenerator
from transformers import AutoModelForCausalLM, AutoTokenizer


@dataclass
class Config:
    model: str = "Qwen/Qwen2.5-Math-1.5B"  # GRPO_MODEL overrides: a hub id or a local path
    n_steps: int = 20
    prompts_per_step: int = 128
    group_size: int = 8
    # The paper's: 16 optimizer steps of 64 responses per rollout batch of 128 x 8, each 16 micro-batches
    # of 4, taken in order.
    train_batch_size: int = 64
    micro_batch_size: int = 4  # responses per forward/backward (gradient accumulation)
    shuffle_rollouts: bool = False  # True: a random order of the rollouts per step
    lr: float = 1e-5
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    max_grad_norm: float = math.inf  # no clipping, as in the paper (the norm is still logged)
    loss_type: str = "grpo_clip"  # grpo_clip | reinforce_with_baseline | no_baseline (grpo_loss.py)
    loss_normalization: str = "token_mean"  # token_mean (the paper's) | sequence_mean (grpo_loss.py)
    clip_range: float = 0.2
    advantage_eps: float = 1e-6
    use_std_normalization: bool = True
    temperature: float = 1.0
    max_new_tokens: int = 1024
    eval_every: int = 2
    # before: evaluate the policy before steps 0, eval_every, ... (the paper's: the candidates are the
    # policies after 0, 2, ..., 18 updates, and no step is trained that no evaluation would see);
    # after: after steps eval_every, 2 * eval_every, ... and after the last one.
    eval_cadence: str = "before"
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
        n_steps=5,  # with the paper's cadence: evaluations before steps 0, 2 and 4, four steps trained
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
    if cfg.eval_cadence not in ("before", "after"):
        raise SystemExit(f"eval_cadence {cfg.eval_cadence!r}: choose before or after")
    model = os.environ.get("GRPO_MODEL") or cfg.model or str(data_dir / "tiny_model")
    return dataclasses.replace(cfg, model=model)


def read_jsonl(path: Path) -> list[dict]:
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


def log(**fields) -> None:
    print(json.dumps(fields), flush=True)


def load_models(cfg: Config, seed: int, device: torch.device) -> tuple:
    """(tokenizer, policy in train mode, generator): vLLM on a GPU when it is installed, else HF
    `generate` from the policy itself."""
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    use_vllm = device.type == "cuda" and importlib.util.find_spec("vllm") is not None
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
    return tokenizer, policy, vllm or HFGenerator(policy, tokenizer, cfg.hf_generate_batch)


def tokenize_prompt_and_output(
    prompt_strs: list[str], output_strs: list[str], tokenizer
) -> dict[str, torch.Tensor]:
    """Each prompt+output as token ids, right-padded, split into model input and labels shifted by one.

    input_ids = ids[:, :-1] and labels = ids[:, 1:], both (B, L - 1) for the longest pair's L tokens;
    response_mask is true where the label is an output token (prompt tokens and padding are masked out).
    """
    prompts = tokenizer(prompt_strs, add_special_tokens=False)["input_ids"]
    outputs = tokenizer(output_strs, add_special_tokens=False)["input_ids"]
    seqs = [p + o for p, o in zip(prompts, outputs, strict=True)]
    ids = torch.full((len(seqs), max(len(s) for s in seqs)), tokenizer.pad_token_id, dtype=torch.long)
    is_output = torch.zeros(ids.shape, dtype=torch.bool)
    for i, (prompt, seq) in enumerate(zip(prompts, seqs, strict=True)):
        ids[i, : len(seq)] = torch.tensor(seq)
        is_output[i, len(prompt) : len(seq)] = True
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:], "response_mask": is_output[:, 1:]}


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of the next-token distribution at every position: logsumexp(z) - sum softmax(z) z."""
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(dim=-1)


def response_log_probs(
    model: torch.nn.Module, input_ids: torch.Tensor, labels: torch.Tensor, return_token_entropy: bool = False
) -> dict[str, torch.Tensor]:
    """log p(labels_t | input_ids_0..t) of a causal LM, (B, T) in float32; with return_token_entropy,
    also the per-token entropy (computed without gradient: it is a diagnostic here).

    Right-padded batches need no attention mask: causal attention never shows a real token the padding
    that comes after it.
    """
    logits = model(input_ids=input_ids).logits.float()
    # gather - logsumexp avoids materialising a full log_softmax copy of the vocab-sized logits
    log_probs = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    out = {"log_probs": log_probs}
    if return_token_entropy:
        with torch.no_grad():
            out["token_entropy"] = token_entropy(logits)
    return out


def micro_batch(
    batch: dict[str, torch.Tensor], idx: torch.Tensor, device: torch.device
) -> dict[str, torch.Tensor]:
    """Rows idx of the rollout batch, cut after their last response token (padding costs compute)."""
    mask = batch["response_mask"][idx]
    last = (mask * torch.arange(1, mask.shape[1] + 1)).max()
    width = max(1, int(last))
    return {key: value[idx, :width].to(device) for key, value in batch.items()}


def rollout_log_probs(
    policy: torch.nn.Module, batch: dict[str, torch.Tensor], cfg: Config, device: torch.device
) -> torch.Tensor:
    """Log-probs of the policy that sampled the rollouts, before any update: grpo_clip's pi_old."""
    old_log_probs = torch.zeros(batch["labels"].shape)
    policy.eval()
    with torch.no_grad():
        for idx in torch.arange(len(old_log_probs)).split(cfg.micro_batch_size):
            mb = micro_batch(batch, idx, device)
            log_probs = response_log_probs(policy, mb["input_ids"], mb["labels"])["log_probs"]
            old_log_probs[idx, : log_probs.shape[1]] = log_probs.cpu()
    policy.train()
    return old_log_probs


def train_on_rollouts(
    policy: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    raw_rewards: torch.Tensor,
    advantages: torch.Tensor,
    cfg: Config,
    device: torch.device,
) -> dict[str, float]:
    """Optimizer steps of train_batch_size responses over one rollout batch, in micro-batches."""
    n = len(batch["labels"])
    old_log_probs = rollout_log_probs(policy, batch, cfg, device) if cfg.loss_type == "grpo_clip" else None
    losses, grad_norms, entropies, clip_fractions = [], [], [], []
    order = torch.randperm(n) if cfg.shuffle_rollouts else torch.arange(n)
    for chunk in order.split(cfg.train_batch_size):
        optimizer.zero_grad(set_to_none=True)
        chunk_loss = 0.0
        for idx in chunk.split(cfg.micro_batch_size):
            mb = micro_batch(batch, idx, device)
            out = response_log_probs(policy, mb["input_ids"], mb["labels"], return_token_entropy=True)
            width = out["log_probs"].shape[1]
            loss, metadata = microbatch_train_step(
                out["log_probs"],
                mb["response_mask"],
                # the chunk is len(chunk) / len(idx) micro-batches of this size: the sum is the chunk's mean
                gradient_accumulation_steps=len(chunk) / len(idx),
                loss_type=cfg.loss_type,
                normalization=cfg.loss_normalization,
                raw_rewards=raw_rewards[idx].to(device),
                advantages=advantages[idx].to(device),
                old_log_probs=None if old_log_probs is None else old_log_probs[idx, :width].to(device),
                clip_range=cfg.clip_range,
            )
            chunk_loss += loss.item()
            entropies.append(masked_mean(out["token_entropy"], mb["response_mask"]).item())
            if "clip_fraction" in metadata:
                clip_fractions.append(metadata["clip_fraction"].item())
        losses.append(chunk_loss)
        grad_norms.append(torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm).item())
        optimizer.step()
    stats = {
        "loss": sum(losses) / len(losses),
        "grad_norm": max(grad_norms),
        "entropy": sum(entropies) / len(entropies),
    }
    if clip_fractions:
        stats["clip_fraction"] = sum(clip_fractions) / len(clip_fractions)
    return stats


def grpo_step(
    policy: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    generator,
    tokenizer,
    problems: list[dict],
    cfg: Config,
    device: torch.device,
) -> dict[str, float]:
    """One GRPO step: sample group_size responses per problem, reward them, train on them, then push
    the new weights to the generator. Returns the step's statistics and timings."""
    t0 = time.monotonic()
    prompts = [R1_ZERO_PROMPT.format(question=ex["problem"]) for ex in problems]
    responses = generator.generate(prompts, Sampling(cfg.group_size, cfg.temperature, cfg.max_new_tokens))
    rollout_s = time.monotonic() - t0
    answers = [ex["answer"] for ex in problems for _ in range(cfg.group_size)]
    advantages, raw_rewards, reward_stats = group_normalized_rewards(
        r1_zero_reward, responses, answers, cfg.group_size, cfg.advantage_eps, cfg.use_std_normalization
    )
    batch = tokenize_prompt_and_output(
        [p for p in prompts for _ in range(cfg.group_size)], responses, tokenizer
    )
    t1 = time.monotonic()
    stats = train_on_rollouts(policy, optimizer, batch, raw_rewards, advantages, cfg, device)
    train_s = time.monotonic() - t1
    generator.sync(policy)
    return {
        **reward_stats,
        **stats,
        "response_tokens": int(batch["response_mask"].sum()),
        "rollout_s": round(rollout_s, 3),
        "train_s": round(train_s, 3),
        "seconds": round(time.monotonic() - t0, 3),
    }


def evaluate_policy(generator, val: list[dict], cfg: Config) -> dict[str, float]:
    """Answer every validation problem once and grade the answers with the protected grader (not the
    editable training reward): for the log, and to choose the policy handed over."""
    prompts = [R1_ZERO_PROMPT.format(question=ex["problem"]) for ex in val]
    outputs = generator.generate(prompts, Sampling(1, cfg.eval_temperature, cfg.max_new_tokens))
    correct = sum(is_correct(out, ex["answer"]) for out, ex in zip(outputs, val, strict=True))
    formatted = sum(extract_answer(out) is not None for out in outputs)
    return {"accuracy": correct / len(val), "format_rate": formatted / len(val)}


@dataclass
class BestPolicy:
    """The policy of the best in-training evaluation so far, its weights copied to the CPU (the
    paper's reward is the best evaluation's accuracy; ~3 GB of host memory at paper scale)."""

    step: int = 0
    accuracy: float | None = None
    state: dict[str, torch.Tensor] | None = None

    def offer(self, policy: torch.nn.Module, step: int, accuracy: float) -> None:
        if self.accuracy is None or accuracy >= self.accuracy:  # a tie goes to the longer-trained policy
            self.step, self.accuracy = step, accuracy
            self.state = {k: v.detach().to("cpu", copy=True) for k, v in policy.state_dict().items()}


def evaluate_and_keep(
    policy: torch.nn.Module, generator, val: list[dict], cfg: Config, step: int, best: BestPolicy
) -> float:
    """One in-training evaluation, logged and offered to `best`; returns its seconds."""
    t0 = time.monotonic()
    scores = evaluate_policy(generator, val, cfg)
    best.offer(policy, step, scores["accuracy"])
    seconds = time.monotonic() - t0
    log(event="eval", step=step, **scores, seconds=round(seconds, 2))
    return seconds


def save_policy(policy: torch.nn.Module, best: BestPolicy, tokenizer, path: Path) -> None:
    """Hand over the best evaluated policy (the current one if nothing was evaluated): what the
    frozen evaluator loads and scores."""
    if best.state is not None:
        policy.load_state_dict(best.state)
    policy.config.use_cache = True  # turned off for training; generation wants it
    policy.save_pretrained(path)  # safetensors
    tokenizer.save_pretrained(path)


def main() -> None:
    start_time = time.monotonic()
    output_dir = Path(os.environ["HPCX_OUTPUT_DIR"])
    data_dir = Path(os.environ["HPCX_DATA_DIR"])
    budget_s = float(os.environ.get("HPCX_TIME_BUDGET_S", "3540"))
    seed = int(os.environ.get("HPCX_SEED", "0"))
    torch.set_num_threads(int(os.environ.get("HPCX_CPUS", "1")))
    cfg = load_config(data_dir)
    random.seed(seed)
    torch.manual_seed(seed)
    train, val = read_jsonl(data_dir / "train.jsonl"), read_jsonl(data_dir / "val.jsonl")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer, policy, generator = load_models(cfg, seed, device)
    optimizer = torch.optim.AdamW(
        policy.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay
    )
    backend = "vllm" if isinstance(generator, VLLMGenerator) else "hf"
    log(event="start", config=dataclasses.asdict(cfg), device=str(device), backend=backend)

    rng = random.Random(seed)
    step_s, eval_s = 0.0, None
    completed, last_eval, best = 0, None, BestPolicy()
    before = cfg.eval_cadence == "before"
    last_scheduled = (cfg.n_steps - 1) // cfg.eval_every * cfg.eval_every  # the last "before" evaluation
    for updates in range(cfg.n_steps):  # `updates` optimizer steps taken so far
        if before and updates % cfg.eval_every == 0:
            eval_s, last_eval = evaluate_and_keep(policy, generator, val, cfg, updates, best), updates
            if updates >= last_scheduled:
                break  # no evaluation would see more training
        # Stop while a step and an evaluation still fit: only an evaluated step can be handed over.
        # Saving the policy fits in the margin between the budget and the worker's kill.
        expected_eval_s = eval_s if eval_s is not None else step_s / 2
        if time.monotonic() - start_time + step_s + expected_eval_s > budget_s:
            log(event="budget_stop", completed_steps=completed)
            break
        stats = grpo_step(
            policy, optimizer, generator, tokenizer, rng.sample(train, cfg.prompts_per_step), cfg, device
        )
        completed, step_s = updates + 1, max(step_s, stats["seconds"])
        log(event="step", step=completed, **stats)
        if not before and completed % cfg.eval_every == 0:
            eval_s, last_eval = evaluate_and_keep(policy, generator, val, cfg, completed, best), completed
    if last_eval != completed:  # the last step may be the best
        evaluate_and_keep(policy, generator, val, cfg, completed, best)
    save_policy(policy, best, tokenizer, output_dir / "policy")
    log(event="policy_saved", step=best.step, eval_accuracy=best.accuracy)
    log(event="done", seconds=round(time.monotonic() - start_time, 2))


if __name__ == "__main__":
    main()
