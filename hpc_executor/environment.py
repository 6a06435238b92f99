"""An environment: a baseline codebase, its frozen evaluator, and the reward computed from it.

``Environment`` turns an ``env`` config into resolved paths and the few operations everyone needs:
the baseline's hash (provenance), the files an implementer may see, the workspace policy, readiness
checks, and the reward from a metrics dict.
"""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from hpc_executor.config import EnvConfig
from hpc_executor.errors import ConfigError, PreflightError
from hpc_executor.patching import WorkspacePolicy, path_matches

REPO_ROOT = Path(__file__).resolve().parent.parent
TRANSFORMS = {
    "identity": lambda m: m,
    "reciprocal": lambda m: 1.0 / m,
    "negate": lambda m: -m,
}


@dataclass
class RewardOutcome:
    reward: float | None
    problem: str  # empty when the reward is valid


class Environment:
    def __init__(self, cfg: DictConfig | dict[str, Any]) -> None:
        # typed and completed by the schema, whether it comes from Hydra or from a spec.json
        self.cfg = OmegaConf.merge(OmegaConf.structured(EnvConfig), cfg)
        self.name: str = self.cfg.name
        self.dir = self._resolve(self.cfg.dir, REPO_ROOT)
        self.baseline_dir = self.dir / self.cfg.baseline
        self.data_dir = self._resolve(self.cfg.data_dir, self.dir)
        if self.cfg.reward.transform not in TRANSFORMS:
            raise ConfigError(
                f"env.reward.transform={self.cfg.reward.transform!r} is not one of {sorted(TRANSFORMS)}"
            )
        if self.cfg.reward.direction != "maximize":
            raise ConfigError(
                f"env.reward.direction={self.cfg.reward.direction!r}: rewards are always maximised; to minimise "
                "a metric use env.reward.transform=negate or reciprocal"
            )
        if self.cfg.hard_limit_s < self.cfg.budget_s:
            raise ConfigError(
                f"env.hard_limit_s ({self.cfg.hard_limit_s}) is below env.budget_s ({self.cfg.budget_s}): "
                "every trial would be killed before its budget ends; raise hard_limit_s."
            )
        if self.cfg.save_margin_s is not None and self.cfg.save_margin_s < 0:
            raise ConfigError(
                f"env.save_margin_s ({self.cfg.save_margin_s}) is negative: it is the time training gets after "
                "env.budget_s to save its model; use 0 or more, or null to kill only at env.hard_limit_s."
            )

    @property
    def train_limit_s(self) -> float:
        """When the worker kills training: the budget plus the margin for saving, never past the hard limit."""
        margin = self.cfg.save_margin_s
        if margin is None:
            return float(self.cfg.hard_limit_s)
        return float(min(self.cfg.hard_limit_s, self.cfg.budget_s + margin))

    @staticmethod
    def _resolve(path: str, base: Path) -> Path:
        p = Path(os.path.expanduser(str(path)))
        return p if p.is_absolute() else (base / p).resolve()

    # -- the codebase ------------------------------------------------------------------------
    @property
    def policy(self) -> WorkspacePolicy:
        return WorkspacePolicy(editable=tuple(self.cfg.editable), protected=tuple(self.cfg.protected))

    def baseline_files(self) -> list[str]:
        """Every regular file of the baseline, as sorted posix paths relative to it."""
        files = []
        for path in sorted(self.baseline_dir.rglob("*")):
            rel = path.relative_to(self.baseline_dir).as_posix()
            if path.is_file() and "__pycache__" not in rel:
                files.append(rel)
        return files

    def baseline_hash(self) -> str:
        """sha256 over the baseline's paths and bytes: the provenance of every trial."""
        digest = hashlib.sha256()
        for rel in self.baseline_files():
            digest.update(rel.encode() + b"\0" + (self.baseline_dir / rel).read_bytes() + b"\0")
        return digest.hexdigest()[:16]

    def eval_only_paths(self) -> list[Path]:
        """The files (globs expanded) that training must not see: ``eval_only`` under data_dir."""
        found = {p for pattern in self.cfg.eval_only for p in self.data_dir.glob(pattern)}
        return sorted(found)

    def checked_eval_data(self) -> list[str]:
        """What the evaluator reads and is hashed: ``eval_data``, then eval-only files not in it."""
        extra = [p.relative_to(self.data_dir).as_posix() for p in self.eval_only_paths()]
        return [*self.cfg.eval_data, *(rel for rel in extra if rel not in self.cfg.eval_data)]

    def eval_data_hash(self) -> str:
        """sha256 over the evaluation data (``checked_eval_data``), "" when none is declared."""
        checked = self.checked_eval_data()
        if not checked:
            return ""
        digest = hashlib.sha256()
        for rel in checked:
            digest.update(rel.encode() + b"\0")
            with (self.data_dir / rel).open("rb") as f:
                while chunk := f.read(1 << 20):
                    digest.update(chunk)
        return digest.hexdigest()[:16]

    def implementer_files(self) -> list[str]:
        hidden = list(self.cfg.hidden_from_implementer)
        return [f for f in self.baseline_files() if not path_matches(f, hidden)]

    def catalog_path(self) -> Path | None:
        return self.dir / self.cfg.catalog if self.cfg.catalog else None

    # -- commands ----------------------------------------------------------------------------
    def command(self, argv: list[str], python: str | None = None) -> list[str]:
        res = self.cfg.resources
        values = {"python": python or sys.executable, "gpus": str(res.gpus), "cpus": str(res.cpus)}
        try:
            return [str(arg).format(**values) for arg in argv]
        except (KeyError, IndexError) as exc:
            raise ConfigError(
                f"env {self.name}: unknown placeholder {exc} in {list(argv)}; use {{python}}, {{gpus}}, {{cpus}}"
            ) from exc

    def trial_env(self, seed: int) -> dict[str, str]:
        """Protocol variables for the run and eval commands (output/metrics paths are the worker's)."""
        env = {
            "HPCX_DATA_DIR": str(self.data_dir),
            "HPCX_TIME_BUDGET_S": str(self.cfg.budget_s),
            "HPCX_SEED": str(seed),
            "HPCX_CPUS": str(self.cfg.resources.cpus),
            "HPCX_GPUS": str(self.cfg.resources.gpus),
            # one thread per requested CPU, so two trials on one machine do not fight
            "OMP_NUM_THREADS": str(self.cfg.resources.cpus),
        }
        env.update({k: str(v) for k, v in self.cfg.extra_env.items()})
        return env

    # -- readiness ---------------------------------------------------------------------------
    def missing_data(self) -> list[str]:
        return [r for r in self.cfg.requires if not (self.data_dir / r).exists()]

    def problems(self) -> list[str]:
        """What stops this environment from running, each as an instruction."""
        problems = []
        if not self.baseline_dir.is_dir():
            problems.append(
                f"env {self.name}: baseline directory {self.baseline_dir} does not exist (env.dir)"
            )
            return problems
        missing = self.missing_data()
        if missing and not self.cfg.auto_prepare:
            how = (
                f"build it with: cd {self.baseline_dir} && HPCX_DATA_DIR={self.data_dir} "
                + " ".join(self.command(self.cfg.prepare_command))
                if self.cfg.prepare_command
                else "put the files there, or point env.data_dir at them"
            )
            problems.append(f"env {self.name}: data missing in {self.data_dir}: {', '.join(missing)}; {how}")
        return problems

    def prepare(self) -> None:
        """Run the data-prep command when data is missing and the environment allows it. A file lock
        keeps drivers of a sweep that start together from writing the same files at once."""
        if not self.missing_data() or not (self.cfg.auto_prepare and self.cfg.prepare_command):
            return
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{self.data_dir}.lock"):
            if not self.missing_data():  # another driver prepared it while we waited
                return
            self.data_dir.mkdir(parents=True, exist_ok=True)
            proc = subprocess.run(
                self.command(self.cfg.prepare_command),
                cwd=self.baseline_dir,
                env={**os.environ, **self.trial_env(seed=0)},
                capture_output=True,
                text=True,
            )
        if proc.returncode != 0 or self.missing_data():
            raise PreflightError(
                f"env {self.name}: preparing data in {self.data_dir} failed (exit {proc.returncode}):\n"
                f"{proc.stderr[-2000:]}"
            )

    # -- reward ------------------------------------------------------------------------------
    def reward(self, metrics: dict[str, Any]) -> RewardOutcome:
        r = self.cfg.reward
        if metrics.get("invalid_reason"):  # the frozen evaluator caught something (e.g. a causality leak)
            return RewardOutcome(None, f"evaluator: {metrics['invalid_reason']}")
        value = metrics.get(r.metric)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return RewardOutcome(None, f"evaluator wrote no numeric {r.metric!r} (got {value!r})")
        if not math.isfinite(value):
            return RewardOutcome(None, f"{r.metric} is {value}")
        if r.metric_min is not None and value < r.metric_min:
            return RewardOutcome(None, f"{r.metric}={value:.4g} is below {r.metric_min} (treated as a hack)")
        if r.metric_max is not None and value > r.metric_max:
            return RewardOutcome(None, f"{r.metric}={value:.4g} is above {r.metric_max}")
        try:
            reward = float(TRANSFORMS[r.transform](float(value)))
        except ZeroDivisionError:
            return RewardOutcome(None, f"{r.metric} is 0, reciprocal undefined")
        return RewardOutcome(reward, "")
