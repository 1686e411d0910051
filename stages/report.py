"""`python -m stages.report`: speedup table and convergence plots from the strategy sweep.

Reads  results/sweep/curves.csv, results/sweep/trials.csv, params.yaml (diffusion.timesteps)
Writes metrics/speedup.json, results/report/speedup.csv, plots/convergence.png, plots/weights.png

The maths lives in pipeline.convergence; this file only reads, plots and writes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the stage runs under dvc/CI without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from msdm.config import ConfigError, load_params  # noqa: E402
from msdm.io import atomic_path, atomic_write_json  # noqa: E402
from pipeline.convergence import (  # noqa: E402
    PAPER_SPEEDUPS,
    SweepResultsError,
    bucket_centres,
    mean_curves,
    paper_comparison,
    read_sweep,
    speedup_frame,
    speedup_table,
    strategy_order,
    weight_columns,
    weight_profiles,
)

BASELINE = "const"


def build_metrics(table: dict, metric: str) -> dict:
    dysigma_ok, dysigma_verdict = paper_comparison(table, "dysigma", PAPER_SPEEDUPS["dysigma"])
    min_snr_ok, min_snr_verdict = paper_comparison(table, "min_snr", PAPER_SPEEDUPS["min_snr"])
    return {
        **table,
        "metric": metric,
        "paper_dysigma_speedup": PAPER_SPEEDUPS["dysigma"],
        "min_snr_paper_speedup": PAPER_SPEEDUPS["min_snr"],
        "dysigma_reproduces_paper": dysigma_ok,
        "dysigma_reproduces_paper_verdict": dysigma_verdict,
        "min_snr_reproduces_paper": min_snr_ok,
        "min_snr_reproduces_paper_verdict": min_snr_verdict,
    }


def strategy_colors(strategies: list[str]) -> dict[str, tuple]:
    palette = plt.get_cmap("tab10").colors
    return {s: palette[i % len(palette)] for i, s in enumerate(strategies)}


def plot_convergence(curves: pd.DataFrame, table: dict, metric: str, path: Path) -> None:
    strategies = strategy_order(curves, table["baseline"])
    colors = strategy_colors(strategies)
    means = mean_curves(curves)
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for strategy in strategies:
        curve = means[means["strategy"] == strategy]
        summary = table["strategies"][strategy]["summary"]
        label = f"{strategy} (baseline)" if strategy == table["baseline"] else f"{strategy}: {summary}"
        ax.plot(curve["step"], curve["fid_mean"], marker="o", ms=3, color=colors[strategy], label=label)
        ax.fill_between(curve["step"], curve["fid_min"], curve["fid_max"], color=colors[strategy], alpha=0.15)
    targets = [t["target_fid"] for t in table["targets"]]
    if len(targets) == 1:
        target_label = f"target = {table['baseline']} final {metric} (seed {table['targets'][0]['seed']}): {targets[0]:.3g}"
    else:
        target_label = (f"target = {table['baseline']} final {metric}, mean of {len(targets)} "
                        f"per-seed targets: {np.mean(targets):.3g}")
    ax.axhline(np.mean(targets), color="black", linestyle="--", linewidth=1, label=target_label)
    ax.set_xscale("log")
    ax.set_xlabel("training step (log scale)")
    ax.set_ylabel(metric)
    n_seeds = curves.groupby("strategy")["seed"].nunique().max()
    ax.set_title(f"{metric} vs step: mean over seeds, band = min-max over seeds (up to {n_seeds})\n"
                 f"speedup vs {table['baseline']} to reach the target")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)


def plot_weights(curves: pd.DataFrame, baseline: str, timesteps: int, path: Path) -> None:
    strategies = strategy_order(curves, baseline)
    colors = strategy_colors(strategies)
    profiles = weight_profiles(curves)
    centres = bucket_centres(len(weight_columns(curves)), timesteps)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=120, sharey=True)
    masked_any = False
    for ax, (phase, title) in zip(axes, (("early", "first eval (early)"), ("late", "last eval (late)"))):
        phase_rows = profiles[profiles["phase"] == phase]
        for strategy in strategies:
            rows = phase_rows[phase_rows["strategy"] == strategy].sort_values("bucket")
            weight = rows["weight"].to_numpy(dtype=float)
            # A log axis cannot show w <= 0 (dysigma is ~0 at low t); such points are left out.
            positive = np.where(weight > 0, weight, np.nan)
            masked_any |= bool(np.any(weight <= 0))
            ax.plot(centres, positive, marker="o", ms=3, color=colors[strategy],
                    label=f"{strategy} (step {rows['steps'].iloc[0]})")
        ax.set_yscale("log")
        ax.set_xlabel(f"t (bucket centres, T = {timesteps})")
        ax.set_title(f"{title}: mean over seeds")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("mean loss weight per t-bucket (log scale)")
    if masked_any:
        fig.text(0.01, 0.01, "weights <= 0 are not drawn on the log axis", fontsize=8)
    fig.suptitle("Effective loss weight vs timestep, early and late in training")
    fig.tight_layout()
    _save_figure(fig, path)


def _save_figure(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--sweep-dir", default="results/sweep", help="holds curves.csv and trials.csv")
    parser.add_argument("--metrics", default="metrics/speedup.json")
    parser.add_argument("--table", default="results/report/speedup.csv", help="tidy per-seed speedups")
    parser.add_argument("--plots-dir", default="plots")
    args = parser.parse_args(argv)

    params = load_params(args.params)
    # All inputs are read and checked before anything is written.
    curves, metric = read_sweep(args.sweep_dir)
    table = speedup_table(curves, baseline=BASELINE)
    metrics = build_metrics(table, metric)

    plots_dir = Path(args.plots_dir)
    plot_convergence(curves, table, metric, plots_dir / "convergence.png")
    plot_weights(curves, BASELINE, params.diffusion.timesteps, plots_dir / "weights.png")
    _write_csv(speedup_frame(table), Path(args.table))
    atomic_write_json(metrics, args.metrics)
    for strategy, entry in table["strategies"].items():
        print(f"{strategy:>16}: {entry['summary']}")
    print(f"dysigma vs paper ({PAPER_SPEEDUPS['dysigma']}x): {metrics['dysigma_reproduces_paper_verdict']}")
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, SweepResultsError, ConfigError) as e:
        sys.exit(f"report: {e}")
