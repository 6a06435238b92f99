"""Frozen evaluator of the hostile environment: scores the weights, and reads the eval-only data
(which training must not have seen) to show the evaluator still can."""

import json
import os

with open(os.path.join(os.environ["HPCX_OUTPUT_DIR"], "weights.json")) as f:
    x = json.load(f)["x"]
with open(os.path.join(os.environ["HPCX_DATA_DIR"], "val.bin"), "rb") as f:
    val_bytes = len(f.read())
with open(os.environ["HPCX_METRICS_PATH"], "w") as f:
    json.dump({"loss": 0.1 + (x - 1.0) ** 2, "val_bytes": val_bytes}, f)
