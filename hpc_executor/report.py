"""The run report: one self-contained HTML page over a run or a whole sweep.

    python -m hpc_executor.report RUN_OR_SWEEP_DIR [--out report.html]

Figures are matplotlib PNGs embedded as data URIs, so the page opens offline, from any folder, and
can be mailed as one file. It shows: the search curve (best-so-far and mean reward per epoch, with
the baseline's noise band), the execution rate per epoch, how ideas ended, evolution vs best-of-N
(when the sweep has both), self- vs cross-execution per ideator/implementer pair (when it has more
than one pair), idea diversity per epoch, thinking length vs execution rate (when the ledger records
thinking tokens), LLM dollars and GPU-hours per epoch, and the top ideas ranked by their confirmed
reward, each with its diff and log tail. The search writes it for its run at the end.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml
from matplotlib.figure import Figure  # not pyplot: no display, no global state; PNGs come from Agg

from hpc_executor import diversity, gpu_hours, noise
from hpc_executor.analysis import run_dirs
from hpc_executor.errors import HpcExecutorError
from hpc_executor.ledger import Ledger

REPORT_FILE = "report.html"
TOP_IDEAS = 10
LOG_TAIL_LINES = 30


@dataclass
class RunData:
    """What the report needs of one run, read from its ledger once."""

    name: str
    strategy: str
    ideator: str
    implementer: str
    ideas: pd.DataFrame  # one row per idea with its search trial's outcome (ledger.outcomes)
    baseline: noise.BaselineNoise
    llm_calls: pd.DataFrame
    gpu: pd.DataFrame  # gpu_hours.by_epoch
    diffs: dict[str, str] = field(default_factory=dict)
    idea_calls: dict[str, str] = field(default_factory=dict)  # idea -> the ideator call that wrote it


def read_run(run_dir: Path) -> RunData:
    ledger = Ledger(run_dir)
    try:
        cfg = yaml.safe_load(ledger.get_meta("config") or "{}") or {}
        k = float(cfg.get("noise", {}).get("k", 2.0))
        recorded = float(cfg.get("env", {}).get("reward", {}).get("baseline", float("nan")))
        ideas = ledger.outcomes_frame()
        llm_calls = pd.read_sql_query("SELECT * FROM llm_calls", ledger.db)
        diffs = {
            r["idea_id"]: r["diff"] or "" for r in ledger.db.execute("SELECT idea_id, diff FROM patches")
        }
        calls = dict(
            ledger.db.execute("SELECT idea_id, llm_call_id FROM ideas WHERE llm_call_id IS NOT NULL")
        )
        model = cfg.get("model", {})
        return RunData(
            name=run_dir.name,
            strategy=str(cfg.get("strategy", {}).get("name", "?")),
            ideator=str(model.get("ideator", {}).get("model", "?")),
            implementer=str(model.get("implementer", {}).get("model", "?")),
            ideas=ideas,
            baseline=noise.measure(ledger, k, recorded),
            llm_calls=llm_calls,
            gpu=pd.DataFrame(
                gpu_hours.by_epoch(ledger), columns=["epoch", "purpose", "trials", "gpu_hours", "runtime_s"]
            ),
            diffs=diffs,
            idea_calls=calls,
        )
    finally:
        ledger.close()


def searched(run: RunData) -> pd.DataFrame:
    """The run's ideas, the baseline aside."""
    return run.ideas[run.ideas.kind != "baseline"] if len(run.ideas) else run.ideas


def per_epoch(run: RunData) -> pd.DataFrame:
    """Per epoch: ideas, execution rate, best and mean reward, best so far."""
    ideas = searched(run)
    if ideas.empty:
        return pd.DataFrame(columns=["epoch", "ideas", "execution_rate", "best", "mean", "best_so_far"])
    table = ideas.groupby("epoch").agg(
        ideas=("idea_id", "count"),
        execution_rate=("status", lambda s: (s == "ok").mean()),
        best=("reward", "max"),
        mean=("reward", "mean"),
    )
    table["best_so_far"] = table.best.cummax()
    return table.reset_index()


# -- figures ---------------------------------------------------------------------------------------
def _figure_axes(width: float, height: float, columns: int = 1) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height))
    return fig, fig.subplots(1, columns)


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _epochs_axis(ax: Any) -> None:
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)


def fig_search_curve(runs: list[RunData]) -> str:
    fig, ax = _figure_axes(8, 4)
    for run in runs:
        table = per_epoch(run)
        epochs = table.epoch + 1
        (line,) = ax.plot(epochs, table.best_so_far, marker="o", label=f"{run.name}: best so far")
        ax.plot(epochs, table["mean"], ls="--", color=line.get_color(), label=f"{run.name}: mean")
        b = run.baseline
        if b.n and len(table):
            ax.axhspan(b.mean - b.k * b.std, b.mean + b.k * b.std, color=line.get_color(), alpha=0.12)
            ax.axhline(b.mean, color=line.get_color(), lw=0.8, alpha=0.6)
    ax.set_ylabel("reward")
    ax.set_title(f"Search curve (band: baseline mean ± {runs[0].baseline.k:g}·std)")
    _epochs_axis(ax)
    ax.legend(fontsize=7)
    return _png(fig)


def fig_execution_rate(runs: list[RunData]) -> str:
    fig, ax = _figure_axes(8, 3.5)
    for run in runs:
        table = per_epoch(run)
        ax.plot(table.epoch + 1, table.execution_rate * 100, marker="o", label=run.name)
    ax.set_ylabel("executed (%)")
    ax.set_ylim(0, 105)
    ax.set_title("Execution rate per epoch (ideas with a valid result)")
    _epochs_axis(ax)
    ax.legend(fontsize=7)
    return _png(fig)


def fig_outcomes(runs: list[RunData]) -> str | None:
    """None while no run has an idea."""
    if all(searched(run).empty for run in runs):
        return None
    counts = pd.DataFrame(
        {run.name: searched(run).status.fillna("unfinished").value_counts() for run in runs}
    ).fillna(0).T  # fmt: skip
    fig, ax = _figure_axes(8, 0.6 + 0.5 * len(runs))
    counts.plot.barh(stacked=True, ax=ax, colormap="tab10")
    ax.set_xlabel("ideas")
    ax.set_title("How ideas ended")
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)


def fig_strategies(runs: list[RunData]) -> str:
    """Best-so-far per epoch, averaged over the runs of each strategy."""
    fig, ax = _figure_axes(8, 3.5)
    for strategy in sorted({r.strategy for r in runs}):
        curves = pd.concat(
            [
                per_epoch(r).set_index("epoch").best_so_far.rename(r.name)
                for r in runs
                if r.strategy == strategy
            ],
            axis=1,
        )
        mean = curves.mean(axis=1)
        ax.plot(mean.index + 1, mean, marker="o", label=f"{strategy} ({curves.shape[1]} runs)")
        if curves.shape[1] > 1:
            ax.fill_between(mean.index + 1, curves.min(axis=1), curves.max(axis=1), alpha=0.15)
    ax.set_ylabel("best reward so far")
    ax.set_title("Evolutionary search vs best-of-N (mean over runs, band: min-max)")
    _epochs_axis(ax)
    ax.legend(fontsize=7)
    return _png(fig)


def model_pairs(runs: list[RunData]) -> pd.DataFrame:
    rows = []
    for run in runs:
        ideas = searched(run)
        rows.append({"ideator": run.ideator, "implementer": run.implementer, "ideas": len(ideas),
                     "executed": int((ideas.status == "ok").sum())})  # fmt: skip
    table = pd.DataFrame(rows).groupby(["ideator", "implementer"], as_index=False).sum()
    table["execution_rate"] = table.executed / table.ideas.where(table.ideas > 0)
    table["kind"] = [
        "self" if a == b else "cross" for a, b in zip(table.ideator, table.implementer, strict=True)
    ]
    return table


def fig_model_pairs(table: pd.DataFrame) -> str:
    fig, ax = _figure_axes(8, 0.8 + 0.5 * len(table))
    labels = [f"{a} → {b}" for a, b in zip(table.ideator, table.implementer, strict=True)]
    colors = ["tab:green" if k == "self" else "tab:orange" for k in table.kind]
    ax.barh(labels, table.execution_rate * 100, color=colors)
    ax.set_xlabel("execution rate (%)  green: self-execution, orange: cross-execution")
    ax.set_xlim(0, 100)
    ax.set_title("Self- vs cross-execution (ideator → implementer)")
    return _png(fig)


def diversity_table(runs: list[RunData], methods: list[str]) -> pd.DataFrame:
    """Per run, epoch and measure: mean pairwise distance, near-duplicate clusters, distinct ideas."""
    rows = []
    for run in runs:
        ideas = searched(run)
        pairs = [(int(e), diversity.idea_text(t or "", d or ""))
                 for e, t, d in zip(ideas.epoch, ideas.title, ideas.description, strict=True)]  # fmt: skip
        for method in methods:
            rows += [{"run": run.name, **vars(row)} for row in diversity.by_epoch(pairs, method)]
    return pd.DataFrame(rows)


def fig_diversity(table: pd.DataFrame) -> str:
    fig, (left, right) = _figure_axes(10, 3.5, columns=2)
    for (run, method), group in table.groupby(["run", "method"]):
        style = "-" if method == diversity.EMBEDDING else "--"
        left.plot(group.epoch + 1, group.mean_distance, ls=style, marker="o", label=f"{run} ({method})")
        right.plot(
            group.epoch + 1,
            group.distinct / group.ideas * 100,
            ls=style,
            marker="o",
            label=f"{run} ({method})",
        )
    left.set_ylabel("mean pairwise distance")
    right.set_ylabel("distinct ideas (% of the epoch's)")
    right.set_ylim(0, 105)
    for ax in (left, right):
        _epochs_axis(ax)
    left.legend(fontsize=7)
    fig.suptitle("Idea diversity per epoch (near-duplicates: " + ", ".join(
        f"{m} similarity >= {diversity.NEAR_DUPLICATE[m]}" for m in sorted(set(table.method))) + ")")  # fmt: skip
    return _png(fig)


def thinking_table(runs: list[RunData]) -> pd.DataFrame | None:
    """Per idea: the thinking tokens of the ideator call that wrote it, and whether it executed;
    None when no ledger records thinking tokens."""
    rows = []
    for run in runs:
        calls = run.llm_calls
        if "thinking_tokens" not in calls or calls.thinking_tokens.isna().all():
            continue
        tokens = calls.set_index("call_id").thinking_tokens.dropna().to_dict()
        for idea in searched(run).to_dict("records"):
            call = run.idea_calls.get(str(idea["idea_id"]))
            if call in tokens:
                rows.append({"thinking_tokens": float(tokens[call]), "executed": idea["status"] == "ok"})
    return pd.DataFrame(rows) if rows else None


def fig_thinking(table: pd.DataFrame) -> str:
    bins = pd.qcut(table.thinking_tokens, q=min(5, table.thinking_tokens.nunique()), duplicates="drop")
    rate = table.groupby(bins, observed=True).executed.mean() * 100
    fig, ax = _figure_axes(8, 3.5)
    ax.bar([f"{iv.left:.0f}-{iv.right:.0f}" for iv in rate.index], rate.values)
    ax.set_xlabel("thinking tokens of the ideator call")
    ax.set_ylabel("executed (%)")
    ax.set_title("Thinking length vs execution rate")
    return _png(fig)


def fig_spend(runs: list[RunData]) -> str:
    fig, (left, right) = _figure_axes(10, 3.5, columns=2)
    for run in runs:
        calls = run.llm_calls
        cost = calls.groupby("epoch").cost_usd.sum() if len(calls) else pd.Series(dtype=float)
        left.plot(cost.index + 1, cost.values, marker="o", label=run.name)
        gpu = run.gpu.groupby("epoch").gpu_hours.sum() if len(run.gpu) else pd.Series(dtype=float)
        runtime = run.gpu.groupby("epoch").runtime_s.sum() / 3600 if len(run.gpu) else pd.Series(dtype=float)
        right.plot(gpu.index + 1, gpu.values, marker="o", label=f"{run.name}: GPU-hours")
        right.plot(runtime.index + 1, runtime.values, ls="--", label=f"{run.name}: trial hours")
    left.set_ylabel("LLM dollars")
    right.set_ylabel("hours")
    for ax in (left, right):
        _epochs_axis(ax)
        ax.legend(fontsize=7)
    fig.suptitle("LLM dollars and GPU-hours per epoch")
    return _png(fig)


# -- the page ----------------------------------------------------------------------------------------
def top_ideas(runs: list[RunData], n: int = TOP_IDEAS) -> list[dict[str, Any]]:
    """The best ideas of all runs: confirmed ones by their confirmed reward, then the rest by reward."""
    rows = []
    for run in runs:
        ok = searched(run)
        for r in ok[ok.status == "ok"].to_dict("records"):
            rows.append(
                r | {"run": run.name, "diff": run.diffs.get(r["idea_id"], ""), "bar": run.baseline.bar}
            )
    confirmed = [r for r in rows if _present(r.get("confirmed_mean"))]
    rest = [r for r in rows if not _present(r.get("confirmed_mean"))]
    confirmed.sort(key=lambda r: -r["confirmed_mean"])
    rest.sort(key=lambda r: -r["reward"])
    return (confirmed + rest)[:n]


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _figure(title: str, src: str | None, note: str = "") -> str:
    body = (
        f'<img alt="{html.escape(title)}" src="{src}">' if src else f'<p class="na">{html.escape(note)}</p>'
    )
    return f"<section><h2>{html.escape(title)}</h2>{body}</section>"


def _idea_block(rank: int, r: dict[str, Any]) -> str:
    if _present(r.get("confirmed_mean")):
        flag = "confirmed" if r.get("confirmed") else "NOT CONFIRMED"
        confirmed = (f"{r['confirmed_mean']:.4f} ± {r['confirmed_std']:.4f} over {int(r['confirmed_ok'])}/"
                     f"{int(r['confirmed_runs'])} fresh seeds — <b class='{flag.split()[0].lower()}'>{flag}</b>")  # fmt: skip
    elif _present(r.get("confirmed_runs")):
        confirmed = "<b class='not'>NOT CONFIRMED</b>: no confirmation run executed"
    else:
        confirmed = "not run (outside confirm.top_k)"
    log_tail = ""
    if r.get("log_path") and Path(r["log_path"]).is_file():
        log_tail = "\n".join(Path(r["log_path"]).read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])
    return (
        f"<div class='idea'><h3>{rank}. {html.escape(str(r['title']))}</h3>"
        f"<p>run {html.escape(r['run'])}, epoch {int(r['epoch']) + 1}, {html.escape(str(r['kind']))} · "
        f"search reward <b>{r['reward']:.4f}</b> (the bar to beat the baseline: {r['bar']:.4f}) · confirmed: {confirmed}</p>"
        f"<p>{html.escape(str(r.get('description') or ''))}</p>"
        f"<details><summary>diff</summary><pre>{html.escape(r['diff'])}</pre></details>"
        f"<details><summary>log tail</summary><pre>{html.escape(log_tail)}</pre></details></div>"
    )


STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 1em auto; color: #222; }
section { margin: 1.5em 0; } img { max-width: 100%; } .na { color: #777; font-style: italic; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { border: 1px solid #ccc; padding: 2px 6px; }
pre { background: #f6f6f6; padding: 0.5em; overflow-x: auto; font-size: 0.8em; }
.idea { border-top: 1px solid #ddd; } b.confirmed { color: #1a7f37; } b.not { color: #b42318; }
"""


def render(root: Path, similarity: str = "auto") -> str:
    """The report page for a run or a sweep directory. ``similarity``: auto (idea embeddings where
    installed, and token Jaccard) or jaccard (Jaccard only: no model is loaded)."""
    paths = run_dirs(root)
    if not paths:
        raise HpcExecutorError(f"no run under {root} (no ledger.sqlite): pass a run or a sweep directory")
    runs = [read_run(p) for p in paths]
    sections = [
        _figure("Search curve", fig_search_curve(runs)),
        _figure("Execution rate", fig_execution_rate(runs)),
        _figure("Outcomes", fig_outcomes(runs), "no ideas yet"),
    ]
    strategies = {r.strategy for r in runs}
    sections.append(_figure("Evolutionary search vs best-of-N", fig_strategies(runs)) if {"evolution", "best_of_n"} <= strategies
                    else _figure("Evolutionary search vs best-of-N", None, f"not available: the runs use {', '.join(sorted(strategies))} only"))  # fmt: skip
    pairs = model_pairs(runs)
    sections.append(_figure("Self- vs cross-execution", fig_model_pairs(pairs)) if len(pairs) > 1
                    else _figure("Self- vs cross-execution", None, "not available: one ideator/implementer pair "
                                 f"({pairs.ideator.iloc[0]} → {pairs.implementer.iloc[0]})"))  # fmt: skip
    methods = sorted({diversity.JACCARD, diversity.resolve(similarity)})
    note = (
        ""
        if similarity == diversity.JACCARD or diversity.EMBEDDING in methods
        else f" ({diversity.NOT_INSTALLED})"
    )
    div = diversity_table(runs, methods)
    sections.append(_figure("Idea diversity" + note, fig_diversity(div)) if not div.empty
                    else _figure("Idea diversity", None, "no ideas yet"))  # fmt: skip
    thinking = thinking_table(runs)
    sections.append(_figure("Thinking length vs execution rate", fig_thinking(thinking)) if thinking is not None
                    else _figure("Thinking length vs execution rate", None,
                                 "not available: the ledger records no thinking tokens for these runs"))  # fmt: skip
    sections.append(_figure("LLM dollars and GPU-hours", fig_spend(runs)))
    summary = "".join(
        f"<tr><td>{html.escape(r.name)}</td><td>{html.escape(r.strategy)}</td><td>{html.escape(r.ideator)} → "
        f"{html.escape(r.implementer)}</td><td>{len(searched(r))}</td><td>{html.escape(r.baseline.describe())}</td>"
        f"<td>{r.llm_calls.cost_usd.sum() if len(r.llm_calls) else 0.0:.4f}</td><td>{r.gpu.gpu_hours.sum():.3f}</td></tr>"
        for r in runs
    )
    ideas = (
        "".join(_idea_block(i, r) for i, r in enumerate(top_ideas(runs), 1))
        or "<p class='na'>no idea executed yet</p>"
    )
    return (
        f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>hpc-executor report: {html.escape(root.name)}</title>"
        f"<style>{STYLE}</style></head><body><h1>Report: {html.escape(str(root))}</h1>"
        "<table><tr><th>run</th><th>strategy</th><th>ideator → implementer</th><th>ideas</th><th>baseline</th>"
        f"<th>LLM $</th><th>GPU-hours</th></tr>{summary}</table>{''.join(sections)}"
        f"<section><h2>Top ideas (by confirmed reward, then search reward)</h2>{ideas}</section></body></html>"
    )


def write(root: Path, out: Path | None = None, similarity: str = "auto") -> Path:
    """Render the report and write it atomically; returns its path."""
    out = out or Path(root) / REPORT_FILE
    page = render(Path(root), similarity)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(page)
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hpc_executor.report",
                                     description="Write one self-contained HTML report over a run or a sweep.")  # fmt: skip
    parser.add_argument("root", help="a run directory, or a directory of runs (a multirun sweep)")
    parser.add_argument("--out", type=Path, help=f"where to write it (default ROOT/{REPORT_FILE})")
    parser.add_argument("--similarity", choices=("auto", "jaccard"), default="auto",
                        help="idea diversity from embeddings where installed and token Jaccard (auto), or Jaccard only")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        print(write(Path(args.root), args.out, args.similarity))
    except HpcExecutorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
