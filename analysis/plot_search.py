"""Plot the search curve (best reward so far per epoch) of one run or of every run of a sweep.

pip install matplotlib
python analysis/plot_search.py multirun/2026-11-27/10-00-00 --out search.png
"""

from __future__ import annotations

import argparse

from hpc_executor import analysis


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("root", help="a run directory, outputs/ or a multirun sweep directory")
    parser.add_argument("--out", default="search.png")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = analysis.by_epoch(analysis.outcomes(args.root))
    fig, (ax_best, ax_rate) = plt.subplots(1, 2, figsize=(11, 4))
    for run, rows in table.groupby("run"):
        ax_best.plot(rows.epoch + 1, rows.best_so_far, marker="o", label=run)
        ax_rate.plot(rows.epoch + 1, rows.execution_rate * 100, marker="o", label=run)
    ax_best.set(xlabel="epoch", ylabel="best reward so far", title="search curve")
    ax_rate.set(xlabel="epoch", ylabel="execution rate (%)", title="ideas that produced a valid result")
    ax_best.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
