"""The multi-space ablation's comparison (analysis.ablation) and its stage."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from analysis.ablation import (VERDICT_MULTI_BETTER, VERDICT_NO_DIFFERENCE, VERDICT_SINGLE_BETTER, AblationError,
                               best_strategy, compare_arms, mean_interval, metrics_numbers)

MULTI, SINGLE = "K=3xC=4", "K=1xC=12"
STEPS = (100, 200, 300, 400)


def sweep_curves(final_by_strategy: dict[str, list[float]], target: str = "x0") -> pd.DataFrame:
    """Curves that fall linearly from 300 to each seed's final FID, with the weight columns."""
    rows = []
    for strategy, finals in final_by_strategy.items():
        for seed, final in enumerate(finals):
            for i, step in enumerate(STEPS):
                fid = 300 + (final - 300) * (i + 1) / len(STEPS)
                rows.append({"strategy": strategy, "target": target, "seed": seed, "step": step, "fid": fid,
                             "w_t0": 1.0, "w_t1": 1.0})
    return pd.DataFrame(rows)


def test_mean_interval_brackets_the_mean_and_needs_two_values():
    out = mean_interval([1.0, 2.0, 3.0, 4.0])
    assert out["mean"] == pytest.approx(2.5) and out["n"] == 4
    assert 1.0 <= out["ci_low"] < 2.5 < out["ci_high"] <= 4.0
    one = mean_interval([7.0])
    assert one["mean"] == 7.0 and one["ci_low"] is None and one["ci_high"] is None


def test_a_consistently_better_multi_space_arm_is_called_better_with_a_speedup_above_one():
    multi = sweep_curves({"const": [60, 62, 61], "dysigma": [50, 52, 51]})
    single = sweep_curves({"const": [80, 83, 81], "dysigma": [70, 71, 72]})
    out = compare_arms(multi, single, multi_name=MULTI, single_name=SINGLE)
    row = out["x0"]["dysigma"]
    assert row["verdict"] == VERDICT_MULTI_BETTER
    assert row["difference"]["mean"] == pytest.approx(-20.0)
    assert row["difference"]["ci_high"] < 0
    assert row["final"][MULTI]["per_seed"] == {"0": 50.0, "1": 52.0, "2": 51.0}
    # multi reaches single's final FID (70-72) before single's last eval: a speedup above 1
    assert row["speedup"]["geo_mean"] > 1 and row["speedup"]["ci_low"] > 1
    assert best_strategy(out, MULTI) == ("x0", "dysigma")


def test_a_speedup_with_censored_seeds_prints_the_bound_they_put_on_its_mean():
    """Multi never reaches single's final FID: no mean, but the bound the censored seeds give,
    worded as on the strategies' page, in the page text and in the metrics."""
    from analysis.convergence import interval_text

    out = compare_arms(sweep_curves({"const": [80, 83, 81]}), sweep_curves({"const": [60, 62, 61]}),
                       multi_name=MULTI, single_name=SINGLE)
    speed = out["x0"]["const"]["speedup"]
    assert speed["geo_mean"] is None and speed["geo_mean_low"] is None and 0 < speed["geo_mean_high"] <= 1
    assert interval_text(speed).startswith(f"no mean (censored seeds: below {speed['geo_mean_high']:.2f}x) [0, ")
    numbers = metrics_numbers(out, MULTI, SINGLE)["x0"]["const"]
    assert numbers["speedup"] is None and numbers["speedup_geo_mean_high"] == round(speed["geo_mean_high"], 4)


def test_the_verdict_follows_the_interval_of_the_paired_difference():
    same = sweep_curves({"const": [60, 70, 80]})
    noisy = sweep_curves({"const": [65, 62, 83]})  # differences +5, -8, +3: the interval spans 0
    assert compare_arms(same, noisy, multi_name=MULTI, single_name=SINGLE)["x0"]["const"]["verdict"] \
        == VERDICT_NO_DIFFERENCE
    worse = sweep_curves({"const": [90, 95, 99]})
    assert compare_arms(worse, same, multi_name=MULTI, single_name=SINGLE)["x0"]["const"]["verdict"] \
        == VERDICT_SINGLE_BETTER


def test_only_pairs_both_arms_ran_are_compared_and_none_is_an_error():
    multi = sweep_curves({"const": [60, 61], "min_snr": [55, 56]})
    single = sweep_curves({"const": [70, 71]})
    assert list(compare_arms(multi, single, multi_name=MULTI, single_name=SINGLE)["x0"]) == ["const"]
    with pytest.raises(AblationError, match="share no"):
        compare_arms(multi, sweep_curves({"const": [1, 2]}, target="eps"), multi_name=MULTI, single_name=SINGLE)
    with pytest.raises(AblationError, match="different names"):
        compare_arms(multi, single, multi_name=MULTI, single_name=MULTI)


def test_metrics_are_numbers_only():
    out = compare_arms(sweep_curves({"const": [60, 62, 61]}), sweep_curves({"const": [80, 83, 81]}),
                       multi_name=MULTI, single_name=SINGLE)
    numbers = metrics_numbers(out, MULTI, SINGLE)["x0"]["const"]
    assert set(numbers) >= {"final_fid_k3xc4", "final_fid_k1xc12", "fid_difference", "fid_difference_ci_low",
                            "fid_difference_ci_high", "speedup", "speedup_geo_mean_low", "speedup_geo_mean_high",
                            "speedup_ci_low", "speedup_ci_high", "verdict_code"}
    assert all(v is None or isinstance(v, (int, float)) for v in numbers.values())
    assert numbers["verdict_code"] == 1


# ------------------------------------------------------------------------------- the stage

def write_sweep(directory: Path, curves: pd.DataFrame) -> Path:
    directory.mkdir(parents=True)
    curves.to_csv(directory / "curves.csv", index=False)
    trials = curves.groupby(["strategy", "target", "seed"]).tail(1).assign(metric="fid_featurenet", status="ok")
    trials.to_csv(directory / "trials.csv", index=False)
    return directory


def stage_args(tmp_path: Path, single_k: int = 1, single_c: int = 12) -> list[str]:
    write_sweep(tmp_path / "multi", sweep_curves({"const": [60, 62, 61], "dysigma": [50, 52, 51]}))
    write_sweep(tmp_path / "single", sweep_curves({"const": [80, 83, 81], "dysigma": [70, 71, 72]}))
    (tmp_path / "latents").mkdir()
    (tmp_path / "latents" / "meta.json").write_text(json.dumps({"K": single_k, "C": single_c}))
    for name, ssim in (("ae-multi.json", 0.93), ("ae-single.json", 0.97)):
        (tmp_path / name).write_text(json.dumps({"ssim": ssim, "psnr": 27.0}))
    (tmp_path / "params.yaml").write_text(Path("params.yaml").read_text())
    out = tmp_path / "out"
    return ["--params", str(tmp_path / "params.yaml"), "--multi-sweep", str(tmp_path / "multi"),
            "--single-sweep", str(tmp_path / "single"), "--single-latents", str(tmp_path / "latents"),
            "--multi-autoencoder-metrics", str(tmp_path / "ae-multi.json"),
            "--single-autoencoder-metrics", str(tmp_path / "ae-single.json"),
            "--metrics", str(out / "metrics.json"), "--report", str(out / "report.json"),
            "--plot", str(out / "results" / "ablation.png"), "--page", str(out / "page.md")]


def test_the_stage_writes_metrics_report_figure_and_page(tmp_path, capsys):
    from stages.multispace_ablation import main

    assert main(stage_args(tmp_path)) == 0
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_strategy"] == "dysigma"
    assert metrics["x0"]["dysigma"]["fid_difference"] == pytest.approx(-20.0)
    page = (out / "page.md").read_text()
    assert "**Verdict (x0, dysigma, the sweep's best strategy):** multi better" in page
    assert "SSIM 0.9300" in page and "SSIM 0.9700" in page and "](results/ablation.png)" in page
    assert (out / "results" / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "report.json").read_text())["best"] == {"target": "x0", "strategy": "dysigma"}
    assert "verdict (x0, dysigma): multi better" in capsys.readouterr().out


def test_a_single_space_store_of_another_size_is_refused_before_anything_is_written(tmp_path, capsys):
    from stages.multispace_ablation import main

    assert main(stage_args(tmp_path, single_k=3, single_c=4)) == 1
    err = capsys.readouterr().err
    assert "latents: holds 3 subspace(s) x 4 channels, expected 1 x 12" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
