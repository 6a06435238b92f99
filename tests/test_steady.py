"""``strategy.schedule=steady`` through the real command line: end to end on the local scheduler and on
the local Slurm cluster, generations counted from completed trials, a driver killed mid-run and run
again (nothing asked, implemented or run twice, nothing lost), and a served model that is stopped as
soon as nothing is left to ask."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from conftest import run_search, search_cmd
from test_model_server import served_search
from test_search import results_count, wait_for
from test_slurm import FAST, slurm

from hpc_executor import ledger as ledger_module
from hpc_executor.crashpoints import CRASH_ENV
from hpc_executor.steady import trial_limits

RUN = "outputs/quick-offline-evolution-seed0"
STEADY = ("+env=quick", "+model=offline", "strategy.schedule=steady")


def check_complete(frames: dict[str, pd.DataFrame]) -> None:
    """Every slot of the run has its one idea, every idea one patch and one trial, every trial one result."""
    ideas, patches, trials, results = frames["ideas"], frames["patches"], frames["trials"], frames["results"]
    assert len(ideas) == 2 * 3 + 1, "epochs x batch_size ideas and the baseline"
    assert sorted(ideas.idea_id) == sorted(["baseline"] + [f"e{e}-{s:03d}" for e in (0, 1) for s in range(3)])
    assert sorted(patches.idea_id) == sorted(ideas.idea_id)
    search = trials[trials.purpose.isna()]
    assert sorted(search.idea_id) == sorted(ideas.idea_id) and set(trials.state) == {"done"}
    assert sorted(results.trial_id) == sorted(trials.trial_id)
    calls = frames["llm_calls"]
    assert calls.call_id.is_unique
    implementer = calls[calls.role == "implementer"]
    assert implementer.idea_id.notna().all() and set(implementer.idea_id) <= set(ideas.idea_id)


@pytest.mark.parametrize("buffer", [0, 3])
def test_steady_runs_end_to_end_and_counts_generations_of_completed_trials(
    tmp_path: Path, buffer: int
) -> None:
    # One trial at a time. Without a buffer each idea is asked for when a slot frees, so the later
    # calls see the first generation completed; with one, ideas run ahead of the results, and a
    # call must still not count ideas whose trial has not completed as a generation.
    settings = ("scheduler.max_parallel=1", f"strategy.ready_buffer={buffer}")
    proc = run_search(*STEADY, *settings, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "steady | ideas 6/6" in out and "Best ideas of" in out and "epoch 1/" not in out
    busy = [int(m) for m in re.findall(r"slots busy (\d+)%", out)]
    assert busy and 0 < busy[-1] <= 100, "the line shows the share of slot time busy so far"
    frames = ledger_module.load(tmp_path / RUN)
    check_complete(frames)
    calls, trials, results = frames["llm_calls"], frames["trials"], frames["results"]
    ended = trials.merge(results, on="trial_id")
    ended = ended[(ended.idea_id != "baseline") & ended.purpose.isna()].ingested_at.sort_values().tolist()
    ideator = calls[calls.role == "ideator"]
    for _, call in ideator.iterrows():
        completed = sum(t < call.created_at for t in ended)  # recorded after its answer: a bound
        if call.purpose in ("exploit", "explore"):
            assert completed >= 3, f"{call.call_id}: a second-generation call before 3 trials completed"
    if buffer == 0:
        assert ideator.purpose.isin(["exploit", "explore"]).any(), (
            "the second generation refines and explores once the first has completed"
        )
    again = run_search(*STEADY, *settings, cwd=tmp_path)
    assert again.returncode == 0
    assert len(ledger_module.load(tmp_path / RUN)["llm_calls"]) == len(calls), (
        "a finished run asks nothing more"
    )


@pytest.mark.parametrize("how", ["sigkill", "after_submit"])
def test_a_steady_driver_killed_mid_run_resumes_without_doing_anything_twice(
    tmp_path: Path, how: str
) -> None:
    run_log = tmp_path / "runs.log"
    args = (*STEADY, "+env.extra_env.QUICK_SLEEP_S=1.5", f"+env.extra_env.QUICK_RUN_LOG={run_log}",
            "sandbox=none")  # the log: outside the workspace  # fmt: skip
    run_dir = tmp_path / RUN
    with open(tmp_path / "killed.log", "w") as out:  # jobs left running inherit it: no pipe
        env = {**os.environ, **({CRASH_ENV: how} if how != "sigkill" else {})}
        driver = subprocess.Popen(
            search_cmd(*args), cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT
        )
        if how == "sigkill":
            wait_for(lambda: results_count(run_dir) >= 2 or driver.poll() is not None)
            assert driver.poll() is None, "the driver should still be running"
            driver.send_signal(signal.SIGKILL)
        assert driver.wait(timeout=300) == -9, (tmp_path / "killed.log").read_text()[-3000:]
    before = ledger_module.load(run_dir, live=True)
    assert len(before["results"]) < 7, "killed before the run ended"

    proc = run_search(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    frames = ledger_module.load(run_dir)
    check_complete(frames)
    # what the killed driver recorded stays as it was: nothing of it is asked, implemented or run again
    for table, key, stamp in (("ideas", "idea_id", "created_at"), ("patches", "idea_id", "created_at"),
                              ("llm_calls", "call_id", "created_at"), ("results", "trial_id", "ingested_at")):  # fmt: skip
        earlier = before[table].set_index(key)[stamp]
        assert frames[table].set_index(key)[stamp].loc[earlier.index].tolist() == earlier.tolist(), table
    runs = Counter(run_log.read_text().split())
    ran = frames["trials"].merge(frames["results"], on="trial_id")
    ran = ran[~ran.status.isin(["implement_failed", "patch_rejected"])]
    assert runs and max(runs.values()) == 1, f"a trial ran twice: {runs}"
    assert len(runs) == (ran.status == "ok").sum(), "every trial that ran to the end logged it, once"
    assert (ran.submissions == 1).all(), ran[["trial_id", "status", "submissions"]].to_string()


def test_on_a_queueing_scheduler_the_ready_buffer_is_submitted_ahead_and_locally_it_is_not() -> None:
    assert trial_limits(8, None, 2) == (8, 10), "Slurm: two trials wait in its queue for a freed GPU"
    assert trial_limits(8, 3, 2) == (3, 3), "local: no more than the machine runs at once"
    assert trial_limits(2, 5, 0) == (2, 2)


def test_an_unknown_schedule_is_rejected_before_any_work(tmp_path: Path) -> None:
    proc = run_search(*STEADY, "strategy.schedule=stedy", cwd=tmp_path)
    assert (
        proc.returncode == 2
        and "strategy.schedule='stedy' is unknown; choose one of barrier, steady" in proc.stderr
    )
    assert not (tmp_path / RUN).exists()


def test_a_served_model_is_stopped_once_nothing_is_left_to_ask(tmp_path: Path) -> None:
    proc = served_search(tmp_path, "strategy.schedule=steady", "+env.extra_env.QUICK_SLEEP_S=2", epochs=2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert out.count("is up at http://") == 1 and out.count("cancelled") == 1, (
        "up once, for both epochs' ideas"
    )
    stopped = out.index("cancelled")
    assert "trials running 0 queued 0 done 3" in out[stopped:], "stopped while the last trial still ran"
    frames = ledger_module.load(tmp_path / "outputs/quick-qwen3_vllm-evolution-seed0")
    assert (frames["results"].status == "ok").sum() == 3


@slurm
def test_steady_runs_on_slurm(tmp_path: Path) -> None:
    proc = run_search(*STEADY, *FAST, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    frames = ledger_module.load(tmp_path / RUN)
    check_complete(frames)
    jobs = frames["trials"].job_id.dropna()
    assert len(jobs) >= 5 and jobs.str.match(r"^\d+(_\d+)?$").all(), (
        "Slurm jobs (an array of one is a plain job)"
    )
