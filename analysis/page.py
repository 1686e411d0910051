"""The results page (docs/results.md), written by the `report` stage from its own numbers.

Nothing on the page is typed by hand: every number comes from the report dict that
`stages.report` also writes to results/report/speedup.json, and the run that produced it is
named at the top (git commit, params, machine), so a page in git always says where it is from.
"""
from __future__ import annotations

from .convergence import (VERDICT_CONTRADICTED, VERDICT_INCONCLUSIVE, VERDICT_REPRODUCED, ci_text, geo_mean_text,
                          interval_text)

RULE = (f"**The rule** (docs/method.md): per claim and target, the speedup's bootstrap 95% interval over "
        f"seeds, in log-speedup space. *{VERDICT_REPRODUCED}*: the interval contains the claim or lies above "
        f"it. *{VERDICT_CONTRADICTED}*: it lies below the claim. *{VERDICT_INCONCLUSIVE}*: otherwise, and "
        f"always when a seed did not reach const's final FID, or fewer than two seeds give an interval.")


def time_line(time: dict | None, sweep: dict) -> str:
    """The sweep's time, from trials.csv: the study's cost on the machine the page names."""
    if not time:
        return "- **Time:** not recorded (no `seconds` in trials.csv)."
    at_once = sweep.get("num_workers", 1) * sweep.get("cpus_per_worker", 1)
    wall = (f"; {time['wall_seconds'] / 60:.1f} min from the first trial's start to the last one's end "
            f"(trials run side by side where the CPUs allow: each takes {at_once} CPU(s))"
            if time.get("wall_seconds") is not None else "; the span of the sweep is not recorded")
    return (f"- **Time:** {time['trials']} trials, {time['run_seconds'] / 60:.1f} min of Train runs added up "
            f"(`seconds` in trials.csv){wall}.")


def results_markdown(report: dict, run: dict) -> str:
    """`report`: what stages.report builds; `run`: analysis.report.run_description (commit, machine,
    the sweep section, train batch size and lr, the sampler)."""
    s = run["sweep"]
    lines = [
        "# Results: does a loss weight converge faster than `const`?",
        "",
        "Written by the `report` stage (`dvc repro report`) from `results/sweep/curves.csv`. "
        "Do not edit by hand: rerun the pipeline.",
        "",
        f"- **Run:** commit `{run['commit']}` (the pipeline's code; params may differ from its "
        f"params.yaml in a `dvc exp`), on {run['machine']}.",
        f"- **Budget:** {s['steps']} training steps per trial, {len(s['seeds'])} seeds "
        f"({', '.join(map(str, s['seeds']))}), targets {', '.join(s['targets'])}, "
        f"strategies {', '.join(s['strategies'])}; model {s['preset']}, batch {run['batch_size']}, "
        f"lr {run['lr']}.",
        time_line(report.get("time"), s),
        f"- **Measure:** `{report['metric']}` of the EMA weights on {s['num_samples']} samples every "
        f"{s['eval_every']} steps, sampler {run['sampler']}. The speedup of a strategy on one seed is the "
        f"steps const needs to reach its own final FID divided by the steps the strategy needs "
        f"(interpolated in log step); each target is compared with const of the same target.",
        "",
        "## Verdicts",
        "",
        RULE,
        "",
        "| claim | target | claimed | measured: geo-mean [95% CI] | seeds reached | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for c in report["claims"]:
        entry = report["tables"][c["target"]]["strategies"][c["strategy"]]
        lines.append(f"| {c['claim']} | {c['target']} | {c['claimed']}x | {interval_text(entry)} | "
                     f"{entry['reached']}/{entry['n_seeds']} | **{c['verdict']}** |")
    lines += ["", "## Speedups per target", ""]
    for target, table in report["tables"].items():
        lines += [f"### Target {target}", "",
                  "| strategy | geo-mean | 95% CI | per seed | summary |", "|---|---|---|---|---|"]
        for strategy, e in table["strategies"].items():
            if strategy == table["baseline"]:
                continue
            per_seed = ", ".join(
                f"{p['speedup']:.2f}" if p["speedup"] is not None
                else (f"<{p['speedup_upper_bound']:.2f}" if p.get("speedup_upper_bound") else p["status"])
                for p in e["per_seed"])
            lines.append(f"| {strategy} | {geo_mean_text(e, unit='')} | {ci_text(e)} | {per_seed} | {e['summary']} |")
        targets = ", ".join(f"{t['target_fid']:.1f}" for t in table["targets"])
        lines += ["", f"const's final {report['metric']} per seed (the FID to reach): {targets}.", ""]
    lines += [
        "## Figures", "",
        "![FID vs step per target](results/convergence.png)", "",
        "![Speedups with intervals](results/speedups.png)", "",
        "![Loss weight vs t](results/weights.png)", "",
        "## The paper's other claims", "",
        "- Multi-space diffusion: the multi-space ablation (`ablation/dvc.yaml`, `make ablation`) trains "
        "this sweep again on single-space latents and writes its verdict to "
        "[results_multispace.md](results_multispace.md).",
        "- FID 3.35 on ImageNet-512 is the `evaluate` stage's `metrics/eval.json` under the "
        "`configs/imagenet512.yaml` preset on GPUs ([scaling.md](scaling.md)); this page does not judge it.", "",
    ]
    return "\n".join(lines)
