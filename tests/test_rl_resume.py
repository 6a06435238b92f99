"""strategy=rl after SIGKILL: the driver kills itself in a window of sampling, execution or the
policy update (tests/fakes/policy.py for the windows inside the policy), then the same command runs
again. Counted from the ledger and the fake's event log: each step's group drawn and recorded once,
each idea implemented once, each trial run once, each update finished once, and the run ends where
an uninterrupted one does, sample for sample."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from conftest import REPO, run_search
from fakes.policy import LOGITS_FILE
from test_at_most_once import killed_at
from test_rl_loop import table

FAKE = "fakes.policy:FakePolicy"
RUN = "outputs/quick-tiny_policy-rl-seed0"
STEPS, GROUP = 2, 3
ARGS = ("+env=quick", "+model=tiny_policy", "strategy=rl", f"model.policy.backend={FAKE}", f"strategy.steps={STEPS}",
        f"strategy.group_size={GROUP}", "strategy.learning_rate=1.0", "sandbox=none", "run_baseline=false",
        "report.enabled=false", f"scheduler.max_parallel={GROUP}")  # fmt: skip
# where the driver dies in step 1: inside sampling, after the group is recorded, after its trials were
# submitted, inside the update (resumed like a kill before it: intended, no version), and after the
# version is written (adopted, not trained again)
WINDOWS = ["fake_mid_sample", "rl_after_sample", "after_submit", "fake_mid_update", "rl_after_update"]
COMPARED = ["step", "sample_index", "policy_step", "text", "reward", "advantage"]


def args_for(work: Path) -> tuple[str, ...]:
    return (*ARGS, f"+env.extra_env.QUICK_RUN_LOG={work / 'runs.log'}")


@pytest.fixture(autouse=True)
def fake_policy_importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(REPO / "tests"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("uninterrupted")
    proc = run_search(*args_for(work), cwd=work, env={"PYTHONPATH": str(REPO / "tests")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work / RUN


def last_logits(run_dir: Path) -> str:
    return (run_dir / "policy" / f"v{STEPS:04d}" / LOGITS_FILE).read_text()


@pytest.mark.parametrize("window", WINDOWS)
def test_a_driver_killed_anywhere_in_a_step_resumes_it_and_does_nothing_twice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, window: str, uninterrupted: Path
) -> None:
    events = tmp_path / "policy-events.log"
    monkeypatch.setenv("FAKE_POLICY_LOG", str(events))
    killed_at(window, args_for(tmp_path), tmp_path)
    proc = run_search(*args_for(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / RUN

    steps = table(run_dir, "SELECT * FROM rl_steps ORDER BY step")
    assert list(steps.step) == list(range(STEPS)) and set(steps.state) == {"updated"}
    samples = table(run_dir, "SELECT * FROM rl_samples ORDER BY step, sample_index")
    assert len(samples) == STEPS * GROUP, "each step's group recorded once"
    reference = table(uninterrupted, "SELECT * FROM rl_samples ORDER BY step, sample_index")
    pd.testing.assert_frame_equal(samples[COMPARED], reference[COMPARED])
    assert list(steps.version_step) == list(range(1, STEPS + 1)), "the fake's draws are never all equal"
    assert last_logits(run_dir) == last_logits(uninterrupted), "each step trained from the right version"

    lines = events.read_text().splitlines()
    draws = sum(line.startswith("sample") for line in lines)
    assert draws == STEPS + (window == "fake_mid_sample"), (
        "a group is drawn again only if it was not recorded"
    )
    done = Counter(line for line in lines if line.endswith("done"))
    assert done and max(done.values()) == 1, f"an update finished twice: {lines}"
    assert len(done) == steps.version_step.max(), "every version was written by one update"

    ideas = table(run_dir, "SELECT idea_id FROM ideas")
    implemented = table(run_dir, "SELECT p.idea_id, count(*) AS n FROM llm_calls l JOIN patches p"
                                 " ON instr(p.llm_call_ids, l.call_id) WHERE l.purpose = 'implement' GROUP BY p.idea_id")  # fmt: skip
    assert sorted(implemented.idea_id) == sorted(ideas.idea_id) and (implemented.n == 1).all()
    trials = table(run_dir, "SELECT t.*, r.status FROM trials t JOIN results r USING (trial_id)")
    assert sorted(trials.idea_id) == sorted(ideas.idea_id)
    ran = trials[trials.status == "ok"]
    runs = Counter((tmp_path / "runs.log").read_text().split())
    assert len(runs) == len(ran) and max(runs.values()) == 1, f"a trial ran twice: {runs}"
    assert (ran.submissions == 1).all()
