"""DVC stage `multispace_ablation` (ablation/dvc.yaml): the multi-space claim, tested at the diffusion stage.

Reads the default sweep (--multi-sweep: K x C multi-space latents), the same sweep on
single-space latents of the same size (--single-sweep, made by ablation/dvc.yaml) and both
autoencoders' test metrics. Writes --metrics (numbers only: final FID of each arm, their
paired difference and the speedup of multi over single, each with a bootstrap 95% interval
over seeds, and a verdict code 1 multi better, 0 no difference detected, -1 single better),
--report (the same with per-seed values), --plot and --page (the generated results page).
The maths: analysis.ablation. Reads the `autoencoder` and `sweep` sections.
"""
from __future__ import annotations

import json
import os
import sys

from pipeline.config import PipelineParams
from stages._cli import require, run_stage

PATHS = {"multi_sweep": "results/sweep", "single_sweep": "results/ablation/sweep-k1",
         "single_latents": "data/ablation/latents-k1",
         "multi_autoencoder_metrics": "metrics/autoencoder.json",
         "single_autoencoder_metrics": "metrics/ablation/autoencoder-k1.json",
         "metrics": "metrics/multispace_ablation.json", "report": "results/ablation/multispace.json",
         "plot": "docs/results/multispace_ablation.png", "page": "docs/results_multispace.md"}
COMMAND = "dvc repro ablation/dvc.yaml"


def arm_names(params: PipelineParams) -> tuple[str, str]:
    a = params.autoencoder
    return f"K={a.subspaces}xC={a.channels}", f"K=1xC={a.subspaces * a.channels}"


def check_same_latent_size(params: PipelineParams, meta: dict, where) -> None:
    """The single-space arm must have one subspace and as many channels as the K x C latents."""
    from msdm.config import ConfigError

    a = params.autoencoder
    got = (meta.get("K"), meta.get("C"))
    if got != (1, a.subspaces * a.channels):
        raise ConfigError(f"{where}: holds {got[0]} subspace(s) x {got[1]} channels, expected 1 x "
                          f"{a.subspaces * a.channels} (autoencoder.subspaces x autoencoder.channels); set "
                          f"single_space in ablation/dvc.yaml to match params.yaml")


def body(params: PipelineParams, args) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless under dvc and CI
    import matplotlib.pyplot as plt

    from analysis.ablation import (AblationError, ablation_markdown, best_strategy, compare_arms, interval_of,
                                   metrics_numbers)
    from analysis.convergence import SweepResultsError, interval_text, read_sweep
    from pipeline.errors import PipelineError
    from analysis.plots import ablation_figure
    from analysis.report import run_description
    from msdm.io import atomic_path, atomic_write_json

    multi_name, single_name = arm_names(params)
    require(args.multi_sweep / "curves.csv", "sweep")
    require(args.single_sweep / "curves.csv", "sweep_k1")
    check_same_latent_size(params, json.loads(require(args.single_latents / "meta.json", "encode_k1").read_text()),
                           args.single_latents)
    autoencoders = {name: json.loads(require(path, stage).read_text()) for name, path, stage in (
        (multi_name, args.multi_autoencoder_metrics, "autoencoder"),
        (single_name, args.single_autoencoder_metrics, "autoencoder_k1"))}
    # every input is read and checked before anything is written
    try:
        multi, metric = read_sweep(args.multi_sweep)
        single, single_metric = read_sweep(args.single_sweep)
        if metric != single_metric:
            raise AblationError(f"{args.single_sweep}: measured with {single_metric!r}, but {args.multi_sweep} "
                                f"with {metric!r}; rerun both sweeps with the same fid.extractor")
        comparison = compare_arms(multi, single, multi_name=multi_name, single_name=single_name)
    except (SweepResultsError, AblationError) as e:
        raise PipelineError(str(e)) from None
    target, best = best_strategy(comparison, multi_name)

    fig = ablation_figure({multi_name: multi, single_name: single}, comparison, target, metric)
    with atomic_path(args.plot) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    s = params.sweep
    budget = {"steps": s.steps, "eval_every": s.eval_every, "num_samples": s.num_samples, "seeds": list(s.seeds),
              "strategies": list(s.strategies), "targets": list(s.targets)}
    page = ablation_markdown(comparison, multi_name=multi_name, single_name=single_name, budget=budget,
                             metric=metric, autoencoders=autoencoders,
                             figure=os.path.relpath(args.plot, args.page.parent), command=COMMAND,
                             run=run_description(params))
    with atomic_path(args.page) as tmp:
        tmp.write_text(page)
    atomic_write_json({"arms": [multi_name, single_name], "metric": metric, "budget": budget,
                       "best": {"target": target, "strategy": best}, "comparison": comparison}, args.report)
    atomic_write_json({"best_strategy": best, **metrics_numbers(comparison, multi_name, single_name)}, args.metrics)
    for t, rows in comparison.items():
        for strategy, row in rows.items():
            print(f"{t:>4} {strategy:>16}: final {metric} {multi_name} - {single_name} = "
                  f"{interval_of(row['difference'], '+.2f')}; speedup {interval_text(row['speedup'])}; {row['verdict']}")
    print(f"verdict ({target}, {best}): {comparison[target][best]['verdict']}")


def main(argv: list[str] | None = None) -> int:
    return run_stage("multispace_ablation", body, argv=argv, paths=PATHS, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
