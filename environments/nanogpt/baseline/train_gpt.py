# ruff: noqa: E402  (the clock starts before the imports)
"""Train GPT-2 (124M) on FineWeb GPT-2 tokens for a fixed wall-clock budget.

Launch: ``torchrun --standalone --nproc_per_node=8 train_gpt.py`` (DDP), or ``python train_gpt.py``
for one process. Reads the hpc-executor protocol variables (HPCX_DATA_DIR, HPCX_OUTPUT_DIR,
HPCX_TIME_BUDGET_S (default 1500), HPCX_SEED, HPCX_CPUS); ``NANOGPT_PRESET=cpu`` selects a tiny
model and batch that run the same code on a laptop CPU; ``NANOGPT_MAX_STEPS`` stops after that many
steps (short throughput runs such as ``gpu_smoke.py``).

Training stops by itself before the time budget (the worker kills it a short margin after it);
rank 0 then writes ``$HPCX_OUTPUT_DIR/ckpt.pt`` = {"model_config": dict, "state_dict": fp32 weights
of the unwrapped model}. The validation loss is computed afterwards by the frozen evaluator, and the
training time by the worker, not here. The last line of the log is ``summary {json}``: steps, train
seconds, mean step time, tokens/s and peak GPU memory.
"""

from __future__ import annotations

import time

# The budget counts from the process start, as the worker's clock does (importing torch takes seconds).
T_PROCESS_START = time.perf_counter()

import contextlib
import dataclasses
import glob
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from model import GPT, GPTConfig
from torch.nn.parallel import DistributedDataParallel as DDP

SHARD_MAGIC = 20240520
SHARD_VERSION = 1
HEADER_INTS = 256


@dataclass
class Hyperparameters:
    model: GPTConfig
    seq_len: int = 1024
    batch_tokens: int = 262_144  # per optimizer step, over all ranks and accumulation steps
    micro_batch: int = 32  # sequences per rank per forward/backward
    lr: float = 0.0015
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    warmup_steps: int = 256
    # The record's schedule by step count: after warmup, linear decay over num_steps toward
    # decay_floor / (1 + decay_floor) = 0.091 of the peak. A 1500 s budget stops it partway.
    num_steps: int = 26_880
    decay_floor: float = 0.1
    grad_clip: float = 1.0
    save_reserve_s: float = 10.0  # stop this early so the checkpoint is written inside the budget
    compile: bool = True
    log_every: int = 10


PRESETS = {
    "paper": Hyperparameters(model=GPTConfig()),
    "cpu": Hyperparameters(
        # The synthetic corpus uses ids < 512 (see prepare_data.py).
        model=GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=2, n_embd=64),
        seq_len=64,
        batch_tokens=1024,
        micro_batch=8,
        lr=0.0025,  # best of 0.0015-0.04 for this model at 400 steps (val loss 2.81; 0.01: 3.33)
        warmup_steps=10,
        num_steps=800,  # a 20 s budget stops it partway too (400-600 steps on one thread)
        save_reserve_s=1.0,
        compile=False,
        log_every=20,
    ),
}


def read_shard(path: str) -> np.ndarray:
    """Tokens of one shard as a uint16 memmap, after checking its header."""
    header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
    assert header[0] == SHARD_MAGIC, f"{path}: bad magic {header[0]}"
    assert header[1] == SHARD_VERSION, f"{path}: unsupported version {header[1]}"
    n_tokens = int(header[2])
    return np.memmap(path, dtype=np.uint16, mode="r", offset=HEADER_INTS * 4, shape=(n_tokens,))


class DistributedTokenLoader:
    """Walks the train shards in order; each step every rank takes its own slice of one chunk."""

    def __init__(self, pattern: str, batch: int, seq_len: int, rank: int, world_size: int) -> None:
        self.files = sorted(glob.glob(pattern))
        assert self.files, f"no train shards match {pattern}"
        self.batch, self.seq_len, self.rank, self.world_size = batch, seq_len, rank, world_size
        self.chunk = batch * seq_len * world_size
        self.shard_idx = -1
        self._next_shard()

    def _next_shard(self) -> None:
        self.shard_idx = (self.shard_idx + 1) % len(self.files)
        self.tokens = read_shard(self.files[self.shard_idx])
        assert len(self.tokens) > self.chunk, f"{self.files[self.shard_idx]} is shorter than one batch"
        self.offset = 0

    def next_batch(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.offset + self.chunk + 1 > len(self.tokens):
            self._next_shard()
        start = self.offset + self.rank * self.batch * self.seq_len
        buf = torch.from_numpy(self.tokens[start : start + self.batch * self.seq_len + 1].astype(np.int64))
        self.offset += self.chunk
        x = buf[:-1].view(self.batch, self.seq_len)
        y = buf[1:].view(self.batch, self.seq_len)
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def lr_multiplier(step: int, hp: Hyperparameters) -> float:
    """The record's schedule: (step + 1) / warmup_steps while warming up, then a linear decay by
    step count from 1 to decay_floor / (1 + decay_floor) at num_steps."""
    if step < hp.warmup_steps:
        return (step + 1) / hp.warmup_steps
    decay = (step - hp.warmup_steps) / (hp.num_steps - hp.warmup_steps)
    return (hp.decay_floor + 1.0 - decay) / (hp.decay_floor + 1.0)


def main() -> None:
    t_start = T_PROCESS_START
    hp = PRESETS[os.environ.get("NANOGPT_PRESET", "paper")]
    data_dir = Path(os.environ["HPCX_DATA_DIR"])
    out_dir = Path(os.environ["HPCX_OUTPUT_DIR"])
    budget_s = float(os.environ.get("HPCX_TIME_BUDGET_S", "1500"))
    max_steps = int(os.environ.get("NANOGPT_MAX_STEPS", "0"))  # 0: until the budget runs out
    seed = int(os.environ.get("HPCX_SEED", "0"))

    # torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; a plain `python train_gpt.py` is one process.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    # HPCX_CPUS is for the whole trial: share it between the ranks.
    torch.set_num_threads(max(1, int(os.environ.get("HPCX_CPUS", "1")) // world_size))
    distributed = world_size > 1
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if distributed:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    master = rank == 0

    def log(msg: str) -> None:
        if master:
            print(msg, flush=True)

    accum = hp.batch_tokens // (hp.micro_batch * hp.seq_len * world_size)
    assert accum >= 1 and accum * hp.micro_batch * hp.seq_len * world_size == hp.batch_tokens, (
        f"batch_tokens {hp.batch_tokens} is not micro_batch x seq_len x world_size x an integer"
    )
    log(f"hyperparameters: {hp}")
    log(f"world_size {world_size}, grad accumulation {accum}, device {device}, budget {budget_s:.0f}s")

    torch.manual_seed(seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    raw_model = GPT(hp.model).to(device)
    model: torch.nn.Module = torch.compile(raw_model) if hp.compile and device.type == "cuda" else raw_model
    if distributed:
        model = DDP(model, device_ids=[local_rank] if device.type == "cuda" else None)
    log(f"parameters: {sum(p.numel() for p in raw_model.parameters()):,}")

    # Weight decay on every parameter, as in the record (it has only matrices and embeddings).
    optimizer = torch.optim.AdamW(
        raw_model.parameters(),
        lr=hp.lr,
        weight_decay=hp.weight_decay,
        betas=hp.betas,
        fused=device.type == "cuda",
    )
    autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    loader = DistributedTokenLoader(
        str(data_dir / "fineweb_train_*.bin"), hp.micro_batch, hp.seq_len, rank, world_size
    )

    step, step_time = 0, 0.0
    timed_s, timed_steps = 0.0, 0  # steps after the first (which includes torch.compile), for throughput
    while True:
        t_step = time.perf_counter()
        # Ranks must agree on the clock, or one would stop while the others wait in all_reduce:
        # everyone uses the slowest rank's elapsed time.
        elapsed = torch.tensor(time.perf_counter() - t_start, device=device)
        if distributed:
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        elapsed_s = float(elapsed)
        out_of_time = elapsed_s + step_time + hp.save_reserve_s >= budget_s
        if out_of_time or step >= hp.num_steps or 0 < max_steps <= step:
            break

        mult = lr_multiplier(step, hp)
        for group in optimizer.param_groups:
            group["lr"] = hp.lr * mult
        model.train()
        train_loss = torch.zeros((), device=device)
        for micro in range(accum):
            x, y = loader.next_batch(device)
            # DDP all-reduces gradients only on the last micro-step.
            no_sync = model.no_sync() if distributed and micro < accum - 1 else contextlib.nullcontext()
            with no_sync:
                with autocast:
                    loss = model(x, y) / accum
                loss.backward()
            train_loss += loss.detach()
        torch.nn.utils.clip_grad_norm_(raw_model.parameters(), hp.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % hp.log_every == 0 or step == 1:
            if distributed:  # gloo has no AVG
                dist.all_reduce(train_loss)
                train_loss /= world_size
            log(f"step {step} train_loss {train_loss.item():.4f} lr {hp.lr * mult:.2e} t {elapsed_s:.1f}s")
        step_time = time.perf_counter() - t_step
        if step > 1:
            timed_s, timed_steps = timed_s + step_time, timed_steps + 1

    train_seconds = time.perf_counter() - t_start
    log(f"stopped after {step} steps, {train_seconds:.1f}s")
    if master:
        ckpt = {
            "model_config": dataclasses.asdict(hp.model),
            "state_dict": {k: v.float().cpu() for k, v in raw_model.state_dict().items()},
        }
        tmp = out_dir / "ckpt.pt.tmp"
        torch.save(ckpt, tmp)
        tmp.replace(out_dir / "ckpt.pt")  # atomic: the evaluator never sees half a checkpoint
        log(f"saved {out_dir / 'ckpt.pt'} at {time.perf_counter() - t_start:.1f}s")
    step_s = timed_s / timed_steps if timed_steps else None
    summary = {
        "steps": step,
        "train_seconds": round(train_seconds, 2),
        "step_ms": round(1000 * step_s, 1) if step_s else None,
        "tokens_per_s": round(hp.batch_tokens / step_s) if step_s else None,
        "peak_memory_mib": torch.cuda.max_memory_allocated(device) // 2**20
        if device.type == "cuda"
        else None,
    }
    log(f"summary {json.dumps(summary)}")
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
