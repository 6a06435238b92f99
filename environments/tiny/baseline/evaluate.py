"""Frozen evaluator of the tiny environment: validation loss of the trained model, plus a causality check.

Runs from a pristine copy of baseline/ and trusts nothing the training wrote except the checkpoint:
it imports ``build_model`` from $HPCX_WORKSPACE/model.py (ideas may change the architecture),
loads $HPCX_OUTPUT_DIR/ckpt.pt = {"model_config": dict, "state_dict": ...}, and computes the
cross-entropy itself on a fixed set of windows of $HPCX_DATA_DIR/val.bin.

Writes to $HPCX_METRICS_PATH: {"val_loss": float | null, "val_tokens": int, "params": int,
"causal": bool}, plus "invalid_reason" when the result must not count. val_loss is null when the
loss is not finite; causal is false when perturbing future tokens changes earlier logits (the
model peeks ahead). Both make the result invalid.
Exits non-zero, with the reason on stderr, when the model cannot be rebuilt or run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

EVAL_TOKENS = 65_536  # scored tokens: the first EVAL_TOKENS + 1 characters of val.bin
MAX_CONTEXT = 128  # window length (shorter if the model's block_size is shorter)
BATCH = 64
CAUSAL_ATOL = 1e-4


def fail(message: str) -> None:
    print(f"evaluate.py: {message}", file=sys.stderr)
    sys.exit(1)


def load_model(workspace: Path, ckpt_path: Path) -> tuple[torch.nn.Module, dict]:
    if not ckpt_path.is_file():
        fail(f"no checkpoint at {ckpt_path}: training did not save one")
    model_file = workspace / "model.py"
    if not model_file.is_file():
        fail(f"no model.py in the workspace {workspace}")
    # The workspace's model.py (and any sibling module it imports) must win over the pristine copy
    # next to this script, which is on sys.path first.
    sys.path.insert(0, str(workspace))
    spec = importlib.util.spec_from_file_location("model", model_file)
    module = importlib.util.module_from_spec(spec)
    sys.modules["model"] = module
    try:
        spec.loader.exec_module(module)
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        config = dict(ckpt["model_config"])
        model = module.build_model(config)
        model.load_state_dict(ckpt["state_dict"])
    except Exception as exc:  # any failure here means the trial cannot be evaluated
        fail(f"cannot rebuild the model from {ckpt_path}: {type(exc).__name__}: {exc}")
    model.eval()
    return model, config


@torch.no_grad()
def val_loss(model: torch.nn.Module, val: torch.Tensor, context: int, vocab_size: int) -> tuple[float, int]:
    n_windows = EVAL_TOKENS // context
    x = val[: n_windows * context].view(n_windows, context)
    y = val[1 : n_windows * context + 1].view(n_windows, context)
    total = 0.0
    for i in range(0, n_windows, BATCH):
        logits = model(x[i : i + BATCH])
        if logits.shape != (*x[i : i + BATCH].shape, vocab_size):
            fail(f"logits have shape {tuple(logits.shape)}, expected [B, T, {vocab_size}]")
        loss = F.cross_entropy(
            logits.double().reshape(-1, vocab_size), y[i : i + BATCH].reshape(-1), reduction="sum"
        )
        total += loss.item()
    return total / y.numel(), y.numel()


@torch.no_grad()
def is_causal(model: torch.nn.Module, val: torch.Tensor, context: int, vocab_size: int) -> bool:
    """Logits before position t must not change when the tokens from t on are replaced."""
    gen = torch.Generator().manual_seed(0)
    starts = torch.randint(len(val) - context, (4,), generator=gen)
    x = torch.stack([val[s : s + context] for s in starts])
    reference = model(x)
    for t in (1, context // 4, context // 2, context - 1):
        perturbed = x.clone()
        perturbed[:, t:] = torch.randint(vocab_size, perturbed[:, t:].shape, generator=gen)
        logits = model(perturbed)
        scale = 1.0 + reference[:, :t].abs().max().item()
        if not torch.allclose(logits[:, :t], reference[:, :t], rtol=0.0, atol=CAUSAL_ATOL * scale):
            return False
    return True


def main() -> None:
    torch.set_num_threads(int(os.environ.get("HPCX_CPUS", "1")))
    data_dir = Path(os.environ["HPCX_DATA_DIR"])
    workspace = Path(os.environ["HPCX_WORKSPACE"])
    metrics_path = Path(os.environ["HPCX_METRICS_PATH"])
    vocab_size = json.loads((data_dir / "meta.json").read_text())["vocab_size"]
    val = torch.from_numpy(np.fromfile(data_dir / "val.bin", dtype=np.uint8).astype(np.int64))

    model, config = load_model(workspace, Path(os.environ["HPCX_OUTPUT_DIR"]) / "ckpt.pt")
    context = min(MAX_CONTEXT, int(config.get("block_size", MAX_CONTEXT)))
    try:
        loss, tokens = val_loss(model, val, context, vocab_size)
        causal = is_causal(model, val, context, vocab_size)
    except Exception as exc:
        fail(f"the model failed on validation data: {type(exc).__name__}: {exc}")
    metrics = {
        "val_loss": loss if math.isfinite(loss) else None,
        "val_tokens": tokens,
        "params": sum(p.numel() for p in model.parameters()),
        "causal": causal,
    }
    if not causal:  # the worker turns any invalid_reason into an invalid_result
        metrics["invalid_reason"] = "the model's logits depend on future tokens (causality check failed)"
    tmp = metrics_path.with_name(metrics_path.name + ".tmp")
    tmp.write_text(json.dumps(metrics) + "\n")
    tmp.replace(metrics_path)
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
