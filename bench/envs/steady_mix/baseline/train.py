"""The steady_mix stand-in for training: it holds its slot as long as the mix says (mix.py), then
crashes or hands over the knobs it was given. It does no work: only the time it takes matters."""

import json
import os
import sys
import time
from pathlib import Path

import mix
from knobs import a, b, c, d

output = Path(os.environ["HPCX_OUTPUT_DIR"])
fate = mix.plan(output.parent.name, float(os.environ["HPCX_TIME_BUDGET_S"]))
time.sleep(fate.seconds)
if fate.crashes:
    sys.exit(f"crashed after {fate.seconds:.2f}s (the mix's early failure)")
(output / "knobs.json").write_text(json.dumps({"a": a.VALUE, "b": b.VALUE, "c": c.VALUE, "d": d.VALUE}))
print(f"trained for {fate.seconds:.2f}s", flush=True)
