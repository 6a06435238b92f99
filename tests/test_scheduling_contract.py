"""The scheduler contract (tests/scheduling_contract.py) on the local scheduler and on the real
local Slurm cluster, plus what each backend adds: how capacity is bounded, what a dry run shows,
and a config with a key the backend does not have."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import run_search
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from scheduling_contract import SHAPE, SchedulerContract
from test_slurm import make_trials, wait_for

from hpc_executor.config import LocalSchedulerConfig, SlurmSchedulerConfig, register_configs
from hpc_executor.config_checks import CONF_DIR, unknown_key_problem
from hpc_executor.errors import ConfigError
from hpc_executor.scheduling import (
    JobState,
    LocalScheduler,
    Scheduler,
    Shape,
    SlurmScheduler,
    make_scheduler,
    recorded_config,
)
from hpc_executor.trial_dir import RESULT_FILE, STARTED_FILE

register_configs()


class TestLocalScheduler(SchedulerContract):
    array_indices = False

    def new_scheduler(self, folder: Path, **cfg: Any) -> Scheduler:
        # cancel's SIGKILL follows after 2 s, not the default 10: the contract's long job ignores SIGTERM
        return LocalScheduler(OmegaConf.create({"name": "local", "kill_wait_s": 2.0, **cfg}), folder)

    def test_capacity_is_bounded_by_cpus_and_gpus(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        sched = self.new_scheduler(tmp_path)
        cpus = os.cpu_count() or 1
        assert sched.capacity(SHAPE) == cpus
        assert sched.capacity(Shape(gpus=0, cpus=cpus + 1, mem_gb=1, time_limit_s=60)) == 1
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
        gpus2 = Shape(gpus=2, cpus=1, mem_gb=1, time_limit_s=60)
        assert sched.capacity(gpus2) == min(cpus, 2)

    def test_jobs_get_gpus_no_live_job_holds(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
        sched = self.new_scheduler(tmp_path / "submitit")
        first, second, third = make_trials(
            tmp_path, 3, **{"resources.gpus": 2, "extra_env": {"QUICK_SLEEP_S": "6"}}
        )
        shape = Shape(gpus=2, cpus=1, mem_gb=1, time_limit_s=120)
        sched.submit([first], shape)
        started = Path(first) / STARTED_FILE
        wait_for(started.exists, what="the first trial to start")
        sched.submit([second, third], shape)  # the first still holds 0,1; only 2,3 are free
        wait_for(
            lambda: all((Path(d) / RESULT_FILE).exists() for d in (first, second, third)), what="results"
        )
        devices = [
            json.loads((Path(d) / STARTED_FILE).read_text())["cuda_visible_devices"]
            for d in (first, second, third)
        ]
        assert devices == ["0,1", "2,3", "0,1"], "the third found no free GPUs and shares the first two"

    def test_a_job_that_ended_unwatched_without_a_result_is_unknown(self, tmp_path: Path) -> None:
        """Its controller's parent (a driver) died first: nothing saw how the job ended, as after a
        lost node; the driver then runs the trial again. A job that returned still reads COMPLETED."""
        folder = tmp_path / "submitit"
        submit = (
            "import sys; from pathlib import Path; from omegaconf import OmegaConf\n"
            "from hpc_executor.scheduling import LocalScheduler, Shape\n"
            f"s = LocalScheduler(OmegaConf.create({{'name': 'local'}}), Path({str(folder)!r}))\n"
            "shape = Shape(gpus=0, cpus=1, mem_gb=1, time_limit_s=60)\n"
            "print(s.submit_call(sys.exit, (1,), shape, 'x', 't1'), s.submit_call(print, ('hi',), shape, 'y', 't2'))\n"
        )
        proc = subprocess.run(
            [sys.executable, "-c", submit], capture_output=True, text=True, timeout=60, check=True
        )
        exited, printed = proc.stdout.split()
        sched = self.new_scheduler(folder)
        wait_for(lambda: not any(s is JobState.RUNNING for s in sched.states([exited, printed]).values()))
        assert sched.states([exited, printed]) == {exited: JobState.UNKNOWN, printed: JobState.COMPLETED}

    def test_dry_run_says_what_it_would_run(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(os, "cpu_count", lambda: 8)
        text = self.new_scheduler(tmp_path / "submitit").dry_run(
            Shape(gpus=0, cpus=2, mem_gb=4, time_limit_s=600), 6
        )
        assert "6 trials as processes on this machine, at most 4 at a time (8 CPUs / 2 per trial)" in text
        assert "2 CPUs, 0 GPUs, a time limit of 10 min" in text and "submitit.local._local" in text


@pytest.mark.skipif(
    shutil.which("sinfo") is None,
    reason="no Slurm here (sinfo is not on PATH); start the local cluster with `bash slurm/start-local-cluster.sh`",
)
class TestSlurmScheduler(SchedulerContract):
    array_indices = True

    def new_scheduler(self, folder: Path, **cfg: Any) -> Scheduler:
        return SlurmScheduler(OmegaConf.create({"name": "slurm", "job_name": "hpcx-contract", **cfg}), folder)

    def test_slurm_queues_whatever_is_submitted(self, tmp_path: Path) -> None:
        assert self.new_scheduler(tmp_path).capacity(SHAPE) is None

    def test_dry_run_is_the_sbatch_script(self, tmp_path: Path) -> None:
        text = self.new_scheduler(tmp_path / "submitit").dry_run(SHAPE, 6)
        assert text.startswith("#!/bin/bash") and "#SBATCH --array=0-5" in text


@pytest.mark.parametrize(("name", "own_key"), [("local", "kill_wait_s"), ("slurm", "partition")])
def test_a_key_the_backend_lacks_is_an_error_that_lists_its_keys(
    tmp_path: Path, name: str, own_key: str
) -> None:
    with pytest.raises(ConfigError) as error:
        make_scheduler(OmegaConf.create({"name": name, "partitoin": "gpu"}), tmp_path)
    message = str(error.value)
    assert f"scheduler={name} has no key partitoin" in message
    assert "its keys are: name, max_parallel, " in message and own_key in message


def test_a_slurm_key_on_the_local_scheduler_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="scheduler=local has no key partition"):
        make_scheduler(OmegaConf.create({"name": "local", "partition": "gpu"}), tmp_path)


def test_an_unknown_backend_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="choose scheduler=local or scheduler=slurm"):
        make_scheduler(OmegaConf.create({"name": "pbs"}), tmp_path)


def test_a_jobs_log_is_looked_for_in_its_own_folder_only(tmp_path: Path) -> None:
    """Job 12's log is not job 123's (local job ids are pids: any prefix of one is another's)."""
    (tmp_path / "123").mkdir()
    (tmp_path / "123" / "123_0_log.err").write_text("job 123")
    sched = make_scheduler(OmegaConf.create({"name": "local"}), tmp_path)
    assert sched.job_log("12") is None and sched.job_log("123") == tmp_path / "123" / "123_0_log.err"


# -- one schema per backend, through Hydra -------------------------------------------------------
def composed(*overrides: str) -> Any:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("search", overrides=["+env=tiny", "+model=offline", *overrides])


@pytest.mark.parametrize(
    ("choice", "schema", "backend"),
    [("local", LocalSchedulerConfig, LocalScheduler), ("slurm", SlurmSchedulerConfig, SlurmScheduler),
     ("slurm_h100", SlurmSchedulerConfig, SlurmScheduler)],
)  # fmt: skip
def test_each_scheduler_choice_is_typed_by_its_backends_schema(
    tmp_path: Path, choice: str, schema: type, backend: type
) -> None:
    cfg = composed(f"scheduler={choice}")
    assert OmegaConf.get_type(cfg.scheduler) is schema
    assert type(make_scheduler(cfg.scheduler, tmp_path)) is backend


def test_an_unknown_scheduler_key_on_the_command_line_names_the_valid_ones() -> None:
    assert unknown_key_problem(["+env=tiny", "scheduler=slurm", "scheduler.partiton=gpu"]) == (
        "scheduler.partiton is not a key of SlurmSchedulerConfig; its keys are: "
        + ", ".join(f.name for f in dataclasses.fields(SlurmSchedulerConfig))
    )
    problem = unknown_key_problem(["scheduler.partition=gpu"])  # a Slurm key, and scheduler=local
    assert problem is not None and problem.startswith(
        "scheduler.partition is not a key of LocalSchedulerConfig"
    )
    assert unknown_key_problem(["scheduler=slurm", "scheduler.partition=gpu"]) is None


def test_an_unknown_key_in_a_scheduler_profile_stops_the_command_before_any_work(tmp_path: Path) -> None:
    site = tmp_path / "my-conf" / "scheduler"
    site.mkdir(parents=True)
    (site / "mysite.yaml").write_text("defaults:\n  - slurm\n  - _self_\npartiton: gpu\n")
    proc = subprocess.run([sys.executable, "-m", "hpc_executor.search", f"hydra.searchpath=[file://{site.parent}]",
                           "+env=tiny", "+model=offline", "scheduler=mysite", "check_only=true"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "In 'scheduler/mysite': scheduler.partiton is not a key of SlurmSchedulerConfig" in proc.stderr
    assert "its keys are: name, max_parallel," in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs").exists()


# -- the driver's dry run asks the interface -----------------------------------------------------
@pytest.mark.parametrize(("choice", "shows"), [("local", "trials as processes on this machine"),
                                                ("slurm", "#SBATCH --array=0-3")])  # fmt: skip
def test_dry_run_prints_what_the_scheduler_would_do_and_leaves_nothing(
    tmp_path: Path, choice: str, shows: str
) -> None:
    proc = run_search("+env=tiny", "+model=offline", f"scheduler={choice}", "dry_run=true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert shows in proc.stdout
    assert not (tmp_path / "outputs").exists()


def test_a_config_recorded_before_backends_had_their_own_schemas_still_makes_a_scheduler(
    tmp_path: Path,
) -> None:
    # such runs recorded every backend's keys; cancel, confirm, rerun and utilisation read them back
    old = {"name": "local", "max_parallel": 2, "partition": None, "gpus_per_node": 8, "job_name": "hpcx"}
    with pytest.raises(ConfigError, match="has no key gpus_per_node, job_name, partition"):
        make_scheduler(OmegaConf.create(old), tmp_path)
    scheduler = make_scheduler(recorded_config(OmegaConf.create(old)), tmp_path)
    assert isinstance(scheduler, LocalScheduler) and scheduler.cfg.max_parallel == 2
