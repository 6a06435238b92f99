"""Train the tiny character-level GPT for a fixed number of steps on one CPU thread.

Protocol (see README.md): reads $HPCX_DATA_DIR/train.bin (uint8 character ids) and meta.json,
is deterministic for a given $HPCX_SEED and $HPCX_CPUS, stops early if $HPCX_TIME_BUDGET_S is
about to run out, and writes $HPCX_OUTPUT_DIR/ckpt.pt = {"model_config": dict, "state_dict": ...}
which the frozen evaluator rebuilds with ``model.build_model(model_config)``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from model import build_model

START = time.time()
SEED = int(os.environ.get("HPCX_SEED", "0"))
TIME_BUDGET_S = float(os.environ.get("HPCX_TIME_BUDGET_S", "60"))
DATA_DIR = Path(os.environ.get("HPCX_DATA_DIR", "data"))
OUT_DIR = Path(os.environ.get("HPCX_OUTPUT_DIR", "out"))
SAVE_MARGIN_S = 3.0  # stop this long before the budget ends, to leave time for saving

# Model (vocab_size comes from meta.json).
BLOCK_SIZE = 128
N_LAYER = 3
N_HEAD = 4
D_MODEL = 96
DROPOUT = 0.0

# Optimisation.
STEPS = 300
BATCH_SIZE = 16
LR = 3e-4
WEIGHT_DECAY = 0.0
LOG_EVERY = 25


def get_lr(step: int) -> float:
    return LR


def get_batch(data: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ix = torch.randint(len(data) - BLOCK_SIZE - 1, (BATCH_SIZE,), generator=gen)
    x = torch.stack([data[i : i + BLOCK_SIZE] for i in ix])
    y = torch.stack([data[i + 1 : i + 1 + BLOCK_SIZE] for i in ix])
    return x, y


def main() -> None:
    torch.set_num_threads(int(os.environ.get("HPCX_CPUS", "1")))
    torch.manual_seed(SEED)
    meta = json.loads((DATA_DIR / "meta.json").read_text())
    data = torch.from_numpy(np.fromfile(DATA_DIR / "train.bin", dtype=np.uint8).astype(np.int64))
    config = {
        "vocab_size": meta["vocab_size"],
        "block_size": BLOCK_SIZE,
        "n_layer": N_LAYER,
        "n_head": N_HEAD,
        "d_model": D_MODEL,
        "dropout": DROPOUT,
    }
    model = build_model(config)
    print(f"params {sum(p.numel() for p in model.parameters())} config {config}", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    gen = torch.Generator().manual_seed(SEED)

    model.train()
    for step in range(STEPS):
        lr = get_lr(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = get_batch(data, gen)
        logits = model(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        elapsed = time.time() - START
        if step % LOG_EVERY == 0 or step == STEPS - 1:
            print(
                f"step {step:4d}/{STEPS} loss {loss.item():.4f} lr {lr:.2e} elapsed {elapsed:.1f}s",
                flush=True,
            )
        if elapsed > TIME_BUDGET_S - SAVE_MARGIN_S:
            print(f"time budget reached at step {step} ({elapsed:.1f}s); stopping early", flush=True)
            break

    OUT_DIR.mkdir(parents=True, exist_ok=True)
    torch.save({"model_config": config, "state_dict": model.state_dict()}, OUT_DIR / "ckpt.pt")
    print(f"saved {OUT_DIR / 'ckpt.pt'} after {time.time() - START:.1f}s", flush=True)


if __name__ == "__main__":
    main()
