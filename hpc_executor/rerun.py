"""Run one trial of a finished run again, from what the ledger recorded:

    python -m hpc_executor.rerun RUN_DIR TRIAL_ID [--seed N]

The trial's spec and diff are copied into ``RUN_DIR/reruns/<trial_id>-<n>/`` and run here, in the
foreground, by the same worker code; the original trial and the ledger are left untouched.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from hpc_executor.errors import LedgerError
from hpc_executor.ledger import Ledger
from hpc_executor.trial_dir import DIFF_FILE, RESULT_FILE, SPEC_FILE, TrialSpec
from hpc_executor.types import Result
from hpc_executor.worker import run_trial


def rerun(run_dir: Path, trial_id: str, seed: int | None = None) -> Result:
    ledger = Ledger(run_dir)
    row = ledger.db.execute("SELECT trial_dir FROM trials WHERE trial_id = ?", (trial_id,)).fetchone()
    ledger.close()
    if row is None or not (Path(row["trial_dir"]) / SPEC_FILE).exists():
        raise LedgerError(
            f"{trial_id} is not a trial of {run_dir} that ran (see the trials table for its ids)"
        )
    source = Path(row["trial_dir"])
    n = len(list((run_dir / "reruns").glob(f"{trial_id}-*"))) if (run_dir / "reruns").exists() else 0
    target = run_dir / "reruns" / f"{trial_id}-{n + 1}"
    target.mkdir(parents=True)
    shutil.copy(source / DIFF_FILE, target / DIFF_FILE)
    spec = TrialSpec.read(source)
    spec.trial_id, spec.trial_dir = f"{trial_id}-rerun{n + 1}", str(target)
    spec.provenance = spec.provenance | {"rerun_of": trial_id}
    if seed is not None:
        spec.seed = seed
    spec.write()
    run_trial(str(target))
    return Result.from_json((target / RESULT_FILE).read_text())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hpc_executor.rerun", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("trial_id")
    parser.add_argument("--seed", type=int, default=None, help="another seed (default: the original)")
    args = parser.parse_args(argv)
    try:
        result = rerun(args.run_dir, args.trial_id, args.seed)
    except LedgerError as exc:
        raise SystemExit(f"error: {exc}") from None
    summary = {"status": result.status.value, "reward": result.reward, "reason": result.reason,
               "log": result.log_path}  # fmt: skip
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
