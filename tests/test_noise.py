"""Noise calibration: baseline repeats on distinct seeds, their mean ± std, and the bar ideas must clear."""

from __future__ import annotations

import statistics
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_search
from omegaconf import OmegaConf

from hpc_executor import ledger as ledger_module
from hpc_executor import noise
from hpc_executor.errors import ConfigError

RUN = "outputs/quick-offline-evolution-seed0"
NOISY = ("+env=quick", "+model=offline", "+env.extra_env.QUICK_SEED_NOISE=0.1")


def test_the_bar_is_mean_plus_k_std_and_one_run_keeps_the_old_rule() -> None:
    spread = noise.BaselineNoise(mean=1.0, std=0.1, n=3, k=2.0)
    assert spread.bar == pytest.approx(1.2)
    assert spread.beats(1.21) and not spread.beats(1.19) and not spread.beats(None)
    single = noise.BaselineNoise(mean=1.0, std=0.0, n=1, k=2.0)
    assert single.beats(1.0001) and not single.beats(1.0)


def test_repeats_get_seeds_no_other_run_of_the_baseline_had() -> None:
    cfg = OmegaConf.create({"baseline_repeats": 3, "repeat_every": 2, "k": 2.0})
    seeds = [s for e in range(5) for _, s in noise.repeats_for(cfg, 10, e)]
    assert seeds == [11, 12, 16, 17, 18, 22, 23, 24], "epoch 0: two beside the search's own seed 10"
    assert noise.repeats_for(cfg, 10, 1) == [] and noise.repeats_for(cfg, 10, 3) == []
    with pytest.raises(ConfigError, match="baseline_repeats must be >= 1"):
        noise.check(OmegaConf.create({"baseline_repeats": 0, "repeat_every": 0, "k": 2.0}))


def test_baseline_repeats_are_trials_of_their_own_and_set_the_bar(tmp_path: Path) -> None:
    proc = run_search(*NOISY, "noise.baseline_repeats=3", "noise.repeat_every=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    frames = ledger_module.load(tmp_path / RUN)
    trials = frames["trials"].merge(frames["results"][["trial_id", "status", "reward"]], on="trial_id")
    baseline = trials[trials.idea_id == "baseline"].set_index("trial_id")
    assert set(baseline.index) == {"baseline-t0", "baseline-r1", "baseline-r2", "baseline-e1-r0",
                                   "baseline-e1-r1", "baseline-e1-r2"}  # fmt: skip
    assert baseline.loc[["baseline-r1", "baseline-r2"], "epoch"].eq(0).all()
    assert baseline.loc[["baseline-e1-r0", "baseline-e1-r1", "baseline-e1-r2"], "epoch"].eq(1).all()
    repeats = baseline[baseline.purpose == "baseline_repeat"]
    assert sorted(repeats.seed) == [1, 2, 3, 4, 5] and pd.isna(baseline.loc["baseline-t0", "purpose"])
    assert (baseline.status == "ok").all() and baseline.reward.nunique() > 1, (
        "distinct seeds, distinct rewards"
    )

    mean, std = statistics.fmean(baseline.reward), statistics.stdev(baseline.reward)
    out = proc.stdout + proc.stderr
    assert f"baseline {mean:.4f} ± {std:.4f} over 6 seeds" in out
    assert f"above {mean + 2 * std:.4f} (mean + 2·std)" in out
    ideas = frames["ideas"].merge(
        trials[trials.purpose.isna()][["idea_id", "reward"]], on="idea_id", how="left"
    )
    searched = ideas[ideas.kind != "baseline"]
    assert len(searched) == 6 and len(frames["results"]) == 6 + 6, "repeats do not take idea slots"
    epoch0 = searched[searched.epoch == 0]
    assert epoch0.reward.max() < mean + 2 * std, "this noise leaves no epoch-0 idea above the bar"
    assert epoch0.reward.max() > statistics.fmean(baseline.reward[:3]), "but one above the mean"
    assert "exploit" not in set(searched.kind), (
        "so no exploit call: nothing beat the baseline beyond its noise"
    )
    assert "(within noise)" in out
