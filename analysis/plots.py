"""The sweep's figures, shared by the `report` stage and notebooks/convergence.ipynb.

Each function returns a matplotlib Figure; the caller saves or shows it.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np
import pandas as pd

from .convergence import (PAPER_SPEEDUPS, bucket_centres, geo_mean_text, interval_text, mean_curves,
                          strategy_order, weight_columns, weight_profiles)


def strategy_colors(strategies: list[str]) -> dict[str, tuple]:
    palette = plt.get_cmap("tab10").colors
    return {s: palette[i % len(palette)] for i, s in enumerate(strategies)}


def step_labels(steps, min_ratio: float = 1.25) -> list[str]:
    """Labels for ticks at `steps` on a log axis: a step is labelled only when it is at least
    `min_ratio` times the last labelled one, so evenly spaced evals do not print over each other
    at the top end (the last step is always labelled, its too-close neighbour not)."""
    labels, last = [], None
    for i, step in enumerate(steps):
        keep = last is None or step >= last * min_ratio
        if keep and i < len(steps) - 1 and steps[-1] < step * min_ratio:  # leave room for the last
            keep = False
        labels.append(f"{step:g}" if keep or i == len(steps) - 1 else "")
        last = step if labels[-1] else last
    return labels


def step_axis(ax, steps) -> None:
    """A log step axis with ticks at the evaluated steps (up to 12 of them), else plain numbers."""
    eval_steps = np.unique(np.asarray(steps))
    eval_steps = eval_steps[eval_steps > 0]  # a log axis has no step 0
    if len(eval_steps) <= 12:
        ax.set_xticks(eval_steps, step_labels(eval_steps))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    else:
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())


def convergence_figure(curves_by_target: dict[str, pd.DataFrame], tables: dict[str, dict], metric: str):
    """One panel per prediction target: mean FID over seeds (log axes), min-max band, the target."""
    targets = list(tables)
    all_strategies = list(dict.fromkeys(s for t in targets for s in tables[t]["strategies"]))
    colors = strategy_colors(all_strategies)
    # 7 inches at least: one panel (the default sweep's single target) still holds the title
    fig, axes = plt.subplots(1, len(targets), figsize=(max(7.0, 5.5 * len(targets)), 5), dpi=120, squeeze=False)
    for ax, target in zip(axes[0], targets):
        table, curves = tables[target], curves_by_target[target]
        means = mean_curves(curves)
        for strategy in strategy_order(curves, table["baseline"]):
            curve = means[means["strategy"] == strategy]
            entry = table["strategies"][strategy]
            label = (f"{strategy} (baseline)" if strategy == table["baseline"]
                     else f"{strategy}: {interval_text(entry)}")
            ax.plot(curve["step"], curve["fid_mean"], marker="o", ms=3, color=colors[strategy], label=label)
            ax.fill_between(curve["step"], curve["fid_min"], curve["fid_max"], color=colors[strategy], alpha=0.15)
        goal = np.mean([t["target_fid"] for t in table["targets"]])
        ax.axhline(goal, color="black", linestyle="--", linewidth=1,
                   label=f"{table['baseline']} final {metric}, mean over seeds: {goal:.3g}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        step_axis(ax, curves["step"])
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("training step (log scale)")
        ax.set_ylabel(f"{metric} (log scale)")
        ax.set_title(f"target {target}: speedup vs {table['baseline']} (geo-mean, 95% CI)", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1, frameon=False)
    n_seeds = max(int(c["seed"].nunique()) for c in curves_by_target.values())
    fig.suptitle(f"{metric} vs training step\nmean over seeds, band = min-max over {n_seeds} seeds", fontsize=11)
    fig.tight_layout()
    return fig


def weights_figure(curves: pd.DataFrame, baseline: str, timesteps: int, target: str):
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
    fig.suptitle(f"Effective loss weight (on the {target} MSE) vs timestep, early and late in training")
    fig.tight_layout()
    return fig


def speedup_figure(tables: dict[str, dict], metric: str):
    """Geometric-mean speedup vs const with its 95% interval, one group of bars per target.

    Censored seeds are not drawn as numbers: a strategy whose mean they censor gets a hatched,
    unfilled bar up to the bound they put on it, labelled 'below ...' or 'at least ...', and its
    interval as a line without a mean; an unbounded interval end reaches the axis edge.
    """
    targets = list(tables)
    strategies = list(dict.fromkeys(s for t in targets for s in tables[t]["strategies"]
                                    if s != tables[t]["baseline"]))
    colors = strategy_colors([tables[targets[0]]["baseline"], *strategies])
    width = 0.8 / max(len(strategies), 1)
    fig, ax = plt.subplots(figsize=(max(7, 2.4 * len(targets) + 3), 5), dpi=120)
    finite = [v for t in targets for e in tables[t]["strategies"].values()
              for v in (e["ci_high"], e["geo_mean"], e.get("geo_mean_low")) if v is not None]
    top = max(finite + list(PAPER_SPEEDUPS.values())) * 1.25
    for ti, target in enumerate(targets):
        for si, strategy in enumerate(strategies):
            entry = tables[target]["strategies"].get(strategy)
            x = ti + (si - (len(strategies) - 1) / 2) * width
            if entry is None:
                continue
            lo = entry["ci_low"] if entry["ci_low"] is not None else 0.0
            hi = entry["ci_high"] if entry["ci_high"] is not None else top
            if entry["geo_mean"] is None:
                bound, low, high = geo_mean_text(entry), entry.get("geo_mean_low"), entry.get("geo_mean_high")
                edge = high if low is None else low if high is None else None
                height = edge if edge is not None else top * 0.02
                ax.bar(x, height, width * 0.9, color="none", edgecolor=colors[strategy], hatch="//",
                       label=strategy if ti == 0 else None)
                ax.text(x, height + top * 0.01, "censored:\n" + bound.replace(" ", "\n", 1) if edge else "no mean",
                        ha="center", va="bottom", fontsize=6, color=colors[strategy])
                if entry["ci_seeds"] >= 2:
                    ax.plot([x, x], [lo, hi], color="black", linewidth=1, marker="_", ms=6)
            else:
                ax.bar(x, entry["geo_mean"], width * 0.9, color=colors[strategy], alpha=0.8,
                       label=strategy if ti == 0 else None)
                ax.errorbar(x, entry["geo_mean"], yerr=[[entry["geo_mean"] - lo], [max(hi - entry["geo_mean"], 0)]],
                            fmt="none", ecolor="black", capsize=3, linewidth=1)
            per_seed = [e["speedup"] for e in entry["per_seed"] if e["speedup"] is not None]
            ax.plot([x] * len(per_seed), per_seed, "k.", ms=4)
    for strategy, claimed in PAPER_SPEEDUPS.items():
        if strategy in strategies and strategy != "dysigma_min_snr":  # one line per published number
            ax.axhline(claimed, linestyle=":", color="gray")
            ax.text(len(targets) - 0.5, claimed, f"claimed: {strategy} {claimed}x", va="bottom", ha="right",
                    fontsize=8, color="gray", bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(targets)), [f"target {t}" for t in targets])
    ax.set_ylim(0, top)
    ax.set_ylabel(f"speedup vs const of the same target\n(steps to reach its final {metric})")
    ax.set_title("Geometric mean over seeds (hatched: censored seeds bound it),\n"
                 "whiskers = bootstrap 95% interval, dots = seeds that reached")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def ablation_figure(curves: dict[str, pd.DataFrame], comparison: dict, target: str, metric: str):
    """The multi-space ablation: one panel per strategy, mean FID over seeds of each latent
    space (log axes, min-max band), with the paired final-FID difference in the title."""
    from .ablation import interval_of

    arms = list(curves)
    strategies = list(comparison[target])
    colors = strategy_colors(arms)
    fig, axes = plt.subplots(1, len(strategies), figsize=(4.6 * len(strategies), 4.6), dpi=120,
                             squeeze=False, sharey=True)
    for ax, strategy in zip(axes[0], strategies):
        for arm in arms:
            frame = curves[arm]
            frame = frame[(frame["target"] == target) & (frame["strategy"] == strategy)]
            means = mean_curves(frame)
            ax.plot(means["step"], means["fid_mean"], marker="o", ms=3, color=colors[arm], label=arm)
            ax.fill_between(means["step"], means["fid_min"], means["fid_max"], color=colors[arm], alpha=0.15)
        row = comparison[target][strategy]
        ax.set_title(f"{strategy}: {arms[0]} − {arms[1]} = {interval_of(row['difference'], '+.1f')}", fontsize=9)
        ax.set_xscale("log")
        ax.set_yscale("log")
        step_axis(ax, pd.concat([c["step"] for c in curves.values()]))
        ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("training step (log scale)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel(f"{metric} (log scale)")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    n_seeds = max(int(c["seed"].nunique()) for c in curves.values())
    fig.suptitle(f"target {target}: {metric} vs step, mean over seeds, band = min-max over {n_seeds} seeds; "
                 f"title: final difference [95% CI]", fontsize=10)
    fig.tight_layout()
    return fig
