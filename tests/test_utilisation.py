"""GPU-slot utilisation from hand-built intervals: overlaps, more trials than slots, trials still
running, empty runs; and from a run's ledger, with the slot count from its config."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from hpc_executor import analysis
from hpc_executor.errors import ConfigError
from hpc_executor.ledger import Ledger
from hpc_executor.types import Result, Status
from hpc_executor.utilisation import from_intervals, slots_of, utilisation


def test_two_slots_one_idle_half_the_time() -> None:
    u = from_intervals([(0.0, 10.0), (0.0, 5.0), (5.0, 10.0)], slots=2)
    assert (u.first_start, u.window_end, u.wall_s) == (0.0, 10.0, 10.0)
    assert u.busy_slot_s == 20.0 and u.idle_slot_s == 0.0 and u.busy_share == 1.0
    u = from_intervals([(0.0, 10.0), (2.0, 7.0)], slots=2)
    assert u.busy_slot_s == 15.0 and u.idle_slot_s == 5.0 and u.busy_share == 0.75
    assert u.trials_completed == 2 and u.completed_per_hour == pytest.approx(2 / (10 / 3600))


def test_the_window_starts_at_the_first_start_not_at_zero() -> None:
    u = from_intervals([(100.0, 110.0), (105.0, 120.0)], slots=4)
    assert u.wall_s == 20.0 and u.busy_slot_s == 25.0
    assert u.busy_share == pytest.approx(25 / 80) and u.idle_share == pytest.approx(55 / 80)


def test_more_trials_at_once_than_slots_count_as_full_not_more() -> None:
    u = from_intervals([(0.0, 10.0), (0.0, 10.0), (0.0, 10.0)], slots=2)
    assert u.busy_slot_s == 20.0 and u.busy_share == 1.0 and u.idle_slot_s == 0.0
    u = from_intervals([(0.0, 4.0), (2.0, 6.0), (3.0, 8.0)], slots=2)  # three overlap over [3, 4]
    assert u.busy_slot_s == pytest.approx(1 * 2 + 2 * 4 + 1 * 2)  # [0,2]: 1, [2,6]: 2 (3 capped), [6,8]: 1


def test_touching_intervals_leave_no_gap_and_an_end_before_its_start_counts_nothing() -> None:
    u = from_intervals([(0.0, 5.0), (5.0, 10.0), (6.0, 3.0)], slots=1)
    assert u.busy_slot_s == 10.0 and u.busy_share == 1.0 and u.trials_started == 3


def test_a_still_running_trial_counts_until_now_or_until_asked() -> None:
    u = from_intervals([(0.0, 4.0), (1.0, None)], slots=2, until=11.0)
    assert u.running == 1 and u.trials_completed == 1 and u.window_end == 11.0
    assert u.busy_slot_s == 4.0 + 10.0
    live = from_intervals([(0.0, 1.0), (1_000.0, None)], slots=1)  # no until: the window ends now
    assert live.running == 1 and live.window_end is not None and live.window_end > 1_000_000_000
    u = from_intervals([(0.0, 4.0), (2.0, 8.0), (9.0, None)], slots=2, until=6.0)
    assert (u.trials_started, u.trials_completed, u.running) == (2, 1, 1), "what started after until is out"
    assert u.busy_slot_s == 4.0 + 4.0


def test_a_finished_run_waiting_for_its_next_ideas_is_idle_until_asked() -> None:
    u = from_intervals([(0.0, 10.0)], slots=1, until=20.0)
    assert u.busy_share == 0.5 and u.idle_slot_s == 10.0


def test_an_empty_run_has_no_window_and_no_shares() -> None:
    u = from_intervals([], slots=8)
    assert u.trials_started == 0 and u.wall_s == 0.0 and u.busy_slot_s == 0.0 and u.idle_slot_s == 0.0
    assert math.isnan(u.busy_share) and math.isnan(u.completed_per_hour)


def test_slots_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="at least one slot"):
        from_intervals([(0.0, 1.0)], slots=0)


def config(scheduler: dict, gpus: int = 1, cpus: int = 1) -> dict:
    return {"scheduler": {"max_parallel": 0, "gpus_per_node": 8, "max_array_parallel": 0} | scheduler,  # as runs recorded before each backend had its schema
            "env": {"resources": {"gpus": gpus, "cpus": cpus, "mem_gb": 1}}}  # fmt: skip


def test_slots_from_the_runs_config(monkeypatch: pytest.MonkeyPatch) -> None:
    assert slots_of(config({"name": "slurm", "max_parallel": 5})) == 5
    assert slots_of(config({"name": "slurm"})) == 8, "one node's GPUs"
    assert slots_of(config({"name": "slurm"}, gpus=8)) == 1
    assert slots_of(config({"name": "slurm", "max_array_parallel": 3})) == 3
    assert slots_of(config({"name": "slurm", "max_array_parallel": 3}, gpus=0)) == 3
    monkeypatch.setattr("os.cpu_count", lambda: 6)
    assert slots_of(config({"name": "local"}, gpus=0, cpus=2)) == 3, "what the local scheduler allows"
    with pytest.raises(ConfigError, match="pass slots="):
        slots_of(config({"name": "slurm"}, gpus=0))


def run_with_trials(run_dir: Path, spans: list[tuple[float, float | None]], max_parallel: int = 2) -> None:
    ledger = Ledger(run_dir, create=True)
    ledger.set_meta("config", yaml.safe_dump(config({"name": "local", "max_parallel": max_parallel})))
    for i, (start, end) in enumerate(spans):
        ledger.add_trial(f"t{i}", f"i{i}", 0, str(run_dir / f"t{i}"))
        if end is None:
            ledger.set_trial_state(f"t{i}", "running", started_at=start)
        else:
            provenance = {"started_at": start, "ended_at": end}
            ledger.record_results([Result(f"t{i}", Status.OK, reward=1.0, provenance=provenance)])
    ledger.add_trial("never-ran", "x", 0, str(run_dir / "x"))
    ledger.record_results([Result("never-ran", Status.IMPLEMENT_FAILED)])
    ledger.publish_snapshot()
    ledger.close()


def test_utilisation_of_a_run_reads_its_ledger_and_its_slots(tmp_path: Path) -> None:
    run_with_trials(tmp_path / "run", [(0.0, 10.0), (2.0, 7.0)])
    u = utilisation(tmp_path / "run")
    assert u.slots == 2 and u.busy_share == 0.75 and u.trials_started == 2, (
        "the never-ran trial holds nothing"
    )
    assert utilisation(tmp_path / "run", slots=4).busy_share == pytest.approx(15 / 40)


def test_slot_utilisation_has_a_row_per_run_of_a_sweep(tmp_path: Path) -> None:
    run_with_trials(tmp_path / "sweep" / "0-barrier", [(0.0, 10.0), (2.0, 7.0)])
    run_with_trials(tmp_path / "sweep" / "1-live", [(0.0, 10.0), (5.0, None)], max_parallel=1)
    table = analysis.slot_utilisation(tmp_path / "sweep").set_index("run")
    assert list(table.index) == ["0-barrier", "1-live"]
    assert table.loc["0-barrier", "busy_share"] == 0.75 and table.loc["0-barrier", "idle_slot_s"] == 5.0
    assert table.loc["1-live", "running"] == 1 and table.loc["1-live", "busy_share"] == 1.0
    assert analysis.slot_utilisation(tmp_path / "nothing-here").empty


def test_a_run_without_a_recorded_config_needs_slots(tmp_path: Path) -> None:
    Ledger(tmp_path, create=True).close()
    with pytest.raises(ConfigError, match="pass slots="):
        utilisation(tmp_path)
    assert utilisation(tmp_path, slots=1).trials_started == 0
