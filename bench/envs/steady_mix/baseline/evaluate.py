"""Frozen evaluator of steady_mix: the loss is the knobs' squared distance to their targets, plus one."""

import json
import os
from pathlib import Path

TARGETS = {"a": 0.6, "b": 0.3, "c": 0.8, "d": 0.5}

knobs = json.loads((Path(os.environ["HPCX_OUTPUT_DIR"]) / "knobs.json").read_text())
loss = 1.0 + sum((float(knobs[k]) - t) ** 2 for k, t in TARGETS.items())
Path(os.environ["HPCX_METRICS_PATH"]).write_text(json.dumps({"loss": loss}))
