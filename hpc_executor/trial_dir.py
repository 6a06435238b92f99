"""A trial's directory: the one place that names its files.

The driver writes the spec and the diff before the trial's ledger row exists; the job that claims
the trial (``claim``) writes ``started.json`` when it starts and ``result.json``, once and
atomically, when it ends; the logs and the workspace live next to them. Nothing else spells these
names, so the driver, the worker, a re-run and a test agree on them by importing this module.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SPEC_FILE = "spec.json"  # everything the worker needs (TrialSpec)
DIFF_FILE = "patch.diff"  # the implemented diff, applied to a fresh copy of the baseline
STARTED_FILE = "started.json"  # where and when the job started the trial
RESULT_FILE = "result.json"  # the one Result, written atomically at the end
CLAIM_FILE = "claim.json"  # the job that holds the trial (see claim)
TRAIN_LOG = "train.log"
EVAL_LOG = "eval.log"
WORKSPACE_DIR = "workspace"  # the baseline with the diff applied; training runs here
EVALUATOR_DIR = "evaluator"  # a pristine copy of the baseline whose evaluator scores the output
OUTPUT_DIR = "output"  # what training hands to the evaluator
# what a job leaves behind that a new launch of the trial must not find
OUTCOME_FILES = (RESULT_FILE, STARTED_FILE, CLAIM_FILE)


@dataclass
class TrialSpec:
    trial_id: str
    trial_dir: str
    env: dict[str, Any]  # the resolved env config
    seed: int = 0
    keep_workspace: bool = False
    isolate_pids: str = "auto"  # run training in its own PID namespace: auto | on | off
    sandbox: str = "auto"  # auto | bwrap | none, resolved on the node that runs the trial
    provenance: dict[str, Any] = field(default_factory=dict)  # idea, models, config hash ...

    def write(self) -> None:
        write_atomic(Path(self.trial_dir) / SPEC_FILE, json.dumps(asdict(self), indent=2, sort_keys=True))

    @classmethod
    def read(cls, trial_dir: Path) -> TrialSpec:
        return cls(**json.loads((trial_dir / SPEC_FILE).read_text()))


def write_atomic(path: Path, text: str) -> None:
    """Write via a temp file in the same directory and rename: readers see all or nothing."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def copy_baseline(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))


def write_trial(spec: TrialSpec, diff: str) -> None:
    """The trial's directory (diff and spec), written before its ledger row exists; what a crash
    before that row left there (a result, a claim) goes first."""
    tdir = Path(spec.trial_dir)
    tdir.mkdir(parents=True, exist_ok=True)
    clear_outcome(tdir)
    (tdir / DIFF_FILE).write_text(diff)
    spec.write()


def clear_outcome(trial_dir: Path) -> None:
    """Forget what earlier launches of the trial left, so that it can run again from the start."""
    for name in OUTCOME_FILES:
        (trial_dir / name).unlink(missing_ok=True)


def read_diff(trial_dir: Path) -> str:
    path = trial_dir / DIFF_FILE
    return path.read_text() if path.exists() else ""


def started_where(trial_dir: Path) -> dict[str, Any] | None:
    """What the job wrote when it started the trial (host, GPUs, ...), or None before it has."""
    path = trial_dir / STARTED_FILE
    return json.loads(path.read_text()) if path.exists() else None


def write_started(trial_dir: Path, where: dict[str, Any]) -> None:
    write_atomic(trial_dir / STARTED_FILE, json.dumps(where, sort_keys=True))


def forget_start(trial_dir: Path) -> None:
    """The job is queued again (requeued, preempted): it writes its start anew."""
    (trial_dir / STARTED_FILE).unlink(missing_ok=True)


def result_path(trial_dir: Path) -> Path:
    return trial_dir / RESULT_FILE


def has_result(trial_dir: Path) -> bool:
    return (trial_dir / RESULT_FILE).exists()


def train_log(trial_dir: Path) -> Path:
    return trial_dir / TRAIN_LOG
