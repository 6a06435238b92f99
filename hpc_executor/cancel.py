"""Cancel a run: ``python -m hpc_executor.cancel RUN_DIR``.

Cancels the run's jobs that are still queued or running, records their trials as cancelled, and
marks the run cancelled so that a driver still polling it stops at its next poll. What finished
stays in the ledger; running the search command again later resumes the run with new trials.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import OmegaConf

from hpc_executor.errors import LedgerError
from hpc_executor.ledger import Ledger
from hpc_executor.scheduling import make_scheduler, recorded_config
from hpc_executor.types import Result, Status

CANCELLED_META = "cancelled"


def cancel_run(run_dir: Path, reason: str = "cancelled with hpc_executor.cancel") -> int:
    """Returns how many trials were cancelled."""
    ledger = Ledger(run_dir)
    try:
        config = ledger.get_meta("config")
        if config is None:
            raise LedgerError(f"{run_dir} records no configuration; was it made by hpc_executor.search?")
        scheduler = make_scheduler(recorded_config(OmegaConf.create(config).scheduler), run_dir / "submitit")
        open_trials = ledger.open_trials()
        scheduler.cancel(sorted({t.job_id for t in open_trials if t.job_id}))
        ledger.set_meta(CANCELLED_META, reason)
        ledger.record_results(Result(t.trial_id, Status.CANCELLED, reason=reason) for t in open_trials)
        ledger.publish_snapshot()  # readers elsewhere see the cancellation now, not at the driver's exit
        return len(open_trials)
    finally:
        ledger.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hpc_executor.cancel", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args(argv)
    try:
        n = cancel_run(args.run_dir)
    except LedgerError as exc:
        raise SystemExit(f"error: {exc}") from None
    print(f"cancelled {n} trials of {args.run_dir}")


if __name__ == "__main__":
    main()
