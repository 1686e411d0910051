"""Steps-to-target and speedup (SPEC section 6) on synthetic curves with known answers,
and the report stage end to end on a synthetic sweep."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest

from pipeline.convergence import (
    SweepResultsError,
    bucket_centres,
    paper_comparison,
    mean_curves,
    read_sweep,
    speedup_frame,
    speedup_table,
    steps_to_target,
    summarize_speedups,
    weight_profiles,
)

REPO = Path(__file__).resolve().parents[1]
EVAL_STEPS = [500, 1000, 1500, 2000, 2500, 3000, 3500, 4000]


def log_linear_fid(steps, offset: float, rate: float = 1.0) -> np.ndarray:
    """fid = offset - 10 ln(rate * step): linear in log(step), so log-step interpolation is
    exact, and a curve with rate k reaches any level of the rate-1 curve k times sooner."""
    return offset - 10.0 * np.log(rate * np.asarray(steps, dtype=float))


def curve_rows(strategy: str, seed: int, steps, fids, buckets: int = 4) -> list[dict]:
    return [
        {"strategy": strategy, "seed": seed, "step": s, "fid": f, "loss": 0.1,
         **{f"w_t{b}": 1.0 + b for b in range(buckets)}}
        for s, f in zip(steps, fids)
    ]


# ----------------------------------------------------------------------------- steps_to_target

def test_log_step_interpolation_is_exact_for_a_log_linear_curve():
    steps = [100, 1000, 10000]
    fids = [30.0, 20.0, 10.0]  # 50 - 10 log10(step)
    assert steps_to_target(steps, fids, 15.0) == pytest.approx(10 ** 3.5, rel=1e-12)
    assert steps_to_target(steps, fids, 28.0) == pytest.approx(10 ** 2.2, rel=1e-12)


def test_interpolation_is_in_log_step_not_linear_step():
    # Halfway in FID between steps 1 and 100 is sqrt(1 * 100) = 10 in log step, not 50.5.
    assert steps_to_target([1, 100], [10.0, 0.0], 5.0) == pytest.approx(10.0, rel=1e-12)


def test_first_eval_already_at_or_below_target_returns_first_step():
    assert steps_to_target([500, 1000], [8.0, 5.0], 9.0) == 500.0
    assert steps_to_target([500, 1000], [9.0, 5.0], 9.0) == 500.0


def test_exact_hit_on_an_eval_returns_that_step_exactly():
    assert steps_to_target([100, 300, 700], [30.0, 20.0, 10.0], 20.0) == 300.0


def test_never_reached_is_none():
    assert steps_to_target([100, 200, 400], [30.0, 20.0, 10.0], 9.99) is None


def test_non_monotone_curve_uses_the_first_crossing():
    # Dips below 12 between steps 1 and 2, climbs back, then ends at 12.
    fids = [30.0, 10.0, 25.0, 12.0]
    assert steps_to_target([1, 2, 3, 4], fids, 12.0) == pytest.approx(2 ** 0.9, rel=1e-12)


@pytest.mark.parametrize(
    "steps, fids, match",
    [
        ([0, 100], [2.0, 1.0], "positive"),
        ([-5, 100], [2.0, 1.0], "positive"),
        ([200, 100], [2.0, 1.0], "increasing"),
        ([100, 100], [2.0, 1.0], "increasing"),
        ([100, float("nan")], [2.0, 1.0], "finite"),
        ([100, 200], [2.0, float("nan")], "finite"),
        ([100, 200, 300], [2.0, 1.0], "equal length"),
        ([], [], "no evaluations"),
    ],
)
def test_bad_curves_are_refused(steps, fids, match):
    with pytest.raises(ValueError, match=match):
        steps_to_target(steps, fids, 1.5)


# ----------------------------------------------------------------------------- speedup_table

@pytest.fixture
def sweep() -> pd.DataFrame:
    """3 seeds. Known answers: fast = 2x, 3x, 4x; tie = 1x; slow never; partial only seed 0
    (2x); missing has no seed-2 curve and is 2x where it ran."""
    offsets = {0: 100.0, 1: 105.0, 2: 110.0}
    rows = []
    for seed, offset in offsets.items():
        rows += curve_rows("const", seed, EVAL_STEPS, log_linear_fid(EVAL_STEPS, offset))
        rows += curve_rows("fast", seed, EVAL_STEPS, log_linear_fid(EVAL_STEPS, offset, rate=seed + 2))
        rows += curve_rows("tie", seed, EVAL_STEPS, log_linear_fid(EVAL_STEPS, offset))
        rows += curve_rows("slow", seed, EVAL_STEPS, log_linear_fid(EVAL_STEPS, offset + 5.0))
        partial_offset = offset if seed == 0 else offset + 10.0  # 10 > 10 ln 2: never catches up
        rows += curve_rows("partial", seed, EVAL_STEPS, log_linear_fid(EVAL_STEPS, partial_offset, rate=2))
        if seed != 2:
            rows += curve_rows("missing", seed, EVAL_STEPS, log_linear_fid(EVAL_STEPS, offset, rate=2))
    return pd.DataFrame(rows).sample(frac=1.0, random_state=0)  # row order must not matter


def test_targets_are_const_final_fid_per_seed(sweep):
    table = speedup_table(sweep)
    assert table["baseline"] == "const"
    assert [t["seed"] for t in table["targets"]] == [0, 1, 2]
    for t, offset in zip(table["targets"], (100.0, 105.0, 110.0)):
        assert t["target_fid"] == pytest.approx(offset - 10 * math.log(4000))
        assert t["baseline_steps"] == 4000.0


def test_known_speedups_mean_and_spread(sweep):
    fast = speedup_table(sweep)["strategies"]["fast"]
    assert [e["speedup"] for e in fast["per_seed"]] == pytest.approx([2.0, 3.0, 4.0], rel=1e-9)
    assert [e["steps_to_target"] for e in fast["per_seed"]] == pytest.approx([2000, 4000 / 3, 1000], rel=1e-9)
    assert (fast["reached"], fast["n_seeds"], fast["all_reached"]) == (3, 3, True)
    assert fast["mean"] == pytest.approx(3.0)
    assert fast["std"] == pytest.approx(1.0)  # sample std of 2, 3, 4
    assert (fast["min"], fast["max"]) == pytest.approx((2.0, 4.0))
    assert fast["summary"] == "3.00x ± 1.00 (3/3 seeds)"


def test_baseline_and_identical_curve_tie_at_exactly_one(sweep):
    table = speedup_table(sweep)
    for name in ("const", "tie"):
        entry = table["strategies"][name]
        assert [e["speedup"] for e in entry["per_seed"]] == [1.0, 1.0, 1.0]
        assert entry["std"] == 0.0
        assert entry["summary"] == "1.00x ± 0.00 (3/3 seeds)"


def test_never_reached_gets_no_number(sweep):
    slow = speedup_table(sweep)["strategies"]["slow"]
    assert all(e["speedup"] is None and e["steps_to_target"] is None for e in slow["per_seed"])
    assert all(e["status"] == "not reached" for e in slow["per_seed"])
    assert (slow["reached"], slow["all_reached"]) == (0, False)
    assert slow["mean"] is slow["std"] is slow["min"] is slow["max"] is None
    assert slow["summary"] == "not reached (0/3 seeds)"


def test_partly_reached_averages_only_reached_seeds(sweep):
    partial = speedup_table(sweep)["strategies"]["partial"]
    assert [e["status"] for e in partial["per_seed"]] == ["reached", "not reached", "not reached"]
    assert partial["mean"] == pytest.approx(2.0)
    assert partial["std"] is None  # one seed has no spread
    assert partial["summary"] == "2.00x (1/3 seeds)"


def test_missing_strategy_curve_counts_as_not_reached(sweep):
    missing = speedup_table(sweep)["strategies"]["missing"]
    assert [e["status"] for e in missing["per_seed"]] == ["reached", "reached", "no curve"]
    assert missing["per_seed"][2]["speedup"] is None
    assert missing["summary"] == "2.00x ± 0.00 (2/3 seeds)"


def test_baseline_is_listed_first_then_order_of_appearance():
    rows = curve_rows("b", 0, [1, 2], [2.0, 1.0]) + curve_rows("const", 0, [1, 2], [2.0, 1.0]) \
        + curve_rows("a", 0, [1, 2], [2.0, 1.0])
    assert list(speedup_table(pd.DataFrame(rows))["strategies"]) == ["const", "b", "a"]


def test_non_monotone_baseline_uses_its_first_reach_of_its_final_fid():
    steps = [100, 200, 400, 800]
    rows = curve_rows("const", 0, steps, [40.0, 15.0, 30.0, 20.0]) \
        + curve_rows("late", 0, steps, [40.0, 30.0, 25.0, 20.0])
    table = speedup_table(pd.DataFrame(rows))
    first_reach = 100 * 2 ** 0.8  # (40 - 20) / (40 - 15) = 0.8 of the way from 100 to 200 in log step
    assert table["targets"][0]["baseline_steps"] == pytest.approx(first_reach)
    assert table["strategies"]["late"]["per_seed"][0]["speedup"] == pytest.approx(first_reach / 800)


def test_seed_without_baseline_curve_is_an_error(sweep):
    extra = pd.DataFrame(curve_rows("fast", 7, EVAL_STEPS, log_linear_fid(EVAL_STEPS, 100.0)))
    with pytest.raises(SweepResultsError, match=r"seed\(s\) \[7\] have no 'const' curve"):
        speedup_table(pd.concat([sweep, extra]))


def test_missing_baseline_is_an_error(sweep):
    with pytest.raises(SweepResultsError, match="no rows for the baseline strategy 'const'"):
        speedup_table(sweep[sweep["strategy"] != "const"])


def test_duplicate_eval_steps_are_an_error(sweep):
    with pytest.raises(SweepResultsError, match="duplicate eval steps"):
        speedup_table(pd.concat([sweep, sweep[sweep["strategy"] == "fast"].head(1)]))


def test_non_finite_fid_evals_are_dropped_with_a_warning():
    steps = [100, 200, 400]
    rows = curve_rows("const", 0, steps, [30.0, 20.0, 10.0]) \
        + curve_rows("diverged", 0, steps, [30.0, float("nan"), float("nan")])
    with pytest.warns(UserWarning, match="'diverged' seed 0: ignoring non-finite FID"):
        table = speedup_table(pd.DataFrame(rows))
    assert table["strategies"]["diverged"]["summary"] == "not reached (0/1 seeds)"


def test_baseline_that_never_improves_makes_the_seed_inconclusive():
    # The shape of a real sweep (eps target, cosine, DDIM, 1200 steps) that learned nothing:
    # const seed 1 is worst at the end, so its own "first reach" is its first eval; seed 0
    # ends a hair below its first eval, which the formula would call improvement.
    steps = [200, 400, 600, 800, 1000, 1200]
    rows = curve_rows("const", 0, steps, [651.9, 651.9, 732.0, 737.5, 682.3, 651.3]) \
        + curve_rows("const", 1, steps, [651.3, 693.9, 742.9, 730.8, 714.1, 692.3]) \
        + curve_rows("dysigma", 0, steps, [627.5, 588.4, 571.4, 667.2, 704.5, 683.5]) \
        + curve_rows("dysigma", 1, steps, [633.7, 616.4, 638.0, 688.4, 654.3, 626.1])
    table = speedup_table(pd.DataFrame(rows))
    assert [t["baseline_improved"] for t in table["targets"]] == [True, False]
    dysigma = table["strategies"]["dysigma"]
    seed0, seed1 = dysigma["per_seed"]
    assert seed0["status"] == "reached by the first eval" and seed0["speedup"] == pytest.approx(6.0)
    assert seed1["status"] == "inconclusive" and seed1["speedup"] is None
    assert dysigma["summary"] == ">= 6.00x (1/2 seeds; 1 a lower bound; 1 inconclusive: the baseline did not improve)"
    assert table["strategies"]["const"]["per_seed"][1]["status"] == "inconclusive"
    ok, verdict = paper_comparison(table, "dysigma", 3.7)
    assert ok is None and verdict.startswith("inconclusive")


def test_every_seed_inconclusive_reads_inconclusive_not_not_reached():
    rows = curve_rows("const", 0, [100, 200], [50.0, 60.0]) + curve_rows("x", 0, [100, 200], [70.0, 80.0])
    x = speedup_table(pd.DataFrame(rows))["strategies"]["x"]
    assert x["summary"].startswith("inconclusive (0/1 seeds") and x["mean"] is None


def test_first_eval_reach_is_a_lower_bound_in_the_paper_verdict():
    steps = [100, 200, 400, 800]
    rows = curve_rows("const", 0, steps, [40.0, 30.0, 25.0, 20.0]) \
        + curve_rows("dysigma", 0, steps, [19.0, 15.0, 12.0, 10.0]) \
        + curve_rows("min_snr", 0, steps, [45.0, 20.0, 15.0, 12.0])
    table = speedup_table(pd.DataFrame(rows))
    ok, verdict = paper_comparison(table, "dysigma", 3.7)  # >= 8x: a bound above the claim still settles it
    assert ok is True and verdict.startswith("yes: >= 8.00x")
    ok, verdict = paper_comparison(table, "dysigma", 9.0)  # a bound below the claim settles nothing
    assert ok is None and "lower bound below 9.0x" in verdict
    ok, verdict = paper_comparison(table, "min_snr", 3.4)  # reached at step 200 by interpolation: 4x
    assert ok is True and table["strategies"]["min_snr"]["per_seed"][0]["status"] == "reached"
    assert paper_comparison(table, "learned", 1.0)[0] is None  # not in the sweep


def test_summarize_speedups_counts_none_as_not_reached():
    stats = summarize_speedups([1.5, None, 2.5])
    assert (stats["reached"], stats["n_seeds"], stats["all_reached"]) == (2, 3, False)
    assert stats["mean"] == pytest.approx(2.0)
    assert stats["std"] == pytest.approx(math.sqrt(0.5))
    assert stats["summary"] == "2.00x ± 0.71 (2/3 seeds)"


def test_speedup_frame_is_tidy_and_keeps_not_reached_empty(sweep):
    frame = speedup_frame(speedup_table(sweep))
    assert len(frame) == 6 * 3
    slow = frame[frame["strategy"] == "slow"]
    assert slow["speedup"].isna().all() and (slow["status"] == "not reached").all()
    fast = frame[frame["strategy"] == "fast"].sort_values("seed")
    assert fast["speedup"].to_numpy() == pytest.approx([2.0, 3.0, 4.0])


# ----------------------------------------------------------------------------- plot data

def test_bucket_centres():
    assert bucket_centres(4, 1000).tolist() == [125.0, 375.0, 625.0, 875.0]
    with pytest.raises(ValueError):
        bucket_centres(0, 1000)


def test_mean_curves_band_over_seeds(sweep):
    means = mean_curves(sweep)
    row = means[(means["strategy"] == "const") & (means["step"] == 500)].iloc[0]
    base = -10 * math.log(500)
    assert row["fid_mean"] == pytest.approx(105.0 + base)
    assert (row["fid_min"], row["fid_max"]) == pytest.approx((100.0 + base, 110.0 + base))
    assert row["n_seeds"] == 3


def test_weight_profiles_pick_first_and_last_eval_and_average_seeds():
    rows = []
    for seed in (0, 1):
        for step, scale in ((200, 1.0), (100, 0.5), (300, 2.0)):  # unsorted on purpose
            rows.append({"strategy": "s", "seed": seed, "step": step, "fid": 1.0,
                         "w_t0": scale * (1 + seed), "w_t1": 10 * scale * (1 + seed)})
    profiles = weight_profiles(pd.DataFrame(rows)).set_index(["phase", "bucket"])
    assert profiles.loc[("early", 0), "weight"] == pytest.approx(0.5 * 1.5)
    assert profiles.loc[("late", 1), "weight"] == pytest.approx(20.0 * 1.5)
    assert profiles.loc[("early", 0), "steps"] == "100"
    assert profiles.loc[("late", 0), "steps"] == "300"


# ----------------------------------------------------------------------------- report stage

def write_synthetic_sweep(sweep_dir: Path, buckets: int = 10) -> None:
    """const, min_snr (2x), dysigma (4x), learned (never reaches); 2 seeds."""
    rates = {"const": 1.0, "min_snr": 2.0, "dysigma": 4.0, "learned": 0.5}
    centres = bucket_centres(buckets, 1000)
    rows = []
    for seed in (0, 1):
        for strategy, rate in rates.items():
            fids = log_linear_fid(EVAL_STEPS, 150.0 + seed, rate)
            for i, (step, fid) in enumerate(zip(EVAL_STEPS, fids)):
                late = i / (len(EVAL_STEPS) - 1)
                weights = {
                    "const": np.ones(buckets),
                    "min_snr": np.minimum(np.exp(8 - centres / 80), 5.0),
                    "dysigma": np.clip(centres / 1000, 0, 1) ** (1 + late) * (centres > 100),
                    "learned": np.exp(np.sin(centres / 300) * late),
                }[strategy]
                rows.append({"strategy": strategy, "seed": seed, "step": step, "fid": fid, "loss": 0.1,
                             **{f"w_t{b}": w for b, w in enumerate(weights)}})
    sweep_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(sweep_dir / "curves.csv", index=False)
    pd.DataFrame([
        {"strategy": s, "seed": seed, "status": "ok", "final_fid": 0.0, "metric": "fid_featurenet",
         "steps": 4000, "seconds": 1.0, "error": ""}
        for s in rates for seed in (0, 1)
    ]).to_csv(sweep_dir / "trials.csv", index=False)


@pytest.fixture
def report_paths(tmp_path):
    (tmp_path / "params.yaml").write_text("diffusion:\n  timesteps: 1000\n")
    write_synthetic_sweep(tmp_path / "sweep")
    return tmp_path


def report_args(root: Path) -> list[str]:
    return ["--params", str(root / "params.yaml"), "--sweep-dir", str(root / "sweep"),
            "--metrics", str(root / "metrics/speedup.json"), "--table", str(root / "report/speedup.csv"),
            "--plots-dir", str(root / "plots")]


def test_report_stage_writes_json_table_and_plots(report_paths):
    from stages.report import main

    main(report_args(report_paths))
    metrics = json.loads((report_paths / "metrics/speedup.json").read_text())
    assert metrics["metric"] == "fid_featurenet"
    assert metrics["baseline"] == "const"
    assert [t["target_fid"] for t in metrics["targets"]] == pytest.approx(
        [150.0 - 10 * math.log(4000), 151.0 - 10 * math.log(4000)])
    strategies = metrics["strategies"]
    assert strategies["dysigma"]["mean"] == pytest.approx(4.0)
    assert strategies["min_snr"]["summary"] == "2.00x ± 0.00 (2/2 seeds)"
    assert strategies["learned"]["summary"] == "not reached (0/2 seeds)"
    assert strategies["learned"]["mean"] is None
    assert metrics["paper_dysigma_speedup"] == 3.7 and metrics["min_snr_paper_speedup"] == 3.4
    assert metrics["dysigma_reproduces_paper"] is True
    assert metrics["dysigma_reproduces_paper_verdict"].startswith("yes: 4.00x")
    assert metrics["min_snr_reproduces_paper"] is False

    table = pd.read_csv(report_paths / "report/speedup.csv")
    assert set(table["strategy"]) == {"const", "min_snr", "dysigma", "learned"}
    assert table.loc[table["strategy"] == "learned", "speedup"].isna().all()

    for name in ("convergence.png", "weights.png"):
        path = report_paths / "plots" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 400 and image.shape[1] > 800
        # Non-trivial: far from a blank canvas.
        assert np.std(image[..., :3]) > 0.05
        assert path.stat().st_size > 20_000


def test_report_stage_without_dysigma_says_not_run(report_paths):
    from stages.report import build_metrics

    curves, metric = read_sweep(report_paths / "sweep")
    metrics = build_metrics(speedup_table(curves[curves["strategy"] != "dysigma"]), metric)
    assert metrics["dysigma_reproduces_paper"] is None
    assert metrics["dysigma_reproduces_paper_verdict"].startswith("not run")


def test_read_sweep_refuses_missing_columns(tmp_path):
    tmp_path.joinpath("curves.csv").write_text("strategy,seed,step\nconst,0,100\n")
    with pytest.raises(SweepResultsError, match=r"missing column\(s\) \['fid'\].*dvc repro sweep"):
        read_sweep(tmp_path)
    tmp_path.joinpath("curves.csv").write_text("strategy,seed,step,fid,w_t1\nconst,0,100,3.0,1.0\n")
    with pytest.raises(SweepResultsError, match="w_t0"):
        read_sweep(tmp_path)


def test_read_sweep_metric_name_defaults_to_fid_and_refuses_mixed(report_paths):
    sweep_dir = report_paths / "sweep"
    trials = pd.read_csv(sweep_dir / "trials.csv")
    trials.loc[0, "metric"] = "fid_inception"
    trials.to_csv(sweep_dir / "trials.csv", index=False)
    with pytest.raises(SweepResultsError, match="different metrics"):
        read_sweep(sweep_dir)
    (sweep_dir / "trials.csv").unlink()
    assert read_sweep(sweep_dir)[1] == "fid"


def test_report_cli_missing_curves_names_the_fix(tmp_path):
    (tmp_path / "params.yaml").write_text("{}\n")
    result = subprocess.run(
        [sys.executable, "-m", "stages.report", *report_args(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert re.search(r"curves\.csv: not found\. Run the sweep first: dvc repro sweep", result.stderr)
    assert not (tmp_path / "metrics").exists()
