"""Steps-to-target and speedup on synthetic curves with known answers,
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

from e2e import params_text
from analysis.convergence import (
    SweepResultsError,
    bucket_centres,
    claim_verdict,
    geo_mean_text,
    interval_text,
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
    assert claim_verdict(dysigma, 3.7) == "inconclusive"


def test_every_seed_inconclusive_reads_inconclusive_not_not_reached():
    rows = curve_rows("const", 0, [100, 200], [50.0, 60.0]) + curve_rows("x", 0, [100, 200], [70.0, 80.0])
    x = speedup_table(pd.DataFrame(rows))["strategies"]["x"]
    assert x["summary"].startswith("inconclusive (0/1 seeds") and x["mean"] is None


def test_lower_bounds_settle_a_claim_only_from_above():
    steps = [100, 200, 400, 800]
    rows = []
    for seed in (0, 1):
        rows += curve_rows("const", seed, steps, [40.0, 30.0, 25.0, 20.0]) \
            + curve_rows("dysigma", seed, steps, [19.0, 15.0, 12.0, 10.0]) \
            + curve_rows("min_snr", seed, steps, [45.0, 20.0, 15.0, 12.0])
    table = speedup_table(pd.DataFrame(rows))
    dysigma = table["strategies"]["dysigma"]  # reached by the first eval: >= 8x on both seeds
    assert dysigma["ci_low"] == pytest.approx(8.0) and dysigma["ci_high"] is None
    assert dysigma["geo_mean"] is None and geo_mean_text(dysigma) == "at least 8.00x"
    assert claim_verdict(dysigma, 3.7) == "reproduced"  # a bound above the claim settles it
    assert claim_verdict(dysigma, 9.0) == "inconclusive"  # a bound below the claim settles nothing
    min_snr = table["strategies"]["min_snr"]  # reached at step 200 by interpolation: 4x on both seeds
    assert min_snr["per_seed"][0]["status"] == "reached"
    assert (min_snr["ci_low"], min_snr["ci_high"]) == pytest.approx((4.0, 4.0))
    assert claim_verdict(min_snr, 3.4) == "reproduced" and claim_verdict(min_snr, 4.5) == "contradicted at this budget"
    assert claim_verdict(table["strategies"].get("learned"), 1.0) is None  # not in the sweep


def test_interval_is_a_bootstrap_over_seeds_in_log_space(sweep):
    fast = speedup_table(sweep)["strategies"]["fast"]  # 2x, 3x, 4x
    assert fast["geo_mean"] == pytest.approx(24 ** (1 / 3))
    # P(a resample is all one seed) = 1/27 > 2.5%, so the percentile ends are the extreme seeds
    assert (fast["ci_low"], fast["ci_high"]) == pytest.approx((2.0, 4.0))
    assert (fast["ci_level"], fast["ci_seeds"]) == (0.95, 3)
    assert interval_text(fast) == "2.88x [2.00, 4.00] 95% CI over 3 seeds"
    assert claim_verdict(fast, 3.7) == "reproduced"  # the interval contains the claim
    assert claim_verdict(fast, 1.5) == "reproduced"  # the interval lies above it
    assert claim_verdict(fast, 4.5) == "contradicted at this budget"


def test_not_reached_is_censored_never_a_number(sweep):
    table = speedup_table(sweep)
    slow = table["strategies"]["slow"]
    # not reached by step 4000: the speedup is below 4000 / 4000 on every seed
    assert [e["speedup_upper_bound"] for e in slow["per_seed"]] == [1.0, 1.0, 1.0]
    assert slow["geo_mean"] is None and slow["ci_low"] is None and slow["ci_high"] == pytest.approx(1.0)
    assert claim_verdict(slow, 3.7) == "inconclusive"  # always, when a seed did not reach
    assert (slow["geo_mean_low"], slow["geo_mean_high"]) == (None, pytest.approx(1.0))
    partial = table["strategies"]["partial"]  # 2x on seed 0, not reached on seeds 1 and 2
    assert partial["ci_low"] is None and partial["ci_high"] == pytest.approx(2.0)
    # the one reached seed's 2x is not the strategy's mean: the censored seeds (< 1x) bound it
    assert partial["geo_mean"] is None and partial["geo_mean_low"] is None
    assert partial["geo_mean_high"] == pytest.approx(2 ** (1 / 3))
    assert interval_text(partial) == "no mean (censored seeds: below 1.26x) [0, 2.00] 95% CI over 3 seeds"
    assert claim_verdict(partial, 1.5) == "inconclusive"
    missing = table["strategies"]["missing"]  # no curve for seed 2
    assert claim_verdict(missing, 1.5) == "inconclusive"


def test_one_seed_gives_no_interval_and_no_verdict():
    rows = curve_rows("const", 0, EVAL_STEPS, log_linear_fid(EVAL_STEPS, 100.0)) \
        + curve_rows("fast", 0, EVAL_STEPS, log_linear_fid(EVAL_STEPS, 100.0, rate=3))
    fast = speedup_table(pd.DataFrame(rows))["strategies"]["fast"]
    assert fast["geo_mean"] == pytest.approx(3.0) and fast["ci_low"] is fast["ci_high"] is None
    assert claim_verdict(fast, 3.0) == "inconclusive"


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
    """Targets x0 and eps; const, min_snr (2x), dysigma (4x), learned (never reaches); 2 seeds.
    On eps every strategy but const is 1.5x slower than on x0's rates."""
    rates = {"const": 1.0, "min_snr": 2.0, "dysigma": 4.0, "learned": 0.5}
    centres = bucket_centres(buckets, 1000)
    rows = []
    for target, factor in (("x0", 1.0), ("eps", 1 / 1.5)):
        for seed in (0, 1):
            for strategy, rate in rates.items():
                fids = log_linear_fid(EVAL_STEPS, 150.0 + seed, rate * (factor if strategy != "const" else 1.0))
                for i, (step, fid) in enumerate(zip(EVAL_STEPS, fids)):
                    late = i / (len(EVAL_STEPS) - 1)
                    weights = {
                        "const": np.ones(buckets),
                        "min_snr": np.minimum(np.exp(8 - centres / 80), 5.0),
                        "dysigma": np.clip(centres / 1000, 0, 1) ** (1 + late) * (centres > 100),
                        "learned": np.exp(np.sin(centres / 300) * late),
                    }[strategy]
                    rows.append({"strategy": strategy, "target": target, "seed": seed, "step": step, "fid": fid,
                                 "loss": 0.1, **{f"w_t{b}": w for b, w in enumerate(weights)}})
    sweep_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(sweep_dir / "curves.csv", index=False)
    # 16 trials of 60 s each, ending 30 s apart from 12:00:00: 16 min of runs, 8.5 min from the first start to the last end
    pd.DataFrame([
        {"strategy": s, "target": t, "seed": seed, "status": "ok", "final_fid": 0.0, "metric": "fid_featurenet",
         "steps": 4000, "seconds": 60.0, "finished_at": f"2026-12-03T12:{i // 2:02d}:{30 * (i % 2):02d}Z", "error": ""}
        for i, (s, t, seed) in enumerate((s, t, seed) for s in rates for t in ("x0", "eps") for seed in (0, 1))
    ]).to_csv(sweep_dir / "trials.csv", index=False)


@pytest.fixture
def report_paths(tmp_path):
    (tmp_path / "params.yaml").write_text(params_text(diffusion={"timesteps": 1000}))
    write_synthetic_sweep(tmp_path / "sweep")
    return tmp_path


def report_args(root: Path) -> list[str]:
    return ["--params", str(root / "params.yaml"), "--sweep-dir", str(root / "sweep"),
            "--metrics", str(root / "metrics/speedup.json"), "--report", str(root / "report/speedup.json"),
            "--table", str(root / "report/speedup.csv"), "--plots-dir", str(root / "plots"),
            "--page", str(root / "results.md"), "--plot-data", str(root / "report/plots")]


def numbers_only(value) -> bool:
    if isinstance(value, dict):
        return all(numbers_only(v) for v in value.values())
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def test_report_stage_writes_numbers_verdicts_table_and_plots(report_paths, capsys):
    from stages.report import main

    main(report_args(report_paths))
    metrics = json.loads((report_paths / "metrics/speedup.json").read_text())
    assert metrics["metric"] == "fid_featurenet"
    assert numbers_only({k: v for k, v in metrics.items() if k != "metric"})  # sentences go elsewhere
    x0, eps = metrics["speedup"]["x0"], metrics["speedup"]["eps"]
    assert set(x0) == {"min_snr", "dysigma", "learned"}  # const is the baseline of its own target
    assert x0["dysigma"]["geo_mean"] == pytest.approx(4.0) and eps["dysigma"]["geo_mean"] == pytest.approx(4 / 1.5)
    assert (x0["dysigma"]["ci_low"], x0["dysigma"]["ci_high"]) == pytest.approx((4.0, 4.0))
    assert x0["learned"]["geo_mean"] is None and x0["learned"]["seeds_reached"] == 0
    # the rule: 4.0 >= 3.7 reproduced; 2.67 < 3.7 contradicted; 2.0 < 3.4 contradicted; learned absent
    assert metrics["verdict"] == {"dysigma": {"x0": 1, "eps": -1}, "min_snr": {"x0": -1, "eps": -1}}

    report = json.loads((report_paths / "report/speedup.json").read_text())
    assert report["budgets"]["x0"] == {"steps": 4000, "seeds": 2, "evals": 8}
    texts = [c["text"] for c in report["claims"]]
    assert any(t.startswith("MSDM Dy-Sigma, the authors' code 3.7x vs const, target x0: reproduced at 4000 steps x 2 seeds")
               for t in texts), texts
    out = capsys.readouterr().out
    assert out.count("verdict: ") == 4 and "contradicted at this budget" in out
    # the results page shows the same numbers, and says which run they come from
    page = (report_paths / "results.md").read_text()
    assert "| MSDM Dy-Sigma, the authors' code | x0 | 3.7x | 4.00x [4.00, 4.00] 95% CI over 2 seeds | 2/2 | " \
           "**reproduced** |" in page
    assert "| Min-SNR-5 (Hang et al. 2023) | eps | 3.4x | 1.33x [1.33, 1.33] 95% CI over 2 seeds | 2/2 | " \
           "**contradicted at this budget** |" in page
    # censored seeds: no mean, the bound they put on it, and the same interval ends as the verdict table
    assert "| learned | below 1.00 | [0, 1.00] | <1.00, <1.00 |" in page
    assert re.search(r"commit `[0-9a-f]{7,}`", page) and "cores (" in page
    assert "[results_multispace.md](results_multispace.md)" in page  # the multi-space claim's own page
    # what the sweep cost, from trials.csv
    assert json.loads((report_paths / "report/speedup.json").read_text())["time"] == {
        "trials": 16, "run_seconds": 960.0, "wall_seconds": 510.0}
    assert ("- **Time:** 16 trials, 16.0 min of Train runs added up (`seconds` in trials.csv); 8.5 min from the "
            "first trial's start to the last one's end") in page

    table = pd.read_csv(report_paths / "report/speedup.csv")
    assert set(table["strategy"]) == {"const", "min_snr", "dysigma", "learned"}
    assert set(table["target"]) == {"x0", "eps"}
    assert table.loc[table["strategy"] == "learned", "speedup"].isna().all()

    for name in ("convergence.png", "speedups.png", "weights.png"):  # the page's figures
        path = report_paths / "plots" / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 400 and image.shape[1] > 800
        # Non-trivial: far from a blank canvas.
        assert np.std(image[..., :3]) > 0.05
        assert path.stat().st_size > 20_000


def test_report_without_a_claimed_strategy_gives_it_no_verdict(report_paths):
    from analysis.report import budget_of, build_report

    curves, metric = read_sweep(report_paths / "sweep")
    curves = curves[(curves["strategy"] != "dysigma") & (curves["target"] == "x0")].drop(columns="target")
    metrics, report = build_report({"x0": speedup_table(curves)}, {"x0": budget_of(curves)}, metric)
    assert "dysigma" not in metrics["verdict"] and set(metrics["verdict"]) == {"min_snr"}
    assert all(c["strategy"] != "dysigma" for c in report["claims"])


def test_read_sweep_refuses_missing_columns(tmp_path):
    tmp_path.joinpath("curves.csv").write_text("strategy,seed,step\nconst,0,100\n")
    with pytest.raises(SweepResultsError, match=r"missing column\(s\) \['fid'\].*dvc repro sweep"):
        read_sweep(tmp_path)
    tmp_path.joinpath("curves.csv").write_text("strategy,seed,step,fid,w_t0\nconst,0,100,3.0,1.0\n")
    with pytest.raises(SweepResultsError, match=r"\['target'\].*dvc repro sweep"):
        read_sweep(tmp_path)
    tmp_path.joinpath("curves.csv").write_text("strategy,target,seed,step,fid,w_t1\nconst,x0,0,100,3.0,1.0\n")
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
    (tmp_path / "params.yaml").write_text(params_text())
    result = subprocess.run(
        [sys.executable, "-m", "stages.report", *report_args(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert re.search(r"curves\.csv: not found\. Run the sweep first: dvc repro sweep", result.stderr)
    assert not (tmp_path / "metrics").exists()


def test_step_labels_leave_out_the_ticks_that_would_print_over_their_neighbours():
    from analysis.plots import step_labels

    assert step_labels([150, 300, 450, 600, 750, 900]) == ["150", "300", "450", "600", "", "900"]
    assert step_labels([100, 200, 300]) == ["100", "200", "300"]
    assert step_labels([500, 1000, 1500, 2000, 2500, 3000, 3500, 4000]) == \
        ["500", "1000", "1500", "2000", "2500", "", "", "4000"]
