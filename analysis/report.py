"""The report's numbers: per target, speedup tables -> metrics (numbers only) and a report
(everything, with one verdict sentence per claim and target), plus what the page names as its source."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pandas as pd

from .convergence import CLAIM_NAMES, PAPER_SPEEDUPS, VERDICT_CODES, claim_verdict, interval_text

BASELINE = "const"
# Per strategy and target: the geometric mean over seeds (None when a seed is censored), the
# bounds censored seeds put on it (equal to it when none is), and the bootstrap interval's ends
# (None where unbounded).
SPEEDUP_NUMBERS = ("geo_mean", "geo_mean_low", "geo_mean_high", "ci_low", "ci_high")


def budget_of(curves: pd.DataFrame) -> dict:
    return {"steps": int(curves["step"].max()), "seeds": int(curves["seed"].nunique()),
            "evals": int(curves.groupby(["strategy", "seed"])["step"].nunique().max())}


def build_report(tables: dict[str, dict], budgets: dict[str, dict], metric: str) -> tuple[dict, dict]:
    """(metrics: numbers only, for `dvc metrics`/`dvc exp show`; report: everything, with sentences)."""
    metrics = {"metric": metric, "speedup": {}, "verdict": {}}
    report = {"metric": metric, "baseline": BASELINE, "budgets": budgets, "tables": tables, "claims": []}
    for target, table in tables.items():
        metrics["speedup"][target] = {
            strategy: {**{k: e[k] for k in SPEEDUP_NUMBERS}, "seeds_reached": e["reached"], "seeds": e["n_seeds"]}
            for strategy, e in table["strategies"].items() if strategy != table["baseline"]}
    for strategy, claimed in PAPER_SPEEDUPS.items():
        for target, table in tables.items():
            entry = table["strategies"].get(strategy)
            verdict = claim_verdict(entry, claimed)
            if verdict is None:
                continue
            metrics["verdict"].setdefault(strategy, {})[target] = VERDICT_CODES[verdict]
            b = budgets[target]
            report["claims"].append({
                "strategy": strategy, "claim": CLAIM_NAMES[strategy], "claimed": claimed, "target": target,
                "verdict": verdict, "code": VERDICT_CODES[verdict], "budget": b,
                "text": (f"{CLAIM_NAMES[strategy]} {claimed}x vs const, target {target}: {verdict} "
                         f"at {b['steps']} steps x {b['seeds']} seeds; measured {interval_text(entry)}"
                         f" ({entry['summary']})")})
    return metrics, report


def sweep_time(trials_path: str | Path) -> dict | None:
    """How long the sweep's trials ran, from trials.csv (None without it): `trials`,
    `run_seconds` (their Train runs' wall times added up) and `wall_seconds`, from the first
    trial's start to the last one's end (None where the trials predate `finished_at`)."""
    try:
        trials = pd.read_csv(trials_path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        return None
    if trials.empty or "seconds" not in trials.columns:
        return None
    seconds = pd.to_numeric(trials["seconds"], errors="coerce")
    wall = None
    if "finished_at" in trials.columns:
        ends = pd.to_datetime(trials["finished_at"], utc=True, errors="coerce")
        starts = ends - pd.to_timedelta(seconds, unit="s")
        if ends.notna().all() and starts.notna().all():
            wall = round((ends.max() - starts.min()).total_seconds(), 1)
    return {"trials": int(len(trials)), "run_seconds": round(float(seconds.sum()), 1), "wall_seconds": wall}


def run_description(params) -> dict:
    """What the results page names as its source: commit, machine, and the settings it ran."""
    import os
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    model = "unknown CPU"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    isa = "+".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags) or "no AVX2"
    ev = params.eval
    return {"commit": commit, "machine": f"{model}, {os.cpu_count()} cores ({isa})",
            "sweep": dataclasses.asdict(params.sweep), "batch_size": params.train.batch_size,
            "lr": params.train.lr, "sampler": f"{ev.sampler} {ev.sampling_steps} steps ({ev.spacing} grid"
                                              f"{', x0 clamp' if ev.clip_x0 else ''})"}


def plot_tables(curves_by_target: dict[str, pd.DataFrame], tables: dict[str, dict], timesteps: int) -> dict:
    """Tidy tables for DVC's plots (dvc.yaml's top-level `plots:`), one row per point:

    - curves: target, strategy, step, fid_mean (over seeds), fid_min, fid_max, n_seeds;
    - weights: target, strategy, t, weight (mean over seeds at each run's last eval);
    - speedups: label (target/strategy), target, strategy, geo_mean, geo_mean_low, geo_mean_high,
      ci_low, ci_high (empty where censored seeds leave no number), seeds_reached, seeds.
    """
    from .convergence import bucket_centres, mean_curves, weight_columns, weight_profiles

    curves, weights, speedups = [], [], []
    for target, frame in curves_by_target.items():
        curves.append(mean_curves(frame).assign(target=target))
        late = weight_profiles(frame)
        late = late[late["phase"] == "late"]
        centres = bucket_centres(len(weight_columns(frame)), timesteps)
        weights.append(pd.DataFrame({"target": target, "strategy": late["strategy"],
                                     "t": centres[late["bucket"].to_numpy()], "weight": late["weight"]}))
        table = tables[target]
        for strategy, e in table["strategies"].items():
            if strategy != table["baseline"]:
                speedups.append({"label": f"{target}/{strategy}", "target": target, "strategy": strategy,
                                 **{k: e[k] for k in SPEEDUP_NUMBERS},
                                 "seeds_reached": e["reached"], "seeds": e["n_seeds"]})
    curve_columns = ["target", "strategy", "step", "fid_mean", "fid_min", "fid_max", "n_seeds"]
    return {"curves": pd.concat(curves, ignore_index=True)[curve_columns],
            "weights": pd.concat(weights, ignore_index=True),
            "speedups": pd.DataFrame(speedups, columns=["label", "target", "strategy", *SPEEDUP_NUMBERS,
                                                        "seeds_reached", "seeds"])}
