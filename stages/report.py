"""`python -m stages.report`: speedup table and convergence plots from the strategy sweep.

Reads  results/sweep/curves.csv, results/sweep/trials.csv (the metric's name, and each trial's
       seconds and end time: the sweep's time on the page), params.yaml (diffusion.timesteps)
Writes metrics/speedup.json (numbers: per target and strategy the geometric-mean speedup and
       its bootstrap 95% interval; per claim and target a verdict code, 1 reproduced,
       0 inconclusive, -1 contradicted at this budget), results/report/speedup.json (the same
       with per-seed values and the verdict sentences), results/report/speedup.csv,
       docs/results.md (the results page) with its figures docs/results/convergence.png (one
       panel per target), docs/results/speedups.png and docs/results/weights.png, and the tidy
       tables dvc.yaml's top-level plots draw (results/report/plots/)

The maths lives in analysis.convergence and the figures in analysis.plots; this file reads and writes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the stage runs under dvc/CI without a display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from msdm.config import ConfigError  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from msdm.io import atomic_path, atomic_write_json  # noqa: E402
from analysis.convergence import (  # noqa: E402
    SweepResultsError,
    interval_text,
    read_sweep,
    speedup_frame,
    speedup_table,
    split_by_target,
)
from analysis.page import results_markdown  # noqa: E402
from analysis.plots import convergence_figure, speedup_figure, weights_figure  # noqa: E402
from analysis.report import (BASELINE, budget_of, build_report, plot_tables, run_description,  # noqa: E402
                             sweep_time)

def _save_figure(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", help="reads diffusion.timesteps")
    parser.add_argument("--sweep-dir", default="results/sweep", help="holds curves.csv and trials.csv")
    parser.add_argument("--metrics", default="metrics/speedup.json", help="numbers only: speedups, intervals, verdicts")
    parser.add_argument("--report", default="results/report/speedup.json", help="the full tables and verdict lines")
    parser.add_argument("--table", default="results/report/speedup.csv", help="tidy per-seed speedups")
    parser.add_argument("--plots-dir", default="docs/results", help="the figures of the results page")
    parser.add_argument("--page", default="docs/results.md", help="the results page")
    parser.add_argument("--plot-data", default="results/report/plots",
                        help="curves.csv, weights.csv, speedups.csv: what dvc.yaml's top-level plots draw")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    # All inputs are read and checked before anything is written.
    curves, metric = read_sweep(args.sweep_dir)
    by_target = split_by_target(curves)
    tables = {t: speedup_table(c, baseline=BASELINE) for t, c in by_target.items()}
    metrics, report = build_report(tables, {t: budget_of(c) for t, c in by_target.items()}, metric)
    report["time"] = sweep_time(Path(args.sweep_dir) / "trials.csv")

    plots_dir = Path(args.plots_dir)
    _save_figure(convergence_figure(by_target, tables, metric), plots_dir / "convergence.png")
    _save_figure(speedup_figure(tables, metric), plots_dir / "speedups.png")
    target = next(iter(by_target))  # x0 when the sweep ran it
    _save_figure(weights_figure(by_target[target], BASELINE, params.diffusion.timesteps, target),
                 plots_dir / "weights.png")
    frames = [speedup_frame(table).assign(target=t) for t, table in tables.items()]
    _write_csv(pd.concat(frames, ignore_index=True), Path(args.table))
    for name, frame in plot_tables(by_target, tables, params.diffusion.timesteps).items():
        _write_csv(frame, Path(args.plot_data) / f"{name}.csv")
    atomic_write_json(report, args.report)
    with atomic_path(Path(args.page)) as tmp:
        Path(tmp).write_text(results_markdown(report, run_description(params)) + "\n")
    atomic_write_json(metrics, args.metrics)
    for target, table in tables.items():
        for strategy, entry in table["strategies"].items():
            print(f"{target:>4} {strategy:>16}: {interval_text(entry)}; {entry['summary']}")
    for claim in report["claims"]:
        print(f"verdict: {claim['text']}")
    return report


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, SweepResultsError, ConfigError) as e:
        sys.exit(f"report: {e}")
