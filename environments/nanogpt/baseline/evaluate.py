"""Frozen evaluator: validation loss of the trained checkpoint, token by token with a KV cache.

Loads ``$HPCX_OUTPUT_DIR/ckpt.pt`` into the model class of the trained workspace
(``build_model`` in ``$HPCX_WORKSPACE/model.py``), then scores the first N tokens of the FineWeb
validation shard (paper: 10,485,760) in windows of ``seq_len`` tokens. The model never sees a
whole window: it is given position t's token through ``decode_step`` and must predict token t+1
before token t+1 exists anywhere it can reach. A diff that lets training-time attention peek at
future tokens therefore earns no lower loss here (it usually earns a much higher one).

As a diagnostic it also checks the model's full-sequence ``forward`` for causality (do a
position's logits change when only later tokens change?) and reports a detected leak in the
metrics as ``future_leak`` and ``invalid_reason``. When the loss reaches the preset's target (3.28
at paper scale) it reports the training time as ``time_to_target_s``: the worker's measurement of
the training process (``HPCX_TRAIN_SECONDS``), never a number the trained code wrote.

Everything runs in float32 (weights, activations and the KV cache, TF32 off), as the paper's
token-by-token validation does; the record trains in bf16 autocast but validates in fp32.

Data loading, windows and the loss are this file's own code; nothing the training wrote is
trusted except the weights. Runs as one process or under torchrun (sequences split over ranks).
Writes ``{"val_loss", "val_tokens", ...}`` to ``$HPCX_METRICS_PATH``; exits non-zero when it
cannot evaluate.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

SHARD_MAGIC = 20240520
HEADER_INTS = 256
# Bound before the workspace's model code is imported into this process, so that code cannot
# replace the loss by reassigning torch.nn.functional.cross_entropy.
_cross_entropy = F.cross_entropy


@dataclass(frozen=True)
class EvalPreset:
    val_tokens: int  # scored tokens (targets)
    seq_len: int  # window length: each window starts with an empty cache
    batch: int  # windows decoded together per rank
    probe_len: int  # length of the sequences used by the causality probe
    target_loss: float  # time_to_target_s is reported when val_loss reaches this


PRESETS = {
    "paper": EvalPreset(val_tokens=10_485_760, seq_len=1024, batch=128, probe_len=256, target_loss=3.28),
    # the CPU baseline ends at 2.5-4.0 after 20 s on the synthetic corpus (2.46 when it gets 600 steps)
    "cpu": EvalPreset(val_tokens=4096, seq_len=64, batch=64, probe_len=64, target_loss=2.5),
}


class EvalError(RuntimeError):
    """The checkpoint or the model cannot be evaluated; the message says why."""


def load_val_tokens(data_dir: Path, n: int) -> torch.Tensor:
    """The first ``n`` tokens of the validation shard(s), in order, as int64."""
    files = sorted(data_dir.glob("fineweb_val_*.bin"))
    if not files:
        raise EvalError(f"no fineweb_val_*.bin in {data_dir}")
    parts, have = [], 0
    for path in files:
        header = np.fromfile(path, dtype=np.int32, count=HEADER_INTS)
        if header[0] != SHARD_MAGIC:
            raise EvalError(f"{path}: not a token shard (magic {header[0]})")
        tokens = np.fromfile(path, dtype=np.uint16, count=int(header[2]), offset=HEADER_INTS * 4)
        parts.append(tokens[: n - have])
        have += len(parts[-1])
        if have == n:
            return torch.from_numpy(np.concatenate(parts).astype(np.int64))
    raise EvalError(f"validation data has {have} tokens, {n} needed")


def load_model(workspace: Path, ckpt_path: Path, device: torch.device) -> torch.nn.Module:
    """The trained model in eval mode, in float32."""
    model_file = workspace / "model.py"
    if not model_file.is_file():
        raise EvalError(f"{model_file} not found: the evaluator imports build_model(config) from it")
    sys.path.insert(0, str(workspace))  # model.py may import its own sibling modules
    spec = importlib.util.spec_from_file_location("model", model_file)
    module = importlib.util.module_from_spec(spec)
    sys.modules["model"] = module  # dataclasses and sibling imports look the module up by name
    spec.loader.exec_module(module)
    if not hasattr(module, "build_model"):
        raise EvalError("model.py has no build_model(config) -> nn.Module")
    if not ckpt_path.is_file():
        raise EvalError(f"{ckpt_path} not found: training did not save a checkpoint")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "model_config" not in ckpt or "state_dict" not in ckpt:
        raise EvalError('checkpoint must be {"model_config": dict, "state_dict": ...}')
    model = module.build_model(ckpt["model_config"])
    model.load_state_dict(ckpt["state_dict"])
    for name in ("new_kv_cache", "decode_step"):
        if not callable(getattr(model, name, None)):
            raise EvalError(
                f"the model has no {name}(): the evaluator scores token by token with a KV cache and needs "
                "new_kv_cache(batch_size, max_len, device, dtype) and decode_step(tokens, cache) -> logits"
            )
    # model.py ran inside this process: undo any lower matmul precision it may have asked for.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    return model.to(device=device, dtype=torch.float32).eval()


def measured_train_seconds() -> float | None:
    """The worker's measurement of the training run (HPCX_TRAIN_SECONDS); None when run by hand."""
    try:
        seconds = float(os.environ.get("HPCX_TRAIN_SECONDS", ""))
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None


@torch.no_grad()
def kv_cache_loss(
    model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, device: torch.device
) -> tuple[float, int]:
    """Summed cross-entropy (nats) of ``y`` given ``x``, one position at a time; and the count."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    vocab_needed = int(y.max()) + 1
    for start in range(0, len(x), batch):
        xb, yb = x[start : start + batch].to(device), y[start : start + batch].to(device)
        B, T = xb.shape
        cache = model.new_kv_cache(B, T, device, torch.float32)
        for t in range(T):
            # Only tokens 0..t have been handed to the model when it predicts token t+1. A copy, not
            # a view: a view's storage would hold the whole window, future tokens included.
            logits = model.decode_step(xb[:, t].clone(), cache)
            if type(logits) is not torch.Tensor:  # a subclass could redefine the ops the loss uses
                raise EvalError(f"decode_step returned a {type(logits).__name__}, want a plain torch.Tensor")
            if logits.dim() != 2 or logits.shape[0] != B or logits.shape[1] < vocab_needed:
                shape, want = tuple(logits.shape), f"({B}, >= {vocab_needed})"
                raise EvalError(f"decode_step returned logits of shape {shape}, want {want}")
            total += _cross_entropy(logits.float(), yb[:, t], reduction="sum").double()
            count += B
    return float(total), count


def target_metrics(val_loss: float | None, train_seconds: float | None, target_loss: float) -> dict:
    """Validation runs once, on the final checkpoint: when it reaches the target, the worker-measured
    training time that produced it is the time to target. An upper bound: the loss may have crossed
    it earlier."""
    reached = val_loss is not None and val_loss <= target_loss
    return {
        "target_loss": target_loss,
        "reached_target": reached,
        "train_seconds": train_seconds,
        "time_to_target_s": train_seconds if reached else None,
    }


@torch.no_grad()
def causality_probe(model: torch.nn.Module, x: torch.Tensor, device: torch.device) -> dict:
    """Does the full-sequence forward let position t see tokens after t? Compares the logits of the
    first half before and after replacing the second half with other tokens."""
    cut = x.shape[1] // 2
    x_other = x.clone()
    x_other[:, cut:] = torch.roll(x[:, cut:], shifts=1, dims=0)  # other sequences' real tokens
    try:
        a = model(x.to(device)).float()
        b = model(x_other.to(device)).float()
    except Exception as exc:  # a changed forward signature is the model's business, not a failure
        return {"causality_probe": f"skipped: forward(idx) failed: {type(exc).__name__}: {exc}"}
    if a.shape[:2] != x.shape:
        return {"causality_probe": f"skipped: forward(idx) returned shape {tuple(a.shape)}"}
    diff = float((a[:, :cut] - b[:, :cut]).abs().max())
    scale = float(a[:, :cut].abs().max()) + 1e-6
    leak = diff > 1e-3 * scale
    out = {"causality_probe": "leak" if leak else "ok", "future_leak": leak, "leak_max_logit_diff": diff}
    if leak:
        out["invalid_reason"] = (
            f"forward() is not causal: logits of the first {cut} positions change by up to {diff:.3g} "
            "when only later tokens change (attention sees the future during training)"
        )
    return out


def main() -> None:
    t0 = time.perf_counter()
    preset = PRESETS[os.environ.get("NANOGPT_PRESET", "paper")]
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    torch.set_num_threads(max(1, int(os.environ.get("HPCX_CPUS", "1")) // world_size))  # shared by the ranks
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")

    try:
        model = load_model(
            Path(os.environ["HPCX_WORKSPACE"]), Path(os.environ["HPCX_OUTPUT_DIR"]) / "ckpt.pt", device
        )
        n = preset.val_tokens
        if n % preset.seq_len:
            raise EvalError(f"val_tokens {n} is not a multiple of seq_len {preset.seq_len}")
        tokens = load_val_tokens(Path(os.environ["HPCX_DATA_DIR"]), n + 1)
        x = tokens[:-1].view(-1, preset.seq_len)
        y = tokens[1:].view(-1, preset.seq_len)
        # Each rank scores an interleaved share of the windows; the sums are added up below.
        loss_sum, count = kv_cache_loss(model, x[rank::world_size], y[rank::world_size], preset.batch, device)
    except EvalError as exc:
        print(f"evaluate.py: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)

    totals = torch.tensor([loss_sum, float(count)], dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(totals)
    if rank == 0:
        val_loss = float(totals[0] / totals[1])
        metrics = {"val_loss": val_loss if math.isfinite(val_loss) else None, "val_tokens": int(totals[1])}
        metrics.update(target_metrics(metrics["val_loss"], measured_train_seconds(), preset.target_loss))
        probe = tokens[: 4 * preset.probe_len].view(4, preset.probe_len)
        metrics.update(causality_probe(model, probe, device))
        metrics["eval_seconds"] = round(time.perf_counter() - t0, 2)
        path = Path(os.environ["HPCX_METRICS_PATH"])
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(metrics, indent=2) + "\n")
        tmp.replace(path)
        print(json.dumps(metrics), flush=True)
    if world_size > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
