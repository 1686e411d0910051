"""Convergence speedup of loss-weight strategies against `const` (docs/method.md).

For each seed:
  target          = const's FID at its last evaluation;
  steps_s(target) = the first step at which strategy s's curve reaches fid <= target,
                    linearly interpolated in log(step) between the last eval above the
                    target and the first at or below it;
  speedup_s       = steps_const(target) / steps_s(target).

steps_const(target) uses the same first-reach rule as every other strategy. For a
curve that keeps improving this is const's last step; if const's curve dipped below
its own final FID earlier (noise, a late regression), its first reach is earlier than
its last step, and the baseline is that earlier step. One rule for all strategies keeps
a strategy with the very same curve as const at exactly 1.0x.

Across seeds: the mean, sample std (ddof=1), min and max of the speedups of the seeds
that reached their target, and (`speedup_interval`) the geometric mean with a bootstrap 95%
interval in log-speedup space, where censored seeds enter as bounds, not numbers. The
geometric mean itself is a number only when no seed is censored; otherwise it is reported as
the bound the censored seeds put on it ("below 0.93x"). A strategy that never reaches the
target gets the text "not reached", never a number. `claim_verdict`
turns an interval into reproduced / contradicted at this budget / inconclusive.

Two cases the formula alone would report as ordinary numbers:
  - the baseline did not improve after its first eval (its first reach of its own final
    FID is its first eval): there is no convergence to compare, so every strategy's result
    for that seed is "inconclusive", never a number;
  - a strategy is already at or below the target at its first eval: the crossing happened
    at some unmeasured earlier step, so the speedup is only a lower bound ("reached by the
    first eval"), and summaries print it with ">=".

Pure pandas/numpy; no Ray, no torch: the notebook imports this module directly.
"""
from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

CURVE_KEY_COLUMNS = ("strategy", "seed", "step", "fid")
SWEEP_COLUMNS = ("strategy", "target", "seed", "step", "fid")  # the sweep's curves.csv
WEIGHT_COLUMN = re.compile(r"^w_t(\d+)$")
DEFAULT_METRIC = "fid"
SWEEP_FIX = "Run the sweep first: dvc repro sweep"

# Published speedups vs Const, kept next to our numbers: MSDM's Dy-Sigma and Hang et al.
# 2023's Min-SNR-5. The Dy-Sigma claim is tested on both readings of the method.
PAPER_SPEEDUPS = {"dysigma": 3.7, "dysigma_min_snr": 3.7, "min_snr": 3.4}
CLAIM_NAMES = {"dysigma": "MSDM Dy-Sigma, the authors' code",
               "dysigma_min_snr": "MSDM Dy-Sigma, the paper's wording",
               "min_snr": "Min-SNR-5 (Hang et al. 2023)"}

STATUS_REACHED = "reached"
STATUS_NOT_REACHED = "not reached"
STATUS_NO_CURVE = "no curve"
STATUS_FIRST_EVAL = "reached by the first eval"  # the speedup is a lower bound
STATUS_INCONCLUSIVE = "inconclusive"  # the baseline did not improve after its first eval


class SweepResultsError(ValueError):
    """A sweep results file exists but does not have the expected content."""


# ---------------------------------------------------------------------------------------
# Steps to target and speedup
# ---------------------------------------------------------------------------------------

def steps_to_target(steps: Sequence[float], fids: Sequence[float], target: float) -> float | None:
    """First step at which the curve reaches fid <= target; None if it never does.

    Between the last eval above the target and the first at or below it, the crossing is
    found by linear interpolation of fid against log(step). If the first eval is already
    at or below the target, that first step is returned (nothing earlier was measured).
    """
    steps_arr = np.asarray(steps, dtype=float)
    fids_arr = np.asarray(fids, dtype=float)
    if steps_arr.ndim != 1 or fids_arr.ndim != 1 or len(steps_arr) != len(fids_arr):
        raise ValueError(
            f"steps and fids must be 1-D and of equal length, got shapes "
            f"{steps_arr.shape} and {fids_arr.shape}"
        )
    if len(steps_arr) == 0:
        raise ValueError("steps_to_target: the curve has no evaluations")
    if not np.all(np.isfinite(steps_arr)) or np.any(steps_arr <= 0):
        raise ValueError(f"steps must be finite and positive (log-step interpolation), got {steps_arr.tolist()}")
    if np.any(np.diff(steps_arr) <= 0):
        raise ValueError(f"steps must be strictly increasing, got {steps_arr.tolist()}")
    if not np.all(np.isfinite(fids_arr)):
        raise ValueError(f"fids must be finite, got {fids_arr.tolist()}")
    if not math.isfinite(float(target)):
        raise ValueError(f"target must be finite, got {target!r}")

    reached = np.flatnonzero(fids_arr <= target)
    if len(reached) == 0:
        return None
    i = int(reached[0])
    # An exact hit returns the eval step itself, not exp(log(step)), so ties are exact.
    if i == 0 or fids_arr[i] == target:
        return float(steps_arr[i])
    above, below = fids_arr[i - 1], fids_arr[i]  # above > target > below, so no zero division
    fraction = (above - target) / (above - below)
    log_step = math.log(steps_arr[i - 1]) + fraction * (math.log(steps_arr[i]) - math.log(steps_arr[i - 1]))
    return math.exp(log_step)


def _curve(group: pd.DataFrame, strategy: str, seed) -> tuple[np.ndarray, np.ndarray]:
    """(steps, fids) of one run, sorted by step; non-finite FIDs dropped with a warning."""
    group = group.sort_values("step")
    if group["step"].duplicated().any():
        dup = sorted(group.loc[group["step"].duplicated(), "step"].tolist())
        raise SweepResultsError(f"strategy {strategy!r} seed {seed}: duplicate eval steps {dup}")
    finite = np.isfinite(group["fid"].to_numpy(dtype=float))
    if not finite.all():
        # A failed or diverged eval carries no FID; the curve is judged on the evals it has.
        warnings.warn(
            f"strategy {strategy!r} seed {seed}: ignoring non-finite FID at steps "
            f"{group.loc[~finite, 'step'].tolist()}",
            stacklevel=2,
        )
        group = group[finite]
    return group["step"].to_numpy(dtype=float), group["fid"].to_numpy(dtype=float)


def _check_curve_columns(curves: pd.DataFrame) -> None:
    missing = [c for c in CURVE_KEY_COLUMNS if c not in curves.columns]
    if missing:
        raise SweepResultsError(
            f"curves: missing column(s) {missing}; expected at least {list(CURVE_KEY_COLUMNS)}"
        )


def strategy_order(curves: pd.DataFrame, baseline: str = "const") -> list[str]:
    """Strategies in order of first appearance, with the baseline first."""
    seen = list(dict.fromkeys(curves["strategy"].tolist()))
    return ([baseline] if baseline in seen else []) + [s for s in seen if s != baseline]


def summarize_speedups(speedups: Sequence[float | None], *, lower_bounds: int = 0, inconclusive: int = 0) -> dict:
    """Mean and spread over the reached seeds (None = not reached), plus a text summary.

    `lower_bounds`: how many of the speedups are only lower bounds (the summary then reads
    ">="); `inconclusive`: how many of the None entries are seeds whose baseline did not
    improve (they count neither as reached nor as not reached).
    """
    reached = [float(s) for s in speedups if s is not None]
    n_seeds, n_reached = len(speedups), len(reached)
    stats = {
        "reached": n_reached,
        "n_seeds": n_seeds,
        "inconclusive": inconclusive,
        "lower_bounds": lower_bounds,
        "all_reached": n_seeds > 0 and n_reached == n_seeds,
        "mean": None, "std": None, "min": None, "max": None,
    }
    notes = [f"{n_reached}/{n_seeds} seeds"]
    if lower_bounds:
        notes.append(f"{lower_bounds} a lower bound")
    if inconclusive:
        notes.append(f"{inconclusive} inconclusive: the baseline did not improve")
    seeds_text = f"({'; '.join(notes)})"
    if n_reached == 0:
        head = STATUS_INCONCLUSIVE if inconclusive == n_seeds and n_seeds else STATUS_NOT_REACHED
        stats["summary"] = f"{head} {seeds_text}"
        return stats
    values = np.asarray(reached)
    stats.update(mean=float(values.mean()), min=float(values.min()), max=float(values.max()))
    bound = ">= " if lower_bounds else ""
    if n_reached >= 2:
        stats["std"] = float(values.std(ddof=1))
        stats["summary"] = f"{bound}{stats['mean']:.2f}x ± {stats['std']:.2f} {seeds_text}"
    else:  # one seed has no spread to report
        stats["summary"] = f"{bound}{stats['mean']:.2f}x {seeds_text}"
    return stats


def speedup_table(curves: pd.DataFrame, baseline: str = "const") -> dict:
    """Per-seed targets and per-strategy speedups against `baseline` (see module docstring).

    Returns {"baseline", "targets": [{seed, target_fid, baseline_steps}],
    "strategies": {name: {"per_seed": [{seed, steps_to_target, speedup, status}],
    "reached", "n_seeds", "all_reached", "mean", "std", "min", "max", "summary"}}}.
    The seeds are the baseline's; a strategy without a curve for one of them counts that
    seed as not reached ("no curve"). A seed that has curves but no baseline curve is an error.
    """
    _check_curve_columns(curves)
    if baseline not in set(curves["strategy"]):
        raise SweepResultsError(
            f"curves: no rows for the baseline strategy {baseline!r}; found strategies "
            f"{sorted(set(curves['strategy']))}. Add it to sweep.strategies and rerun: dvc repro sweep"
        )
    runs = {(s, seed): _curve(g, s, seed) for (s, seed), g in curves.groupby(["strategy", "seed"], sort=False)}
    baseline_seeds = sorted(seed for (s, seed) in runs if s == baseline)
    orphans = sorted({(s, seed) for (s, seed) in runs if seed not in baseline_seeds})
    if orphans:
        raise SweepResultsError(
            f"curves: seed(s) {sorted({seed for _, seed in orphans})} have no {baseline!r} curve "
            f"(runs {orphans}), so they have no target. Rerun the {baseline!r} trials of those "
            f"seeds, or drop the seeds: dvc repro sweep"
        )

    targets, baseline_steps, baseline_improved = {}, {}, {}
    for seed in baseline_seeds:
        steps, fids = runs[(baseline, seed)]
        if len(steps) == 0:
            raise SweepResultsError(f"curves: {baseline!r} seed {seed} has no finite FID, so no target")
        targets[seed] = float(fids[-1])
        # Never None: the last eval reaches its own FID.
        baseline_steps[seed] = steps_to_target(steps, fids, targets[seed])
        baseline_improved[seed] = bool(baseline_steps[seed] > steps[0])

    table = {
        "baseline": baseline,
        "targets": [
            {"seed": _py(seed), "target_fid": targets[seed], "baseline_steps": baseline_steps[seed],
             "baseline_improved": baseline_improved[seed]}
            for seed in baseline_seeds
        ],
        "strategies": {},
    }
    for strategy in strategy_order(curves, baseline):
        per_seed = []
        for seed in baseline_seeds:
            entry = {"seed": _py(seed), "steps_to_target": None, "speedup": None, "status": STATUS_NO_CURVE}
            if (strategy, seed) in runs:
                steps, fids = runs[(strategy, seed)]
                reach = steps_to_target(steps, fids, targets[seed]) if len(steps) else None
                entry["status"] = STATUS_NOT_REACHED if reach is None else STATUS_REACHED
                if reach is None and len(steps):
                    # not reached by its last eval: steps_to_target > last step, so the
                    # speedup is below baseline_steps / last step (a censored value)
                    entry["speedup_upper_bound"] = baseline_steps[seed] / float(steps[-1])
                if reach is not None:
                    entry["steps_to_target"] = reach
                    entry["speedup"] = baseline_steps[seed] / reach
                    if reach == steps[0]:
                        entry["status"] = STATUS_FIRST_EVAL
            if not baseline_improved[seed]:
                entry["status"], entry["speedup"] = STATUS_INCONCLUSIVE, None
            per_seed.append(entry)
        table["strategies"][strategy] = {
            "per_seed": per_seed,
            **speedup_interval(per_seed),
            **summarize_speedups([e["speedup"] for e in per_seed],
                                 lower_bounds=sum(e["status"] == STATUS_FIRST_EVAL for e in per_seed),
                                 inconclusive=sum(e["status"] == STATUS_INCONCLUSIVE for e in per_seed)),
        }
    return table


def speedup_interval(per_seed: Sequence[dict], *, level: float = 0.95, resamples: int = 10_000,
                     rng_seed: int = 0) -> dict:
    """Geometric-mean speedup over seeds and a bootstrap interval for it, in log-speedup space.

    Seeds are resampled with replacement; each resample's mean log-speedup is one draw, and the
    interval is the (1-level)/2 and (1+level)/2 percentiles of the draws. Censored seeds are not
    numbers: a lower bound ("reached by the first eval", true >= v) enters the low end at v and
    makes the high end unbounded; "not reached" (true < baseline_steps / last step) enters the
    high end at that bound and makes the low end unbounded. Inconclusive seeds and seeds
    without a curve are left out. Unbounded ends are None.

    `geo_mean` is None as soon as one usable seed is censored; `geo_mean_low`/`geo_mean_high`
    are the bounds on it (the mean of the seeds' low and high ends), equal to it otherwise.
    """
    bounds: list[tuple[float, float]] = []  # (low, high) log-speedup of each usable seed
    exact = []
    for e in per_seed:
        if e["status"] == STATUS_REACHED:
            exact.append(math.log(e["speedup"]))
            bounds.append((exact[-1], exact[-1]))
        elif e["status"] == STATUS_FIRST_EVAL:
            bounds.append((math.log(e["speedup"]), math.inf))
        elif e["status"] == STATUS_NOT_REACHED and e.get("speedup_upper_bound"):
            bounds.append((-math.inf, math.log(e["speedup_upper_bound"])))
    low, high = [b[0] for b in bounds], [b[1] for b in bounds]
    # The geometric mean over the usable seeds is a number only when none is censored; otherwise
    # the censored seeds bound it (a mean over seeds of their low and high ends), and dropping
    # them would report the reached seeds' mean as the strategy's.
    censored = len(exact) < len(bounds)
    out = {"geo_mean": float(math.exp(np.mean(exact))) if exact and not censored else None,
           "geo_mean_low": _exp_or_none(np.mean(low)) if bounds else None,
           "geo_mean_high": _exp_or_none(np.mean(high)) if bounds else None,
           "ci_low": None, "ci_high": None, "ci_level": level, "ci_seeds": len(low)}
    if len(low) < 2:  # one seed has no spread to resample
        return out
    idx = np.random.default_rng(rng_seed).integers(0, len(low), size=(resamples, len(low)))
    alpha = (1 - level) / 2
    # low holds no +inf and high no -inf, so each mean is finite or infinite of one sign; the
    # inverted-CDF percentile picks a draw instead of interpolating (inf - inf would be NaN)
    lo = float(np.quantile(np.asarray(low)[idx].mean(axis=1), alpha, method="inverted_cdf"))
    hi = float(np.quantile(np.asarray(high)[idx].mean(axis=1), 1 - alpha, method="inverted_cdf"))
    out["ci_low"], out["ci_high"] = _exp_or_none(lo), _exp_or_none(hi)
    return out


def _exp_or_none(log_value: float) -> float | None:
    """A speedup from a log-speedup; None for an unbounded end (+-inf)."""
    return float(math.exp(log_value)) if math.isfinite(log_value) else None


VERDICT_REPRODUCED = "reproduced"
VERDICT_CONTRADICTED = "contradicted at this budget"
VERDICT_INCONCLUSIVE = "inconclusive"
VERDICT_CODES = {VERDICT_REPRODUCED: 1, VERDICT_INCONCLUSIVE: 0, VERDICT_CONTRADICTED: -1}


def claim_verdict(entry: dict | None, claimed: float) -> str | None:
    """The rule of docs/method.md, on one strategy's entry of `speedup_table`:

    - reproduced: the interval contains the claim or lies above it (a bounded interval, or an
      unbounded one whose low end is already at or above the claim);
    - contradicted at this budget: the interval lies below the claim;
    - inconclusive: otherwise, and always when a seed did not reach the target, a seed was
      inconclusive, or fewer than two seeds give an interval.
    None when the strategy was not run.
    """
    if entry is None:
        return None
    statuses = [e["status"] for e in entry["per_seed"]]
    if any(s in (STATUS_NOT_REACHED, STATUS_NO_CURVE, STATUS_INCONCLUSIVE) for s in statuses):
        return VERDICT_INCONCLUSIVE
    lo, hi = entry["ci_low"], entry["ci_high"]
    if lo is None:
        return VERDICT_INCONCLUSIVE
    if hi is None:  # a lower-bound seed: only a low end at or above the claim settles it
        return VERDICT_REPRODUCED if lo >= claimed else VERDICT_INCONCLUSIVE
    return VERDICT_REPRODUCED if hi >= claimed else VERDICT_CONTRADICTED


def geo_mean_text(entry: dict, unit: str = "x") -> str:
    """The geometric mean, or what the censored seeds say of it: 'below 0.93x' when seeds did
    not reach (upper bounds), 'at least 8.00x' when seeds reached by the first eval (lower
    bounds), '–' when neither end is bounded or no seed is usable."""
    if entry["geo_mean"] is not None:
        return f"{entry['geo_mean']:.2f}{unit}"
    low, high = entry.get("geo_mean_low"), entry.get("geo_mean_high")
    if high is not None and low is None:
        return f"below {high:.2f}{unit}"
    if low is not None and high is None:
        return f"at least {low:.2f}{unit}"
    return "–"


def ci_text(entry: dict) -> str:
    """'[1.21, 2.73]', with unbounded ends shown as 0 or inf (the speedup of a log-speedup of -+inf)."""
    lo = "0" if entry["ci_low"] is None else f"{entry['ci_low']:.2f}"
    hi = "inf" if entry["ci_high"] is None else f"{entry['ci_high']:.2f}"
    return f"[{lo}, {hi}]"


def interval_text(entry: dict) -> str:
    """'1.84x [1.21, 2.73] 95% CI over 3 seeds'; with censored seeds 'no mean (censored seeds:
    below 0.93x) [0, 1.02] 95% CI over 3 seeds'."""
    mean = geo_mean_text(entry)
    if entry["geo_mean"] is None:
        mean = "no mean (censored seeds)" if mean == "–" else f"no mean (censored seeds: {mean})"
    if entry["ci_seeds"] < 2:
        return f"{mean} (no interval: {entry['ci_seeds']} usable seed(s))"
    return f"{mean} {ci_text(entry)} {entry['ci_level']:.0%} CI over {entry['ci_seeds']} seeds"


def split_by_target(curves: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """{prediction target: its curves, without the target column}, x0 first (the authors' recipe)."""
    if "target" not in curves.columns:
        raise SweepResultsError(f"curves: no 'target' column; expected {list(SWEEP_COLUMNS)}. {SWEEP_FIX}")
    groups = {str(t): g.drop(columns="target") for t, g in curves.groupby("target", sort=True)}
    return dict(sorted(groups.items(), key=lambda kv: (kv[0] != "x0", kv[0])))


def speedup_frame(table: dict) -> pd.DataFrame:
    """The table as tidy rows: strategy, seed, target_fid, baseline_steps, steps_to_target,
    speedup (NaN unless reached), status."""
    targets = {t["seed"]: t for t in table["targets"]}
    rows = [
        {
            "strategy": strategy,
            "seed": e["seed"],
            "target_fid": targets[e["seed"]]["target_fid"],
            "baseline_steps": targets[e["seed"]]["baseline_steps"],
            "steps_to_target": e["steps_to_target"],
            "speedup": e["speedup"],
            "status": e["status"],
        }
        for strategy, entry in table["strategies"].items()
        for e in entry["per_seed"]
    ]
    columns = ["strategy", "seed", "target_fid", "baseline_steps", "steps_to_target", "speedup", "status"]
    return pd.DataFrame(rows, columns=columns)


def _py(value):
    """numpy scalar -> Python scalar, so the table serialises to JSON as is."""
    return value.item() if isinstance(value, np.generic) else value


# ---------------------------------------------------------------------------------------
# Reading the sweep's output and shaping it for plots
# ---------------------------------------------------------------------------------------

def weight_columns(curves: pd.DataFrame) -> list[str]:
    """The w_t0..w_t{B-1} columns in bucket order; they must be contiguous from 0."""
    found = sorted((int(m.group(1)), c) for c in curves.columns if (m := WEIGHT_COLUMN.match(c)))
    indices = [i for i, _ in found]
    if not found or indices != list(range(len(found))):
        raise SweepResultsError(
            f"curves: expected weight columns w_t0 .. w_t{{B-1}} (mean loss weight per t-bucket), "
            f"found {[c for _, c in found] or 'none'}"
        )
    return [c for _, c in found]


def bucket_centres(num_buckets: int, timesteps: int) -> np.ndarray:
    """Centre t of each of `num_buckets` equal-width buckets over [0, timesteps)."""
    if num_buckets < 1 or timesteps < 1:
        raise ValueError(f"need num_buckets >= 1 and timesteps >= 1, got {num_buckets}, {timesteps}")
    width = timesteps / num_buckets
    return (np.arange(num_buckets) + 0.5) * width


def read_sweep(results_dir: str | Path) -> tuple[pd.DataFrame, str]:
    """Load `curves.csv` (validated) and the FID metric's name from `trials.csv`.

    The metric name falls back to "fid" when trials.csv or its 'metric' column is absent.
    """
    results_dir = Path(results_dir)
    curves_path = results_dir / "curves.csv"
    if not curves_path.is_file():
        raise FileNotFoundError(f"{curves_path}: not found. {SWEEP_FIX}")
    try:
        curves = pd.read_csv(curves_path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise SweepResultsError(f"{curves_path}: not a readable CSV ({e}). {SWEEP_FIX}") from None
    try:
        _check_curve_columns(curves)
        if "target" not in curves.columns:
            raise SweepResultsError(f"missing column(s) ['target']; expected at least {list(SWEEP_COLUMNS)}")
        weight_columns(curves)
    except SweepResultsError as e:
        raise SweepResultsError(f"{curves_path}: {e}. {SWEEP_FIX}") from None
    if curves.empty:
        raise SweepResultsError(f"{curves_path}: has no rows. {SWEEP_FIX}")
    for column in ("step", "fid"):
        if not pd.api.types.is_numeric_dtype(curves[column]):
            raise SweepResultsError(f"{curves_path}: column {column!r} is not numeric. {SWEEP_FIX}")
    curves["strategy"] = curves["strategy"].astype(str)
    curves["target"] = curves["target"].astype(str)
    return curves, read_metric_name(results_dir / "trials.csv")


def read_metric_name(trials_path: str | Path) -> str:
    trials_path = Path(trials_path)
    if not trials_path.is_file():
        return DEFAULT_METRIC
    try:
        trials = pd.read_csv(trials_path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise SweepResultsError(f"{trials_path}: not a readable CSV ({e}). {SWEEP_FIX}") from None
    if "metric" not in trials.columns:
        return DEFAULT_METRIC
    names = sorted(set(trials["metric"].dropna().astype(str)))
    if len(names) > 1:
        # Curves measured with different extractors are not comparable.
        raise SweepResultsError(f"{trials_path}: trials use different metrics {names}; expected one. {SWEEP_FIX}")
    return names[0] if names else DEFAULT_METRIC


def mean_curves(curves: pd.DataFrame) -> pd.DataFrame:
    """Per (strategy, step): mean, min and max FID over seeds, and how many seeds were evaluated."""
    finite = curves[np.isfinite(curves["fid"].to_numpy(dtype=float))]
    grouped = finite.groupby(["strategy", "step"], sort=True)["fid"]
    return grouped.agg(fid_mean="mean", fid_min="min", fid_max="max", n_seeds="count").reset_index()


def weight_profiles(curves: pd.DataFrame) -> pd.DataFrame:
    """Mean-over-seeds weight per t-bucket at each run's first ('early') and last ('late') eval.

    Columns: strategy, phase, bucket, weight, steps (the eval step(s) averaged, as text).
    """
    columns = weight_columns(curves)
    rows = []
    for strategy, group in curves.groupby("strategy", sort=False):
        by_seed = group.sort_values("step").groupby("seed")
        for phase, picked in (("early", by_seed.head(1)), ("late", by_seed.tail(1))):
            steps = "/".join(str(_py(s)) for s in sorted(set(picked["step"])))
            means = picked[columns].mean(axis=0, skipna=True)
            for bucket, column in enumerate(columns):
                rows.append({"strategy": strategy, "phase": phase, "bucket": bucket,
                             "weight": float(means[column]), "steps": steps})
    return pd.DataFrame(rows, columns=["strategy", "phase", "bucket", "weight", "steps"])
