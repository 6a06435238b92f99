"""What a person sees: one line whenever an epoch's counts change, and the end-of-run table."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from hpc_executor import confirm
from hpc_executor.budget import CostMeter, usd
from hpc_executor.noise import BaselineNoise

log = logging.getLogger("hpc_executor.search")
OFFLINE_NOTE = "offline stand-in (not an LLM; tokens are chars/4)"
USAGE_COLUMNS = ("role", "purpose", "model", "calls", "failed", "tokens in", "cache write", "cache read",
                 "tokens out", "cost", "saved by cache")  # fmt: skip
USAGE_TOTALS = ("calls", "failed", "input_tokens", "cache_write_tokens", "cache_read_tokens", "output_tokens",
                "cost_usd", "cache_saved_usd")  # fmt: skip


class Progress:
    def __init__(self, epochs: int, baseline: float, console: Console | None = None) -> None:
        self.epochs = epochs
        self.baseline = baseline
        # the table is the run's answer: stdout, wide enough for paths when piped to a file
        self.console = console or Console(highlight=False, width=None if sys.stdout.isatty() else 160)
        self._last = ""
        self.baseline_noise: BaselineNoise | None = None  # the baseline's spread over seeds, when measured

    def epoch_line(self, epoch: int, ideas: int, implemented: int, trials: dict[str, int],
                   best: float | None) -> None:  # fmt: skip
        queued = trials.get("pending", 0) + trials.get("queued", 0)
        best_text = f"{best:.4f}" if best is not None else "-"
        line = (
            f"epoch {epoch + 1}/{self.epochs} | ideas {ideas} | implemented {implemented} | trials "
            f"queued {queued} running {trials.get('running', 0)} done {trials.get('done', 0)} | "
            f"best reward {best_text} (baseline {self.baseline:.4f})"
        )
        self._log_changed(line)

    def steady_line(self, ideas: int, total: int, in_flight: int, ready: int, trials: dict[str, int],
                    best: float | None, busy_share: float) -> None:  # fmt: skip
        """The progress of a steady run: ideas recorded of all, ideas still being asked for or
        implemented, patches waiting for a slot, the trials, and the share of slot time busy since
        the first trial started (NaN before)."""
        queued = trials.get("pending", 0) + trials.get("queued", 0)
        best_text = f"{best:.4f}" if best is not None else "-"
        self._log_changed(
            f"steady | ideas {ideas}/{total} | ideas in flight {in_flight} | ready patches {ready} | trials "
            f"running {trials.get('running', 0)} queued {queued} done {trials.get('done', 0)} | slots busy "
            f"{'-' if math.isnan(busy_share) else f'{busy_share:.0%}'} | best reward {best_text} "
            f"(baseline {self.baseline:.4f})"
        )

    def _log_changed(self, line: str) -> None:
        if line != self._last:
            self._last = line
            log.info(line)

    def note(self, text: str) -> None:
        log.info(text)

    def final_table(self, rows: list[dict[str, Any]], run_dir: Path, top: int = 10) -> Table:
        """Best ideas first, then a summary of how the others ended."""
        ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: -r["reward"])
        noise = self.baseline_noise
        caption = noise.describe() if noise else f"baseline reward {self.baseline:.4f}"
        table = Table(title=f"Best ideas of {_short(run_dir)}", caption=caption)
        # the confirmation column only where a confirmation ran
        confirmed = any(r.get("confirmed_runs") is not None for r in rows)
        for col in ("rank", "reward", "vs baseline", "epoch", "GPU-h",
                    *(["confirmed (fresh seeds)"] if confirmed else []), "idea", "trial dir (patch.diff, train.log)"):  # fmt: skip
            table.add_column(col, overflow="fold")
        for rank, r in enumerate(ok[:top], 1):
            where = _short(Path(r["trial_dir"])) if r["trial_dir"] else ""
            delta = (r["reward"] - self.baseline) / abs(self.baseline) * 100 if self.baseline else 0.0
            within = (
                " (within noise)"
                if noise is not None and noise.n > 1 and not noise.beats(r["reward"])
                else ""
            )
            table.add_row(str(rank), f"{r['reward']:.4f}", f"{delta:+.1f}%{within}", str(r["epoch"] + 1),
                          f"{r.get('gpu_hours') or 0.0:.3f}", *([confirm.describe(r)] if confirmed else []),
                          r["title"], where)  # fmt: skip
        self.console.print(table)
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["status"] or "unfinished"] = counts.get(r["status"] or "unfinished", 0) + 1
        ideas = [r for r in rows if r["kind"] != "baseline"]
        executed = sum(1 for r in ideas if r["status"] == "ok")
        rate = executed / len(ideas) * 100 if ideas else 0.0
        self.console.print(
            "outcomes: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
            + f" | execution rate {rate:.0f}% | ledger: {_short(run_dir / 'ledger.sqlite')}"
        )  # fmt: skip
        return table

    def gpu_table(self, by_epoch: list[dict[str, Any]], budget: str) -> Table:
        """GPU-hours and trial runtime per epoch and kind of trial, and the run's total."""
        table = Table(title="GPU-hours", caption=budget)
        for col in ("epoch", "trials of", "trials", "runtime h", "GPU-hours"):
            table.add_column(col, justify="left" if col in ("epoch", "trials of") else "right")
        for row in by_epoch:
            table.add_row(str(row["epoch"] + 1), row["purpose"], str(row["trials"]),
                          f"{row['runtime_s'] / 3600:.3f}", f"{row['gpu_hours']:.3f}")  # fmt: skip
        table.add_section()
        table.add_row("all", "", str(sum(r["trials"] for r in by_epoch)),
                      f"{sum(r['runtime_s'] for r in by_epoch) / 3600:.3f}",
                      f"{sum(r['gpu_hours'] for r in by_epoch):.3f}")  # fmt: skip
        self.console.print(table)
        return table

    def usage_table(self, usage: list[dict[str, Any]], meter: CostMeter) -> Table:
        """LLM calls, tokens and dollars per role, purpose and model (tokens out include thinking; tokens in
        include what the prompt cache wrote and served, whose share of them "cache read" shows)."""
        table = Table(title="LLM usage", caption=meter.describe())
        for col in USAGE_COLUMNS:
            table.add_column(col, justify="left" if col in ("role", "purpose", "model") else "right")
        totals = dict.fromkeys(USAGE_TOTALS, 0)
        for row in usage:
            for key in totals:
                totals[key] += row[key]
            model = OFFLINE_NOTE if (row["model"] or "").startswith("offline:") else row["model"]
            table.add_row(row["role"], row["purpose"], model, *_usage_cells(row))
        table.add_section()
        table.add_row("all", "", "", *_usage_cells(totals))
        self.console.print(table)
        return table


def _usage_cells(row: dict[str, Any]) -> list[str]:
    tokens_in, read = row["input_tokens"], row["cache_read_tokens"]
    share = f" ({read / tokens_in:.0%})" if tokens_in else ""
    return [str(row["calls"]), str(row["failed"]), f"{tokens_in:,}", f"{row['cache_write_tokens']:,}",
            f"{read:,}{share}", f"{row['output_tokens']:,}", usd(row["cost_usd"]),
            usd(row["cache_saved_usd"])]  # fmt: skip


def _short(path: Path) -> str:
    """Relative to the working directory when below it: tables stay readable."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)
