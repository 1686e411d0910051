"""DVC stage `evaluate`: final FID of the EMA model and a class-conditional sample grid.

    python -m stages.evaluate

Writes metrics/eval.json (the FID under its extractor's name, with the same measurement for
the untrained model as a reference point) and plots/samples.png (one row per class).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from msdm.config import Params
from msdm.io import atomic_write_json, safe_torch_load
from stages._cli import require, run_stage

MODEL = Path("models/diffusion.pt")
METRICS = Path("metrics/eval.json")
SAMPLES_PNG = Path("plots/samples.png")
GRID_COLUMNS = 10


def body(params: Params, args) -> None:
    from msdm.evaluation import FIDEvaluator, SampleGenerator
    from msdm.latents import LatentStore
    from msdm.plots import save_class_grid
    from msdm.train import build_model, latent_info
    from pipeline.spec import AUTOENCODER, FEATURENET, FID_REF, LATENTS

    require(LATENTS / "meta.json", "encode")
    require(MODEL, "train")
    require(AUTOENCODER, "autoencoder")
    require(FID_REF, "fid_ref")
    if params.fid.extractor == "featurenet":
        require(FEATURENET, "featurenet")
    store = LatentStore(LATENTS)
    info = latent_info(store.meta)
    state = safe_torch_load(MODEL, made_by="train")
    torch.manual_seed(params.train.seed)
    untrained = build_model(params, info).backbone.eval()
    model = build_model(params, info).backbone.eval()
    model.load_state_dict(state["ema"])

    gen = SampleGenerator(params, store, str(AUTOENCODER), info)
    weights = str(FEATURENET) if params.fid.extractor == "featurenet" else params.fid.weights_path
    n = params.eval.final_num_samples

    def evaluator(num_samples: int) -> FIDEvaluator:
        return FIDEvaluator(gen, str(FID_REF), params.fid.extractor, weights, num_samples, params.eval.seed)

    final = evaluator(n)(model, int(state["step"]))
    # the untrained model is a reference point hundreds of FID away: eval.num_samples suffice
    baseline = evaluator(params.eval.num_samples)(untrained, 0)
    metrics = {
        "fid": final["fid"], "metric": final["metric"], "extractor": params.fid.extractor,
        "fid_untrained": baseline["fid"], "num_samples": n,
        "num_samples_untrained": params.eval.num_samples, "sampler": params.eval.sampler,
        "sampling_steps": params.eval.sampling_steps, "spacing": params.eval.spacing,
        "clip_x0": params.eval.clip_x0, "eta": params.eval.eta, "cfg_scale": params.eval.cfg_scale,
        "step": int(state["step"]), "strategy": params.weighting.strategy, **gen.precision.as_metrics(),
    }
    atomic_write_json(metrics, METRICS)

    classes = max(info.num_classes, 1)
    labels = torch.arange(classes).repeat_interleave(GRID_COLUMNS) if info.num_classes > 0 else None
    images = gen.images(model, classes * GRID_COLUMNS, seed=params.eval.seed + 1, labels=labels)
    save_class_grid(images, classes, GRID_COLUMNS, SAMPLES_PNG, dataset=params.data.dataset)
    print(f"evaluate: {final['metric']} = {final['fid']:.3f} over {n} samples "
          f"(untrained model: {baseline['fid']:.3f})")


if __name__ == "__main__":
    sys.exit(run_stage("evaluate", body))
