"""A toy training run: gradient descent on a 1-D quadratic. Fast and pure Python, for the tests."""

import json
import os
import sys
import time

import params

x, velocity = 5.0, 0.0
for _ in range(params.STEPS):
    grad = 2 * (x - 1.0)
    velocity = params.MOMENTUM * velocity - params.LEARNING_RATE * grad
    x += velocity
if os.environ.get("QUICK_SEED_NOISE"):  # the tests' seed-to-seed noise: an offset in [-0.5, 0.5) x amplitude
    seed = int(os.environ["HPCX_SEED"])
    x += float(os.environ["QUICK_SEED_NOISE"]) * ((seed * 2654435761) % 1000 / 1000 - 0.5)
print(f"trained: x={x:.6f}", flush=True)
if os.environ.get("QUICK_PRINT_ENV"):
    print(json.dumps(dict(os.environ)), flush=True)
if os.environ.get("QUICK_RUN_LOG"):  # the tests count how often each trial ran
    with open(os.environ["QUICK_RUN_LOG"], "a") as f:
        f.write(os.environ["HPCX_OUTPUT_DIR"] + "\n")
if os.environ.get("QUICK_SLEEP_S"):
    time.sleep(float(os.environ["QUICK_SLEEP_S"]))
if os.environ.get("QUICK_CHECKPOINT_MB"):  # a checkpoint this large, as trainers write one (tests fill disks)
    checkpoint = os.path.join(os.environ["HPCX_OUTPUT_DIR"], "checkpoint.bin")
    try:
        with open(checkpoint, "wb") as f:
            for _ in range(int(os.environ["QUICK_CHECKPOINT_MB"])):
                f.write(bytes(2**20))
    except OSError:
        os.unlink(checkpoint)  # a partial checkpoint is of no use
        raise
with open(os.path.join(os.environ["HPCX_OUTPUT_DIR"], "weights.json"), "w") as f:
    json.dump({"x": x}, f)
sys.exit(0)
