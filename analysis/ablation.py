"""The multi-space ablation: one sweep on K x C multi-space latents, one on single-space latents.

Both sweeps train the same grid (strategies x targets x seeds, same steps and evaluations);
only the stage-1 autoencoder differs. For every strategy and target the two arms are compared
three ways, each with a bootstrap 95% interval over seeds:

- the final FID of each arm (mean over seeds);
- the paired difference multi − single of the final FID (same seed, same strategy);
- the speedup of multi over single: the steps single needs to reach its own final FID,
  divided by the steps multi needs to reach it (`speedup_table`, with the single-space arm
  as the baseline and not-reached seeds censored, exactly as for the strategies).

The verdict per strategy reads the FID difference: `multi better` when its interval lies
below 0, `single better` when above, `no difference detected` otherwise.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from .convergence import interval_text, speedup_table, split_by_target

VERDICT_MULTI_BETTER = "multi better"
VERDICT_SINGLE_BETTER = "single better"
VERDICT_NO_DIFFERENCE = "no difference detected"
VERDICT_CODES = {VERDICT_MULTI_BETTER: 1, VERDICT_NO_DIFFERENCE: 0, VERDICT_SINGLE_BETTER: -1}


class AblationError(ValueError):
    pass


def mean_interval(values: Sequence[float], *, level: float = 0.95, resamples: int = 10_000,
                  rng_seed: int = 0) -> dict:
    """Mean of `values` and the percentile-bootstrap interval of the mean (None with < 2 values)."""
    x = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    out = {"mean": float(x.mean()) if len(x) else None, "ci_low": None, "ci_high": None, "ci_level": level,
           "n": int(len(x))}
    if len(x) < 2:
        return out
    idx = np.random.default_rng(rng_seed).integers(0, len(x), size=(resamples, len(x)))
    means = x[idx].mean(axis=1)
    alpha = (1 - level) / 2
    out["ci_low"], out["ci_high"] = (float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha)))
    return out


def final_fids(curves: pd.DataFrame) -> dict:
    """{seed: the FID at the run's last evaluation}."""
    last = curves.sort_values("step").groupby("seed").tail(1)
    return {int(seed): float(fid) for seed, fid in zip(last["seed"], last["fid"])}


def difference_verdict(diff: dict) -> str:
    lo, hi = diff["ci_low"], diff["ci_high"]
    if lo is None or hi is None:
        return VERDICT_NO_DIFFERENCE
    if hi < 0:
        return VERDICT_MULTI_BETTER
    if lo > 0:
        return VERDICT_SINGLE_BETTER
    return VERDICT_NO_DIFFERENCE


def compare_arms(multi: pd.DataFrame, single: pd.DataFrame, *, multi_name: str, single_name: str) -> dict:
    """Both sweeps' curves.csv frames -> {target: {strategy: comparison}} for every (target,
    strategy) that both arms ran; see the module docstring for what a comparison holds."""
    if multi_name == single_name:
        raise AblationError(f"the two arms need different names, got {multi_name!r} twice")
    multi_t, single_t = split_by_target(multi), split_by_target(single)
    out: dict[str, dict] = {}
    for target in [t for t in multi_t if t in single_t]:
        m, s = multi_t[target], single_t[target]
        for strategy in [x for x in dict.fromkeys(m["strategy"]) if x in set(s["strategy"])]:
            m_runs, s_runs = m[m["strategy"] == strategy], s[s["strategy"] == strategy]
            m_final, s_final = final_fids(m_runs), final_fids(s_runs)
            seeds = sorted(set(m_final) & set(s_final))
            arms = pd.concat([m_runs.assign(strategy=multi_name), s_runs.assign(strategy=single_name)])
            arms = arms[arms["seed"].isin(seeds)]
            speed = speedup_table(arms, baseline=single_name)["strategies"][multi_name]
            diff = mean_interval([m_final[k] - s_final[k] for k in seeds])
            out.setdefault(target, {})[strategy] = {
                "seeds": seeds,
                "final": {multi_name: {"per_seed": {str(k): m_final[k] for k in seeds},
                                       **mean_interval([m_final[k] for k in seeds])},
                          single_name: {"per_seed": {str(k): s_final[k] for k in seeds},
                                        **mean_interval([s_final[k] for k in seeds])}},
                "difference": diff,
                "verdict": difference_verdict(diff),
                # geo_mean_low/high: what censored seeds say of a mean that is not a number
                "speedup": {k: speed[k] for k in ("geo_mean", "geo_mean_low", "geo_mean_high", "ci_low", "ci_high",
                                                  "ci_level", "ci_seeds", "per_seed", "summary")},
            }
    if not out:
        raise AblationError("the two sweeps share no (target, strategy) pair to compare; run the same "
                            "sweep.strategies and sweep.targets on both")
    return out


def best_strategy(comparison: dict, multi_name: str, baseline: str = "const") -> tuple[str, str]:
    """(target, strategy): the non-baseline strategy with the lowest mean final FID on the
    multi-space arm, on x0 when it ran (the authors' target); the baseline if it ran alone."""
    target = "x0" if "x0" in comparison else next(iter(comparison))
    rows = comparison[target]
    others = [s for s in rows if s != baseline] or list(rows)
    return target, min(others, key=lambda s: rows[s]["final"][multi_name]["mean"])


def metrics_numbers(comparison: dict, multi_name: str, single_name: str) -> dict:
    """Numbers only, a handful per (target, strategy): what `dvc metrics show` and `dvc exp show` list."""
    def r(v):
        return None if v is None else round(float(v), 4)

    out: dict[str, dict] = {}
    for target, rows in comparison.items():
        for strategy, c in rows.items():
            out.setdefault(target, {})[strategy] = {
                f"final_fid_{slug(multi_name)}": r(c["final"][multi_name]["mean"]),
                f"final_fid_{slug(single_name)}": r(c["final"][single_name]["mean"]),
                "fid_difference": r(c["difference"]["mean"]),
                "fid_difference_ci_low": r(c["difference"]["ci_low"]),
                "fid_difference_ci_high": r(c["difference"]["ci_high"]),
                "speedup": r(c["speedup"]["geo_mean"]),
                "speedup_geo_mean_low": r(c["speedup"]["geo_mean_low"]),
                "speedup_geo_mean_high": r(c["speedup"]["geo_mean_high"]),
                "speedup_ci_low": r(c["speedup"]["ci_low"]),
                "speedup_ci_high": r(c["speedup"]["ci_high"]),
                "verdict_code": VERDICT_CODES[c["verdict"]],
            }
    return out


def slug(name: str) -> str:
    """'K=3xC=4' -> 'k3c4': a metrics key DVC shows as a column."""
    return "".join(ch for ch in name.lower() if ch.isalnum())


def interval_of(entry: dict, fmt: str = ".1f") -> str:
    if entry["mean"] is None:
        return "n/a"
    if entry["ci_low"] is None:
        return f"{entry['mean']:{fmt}}"
    return f"{entry['mean']:{fmt}} [{entry['ci_low']:{fmt}}, {entry['ci_high']:{fmt}}]"


def ablation_markdown(comparison: dict, *, multi_name: str, single_name: str, budget: dict, metric: str,
                      autoencoders: dict[str, dict], figure: str, command: str, run: dict | None = None) -> str:
    """The generated results page of the ablation."""
    target, best = best_strategy(comparison, multi_name)
    c = comparison[target][best]
    lines = [
        "# Multi-space ablation: K subspaces vs one latent space, at the diffusion stage",
        "",
        f"Generated by the `multispace_ablation` stage (`{command}`) from the two sweeps' curves. "
        "Do not edit by hand.",
        "",
        *([f"- **Run:** commit `{run['commit']}`, on {run['machine']}."] if run else []),
        f"- **Arms:** {multi_name} (the default multi-space latents) and {single_name} (one space, same "
        "latent size); only the stage-1 autoencoder differs, both trained with the same loss and steps.",
        f"- **Budget:** {budget['steps']} training steps per run, {metric} of {budget['num_samples']} samples "
        f"every {budget['eval_every']} steps, seeds {budget['seeds']}, strategies {budget['strategies']}, "
        f"targets {budget['targets']}.",
        "- **Stage 1:** " + "; ".join(f"{name}: SSIM {a.get('ssim', float('nan')):.4f}, PSNR "
                                      f"{a.get('psnr', float('nan')):.2f} dB" for name, a in autoencoders.items())
        + " (test-set reconstructions: the floor each arm's samples are decoded through).",
        "- **Intervals:** bootstrap 95% over seeds. The difference is paired by seed; the speedup is "
        f"the steps {single_name} needs to reach its own final {metric} over the steps {multi_name} needs "
        "(censored when not reached, as for the strategies).",
        "",
        f"**Verdict ({target}, {best}, the sweep's best strategy):** {c['verdict']}: final {metric} "
        f"{multi_name} − {single_name} = {interval_of(c['difference'], '+.1f')}; speedup of {multi_name} over "
        f"{single_name} {interval_text(c['speedup'])}. This holds at {budget['steps']} steps per run only.",
        "",
        f"| target | strategy | final {metric} {multi_name} | final {metric} {single_name} | difference | "
        f"speedup {multi_name} over {single_name} | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for t, rows in comparison.items():
        for strategy, row in rows.items():
            lines.append(f"| {t} | {strategy} | {interval_of(row['final'][multi_name])} | "
                         f"{interval_of(row['final'][single_name])} | {interval_of(row['difference'], '+.1f')} | "
                         f"{interval_text(row['speedup'])} | {row['verdict']} |")
    lines += ["", f"![{metric} curves of both arms]({figure})", ""]
    return "\n".join(lines)
