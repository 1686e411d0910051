"""DVC stage `train`: class-conditional multi-space diffusion on the latents, via Ray Train.

    python -m stages.train

Resumes from the last checkpoint when re-run with the same params (the Ray run name is a
hash of everything that defines the run). Writes models/diffusion.pt (EMA weights),
results/train/curve.csv (FID of the EMA weights every eval.every steps) and metrics/train.json.
"""
from __future__ import annotations

import sys
from pathlib import Path

from msdm.config import Params
from msdm.io import atomic_write_json
from stages._cli import require, run_stage

LATENTS = Path("data/latents")
CURVE = Path("results/train/curve.csv")
MODEL_OUT = Path("models/diffusion.pt")
METRICS = Path("metrics/train.json")


def body(params: Params, args) -> None:
    from pipeline.cluster import init_ray
    from pipeline.runs import export_final_model, run_name, run_paths, train_with_ray

    paths = run_paths(LATENTS, CURVE)
    for p, stage in ((LATENTS / "meta.json", "encode"), (paths.autoencoder, "autoencoder"),
                     (paths.featurenet, "featurenet"), (paths.fid_ref, "fid_ref")):
        if p:
            require(p, stage)
    init_ray(params.ray)
    name = run_name("train", params, LATENTS)
    summary = train_with_ray(params, paths, name=name, storage_suffix="train")
    export_final_model(params, summary.checkpoint_dir, LATENTS, MODEL_OUT)
    atomic_write_json({**summary.metrics, "run_name": name}, METRICS)
    print(f"train: {summary.metrics}")


if __name__ == "__main__":
    sys.exit(run_stage("train", body))
