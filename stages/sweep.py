"""DVC stage `sweep`: Ray Tune over sweep.strategies x sweep.targets x sweep.seeds, each trial a Ray Train run.

    python -m stages.sweep

Writes results/sweep/curves.csv (strategy, seed, step, fid, loss, per-subspace MSE and the
mean weight per t-bucket) and results/sweep/trials.csv. Re-running after an interruption
restores the Tune experiment and resumes each trial from its last checkpoint.
"""
from __future__ import annotations

import sys
from pathlib import Path

from msdm.config import Params
from stages._cli import require, run_stage

OUT = Path("results/sweep")


def body(params: Params, args) -> None:
    from pipeline.cluster import init_ray
    from pipeline.spec import repo_paths, stage_storage, train_spec
    from pipeline.sweep import run_sweep

    paths = repo_paths()
    require(Path(paths.latents) / "meta.json", "encode")
    require(paths.autoencoder, "autoencoder")
    require(paths.fid_ref, "fid_ref")
    if params.fid.extractor == "featurenet":
        require(paths.featurenet, "featurenet")
    init_ray(params.ray)
    out = run_sweep(train_spec(params, paths, stage_storage(params, "sweep")), OUT)
    print(f"sweep: wrote {out.curves} and {out.trials}")


if __name__ == "__main__":
    sys.exit(run_stage("sweep", body))
