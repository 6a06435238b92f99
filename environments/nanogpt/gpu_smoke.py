"""GPU smoke test of the nanoGPT environment: the real train_gpt.py for a few steps on one device.

    python environments/nanogpt/gpu_smoke.py                # one GPU: the paper's 124M model, 30 steps
    python environments/nanogpt/gpu_smoke.py --device cpu   # the CPU preset, 5 steps (what the tests run)

It writes synthetic shards in the FineWeb format (no network; token ids < 512 suit the paper model's
vocabulary too), runs `python train_gpt.py` (one process, no torchrun) with NANOGPT_MAX_STEPS, and
prints the throughput train_gpt.py reports: mean step time, tokens/s and peak GPU memory. On one GPU
a paper step is 8 gradient-accumulation micro-steps of 32 x 1024 tokens; the first step, which
includes torch.compile, is left out of the means. A 30-step run fits a 10-minute window on an H100.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASELINE = Path(__file__).resolve().parent / "baseline"


def run(cmd: list[str], env: dict[str, str]) -> dict | None:
    """Run a baseline script, echo its output, and return its `summary {json}` line if it printed one."""
    summary = None
    with subprocess.Popen(cmd, cwd=BASELINE, env=env, stdout=subprocess.PIPE, text=True) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
            if line.startswith("summary "):
                summary = json.loads(line.removeprefix("summary "))
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[1]} exited with code {proc.returncode}")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--steps", type=int, default=None, help="default: 30 on a GPU, 5 on the CPU")
    parser.add_argument("--budget", type=float, default=480.0, help="HPCX_TIME_BUDGET_S, seconds")
    args = parser.parse_args(argv)
    import torch  # only to see whether there is a GPU; training runs in its own process

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no GPU")
    steps = args.steps or (30 if cuda else 5)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="nanogpt_smoke_") as tmp:
        data, out = Path(tmp, "data"), Path(tmp, "out")
        out.mkdir()
        env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
        env.update(
            PYTHONDONTWRITEBYTECODE="1",  # keep baseline/ pristine
            HPCX_DATA_DIR=str(data),
            HPCX_OUTPUT_DIR=str(out),
            HPCX_TIME_BUDGET_S=str(args.budget),
            HPCX_SEED="0",
            HPCX_CPUS=env.get("HPCX_CPUS", "1"),
            NANOGPT_PRESET="paper" if cuda else "cpu",
            NANOGPT_MAX_STEPS=str(steps),
        )
        if not cuda:
            env["CUDA_VISIBLE_DEVICES"] = ""  # train_gpt.py takes a GPU whenever it sees one
        run([sys.executable, "prepare_data.py", "--synthetic", "--out", str(data)], env)
        summary = run([sys.executable, "train_gpt.py"], env)
    if summary is None:
        raise SystemExit("train_gpt.py printed no summary line")
    device = torch.cuda.get_device_name() if cuda else "cpu"
    result = {"env": "nanogpt", "device": device, "preset": env["NANOGPT_PRESET"], **summary}
    print("smoke " + json.dumps({**result, "wall_s": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
