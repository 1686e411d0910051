"""DVC stage `evaluate`: final FID of the EMA model and a class-conditional sample grid.

Writes --metrics (the FID under its extractor's name, with the same measurement for the
untrained model as a reference point) and --samples (a grid, one row per class).
"""
from __future__ import annotations

import sys

import torch

from msdm.io import DIFFUSION_MODEL_ARTEFACT, atomic_write_json, load_artefact
from pipeline.config import PipelineParams
from stages._cli import progress, require, run_stage

PATHS = {"latents": "data/latents", "autoencoder": "models/autoencoder.pt", "featurenet": "models/featurenet.pt",
         "fid_ref": "results/fid_ref/stats.npz", "model": "models/diffusion.pt", "metrics": "metrics/eval.json",
         "samples": "plots/samples.png"}
GRID_COLUMNS = 10


def body(params: PipelineParams, args) -> None:
    from msdm.evaluation import FIDEvaluator, SampleGenerator
    from msdm.latents import LatentStore
    from msdm.plots import save_class_grid
    from msdm.diffusion_training import build_model, latent_info
    require(args.latents / "meta.json", "encode")
    require(args.model, "train")
    require(args.autoencoder, "autoencoder")
    require(args.fid_ref, "fid_ref")
    if params.fid.extractor == "featurenet":
        require(args.featurenet, "featurenet")
    store = LatentStore(args.latents)
    info = latent_info(store.meta)
    state = load_artefact(args.model, DIFFUSION_MODEL_ARTEFACT)
    torch.manual_seed(params.train.seed)
    untrained = build_model(params, info).backbone.eval()
    model = build_model(params, info).backbone.eval()
    model.load_state_dict(state["ema"])

    gen = SampleGenerator(params, store, str(args.autoencoder), info)
    gen.on_batch = progress("evaluate: sampling")
    weights = str(args.featurenet) if params.fid.extractor == "featurenet" else params.fid.weights_path
    n = params.eval.final_num_samples

    def evaluator(num_samples: int) -> FIDEvaluator:
        return FIDEvaluator(gen, str(args.fid_ref), params.fid.extractor, weights, num_samples, params.eval.seed)

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
    atomic_write_json(metrics, args.metrics)

    classes = max(info.num_classes, 1)
    labels = torch.arange(classes).repeat_interleave(GRID_COLUMNS) if info.num_classes > 0 else None
    images = gen.images(model, classes * GRID_COLUMNS, seed=params.eval.seed + 1, labels=labels)
    save_class_grid(images, classes, GRID_COLUMNS, args.samples, dataset=params.data.dataset,
                    title=f"{params.weighting.strategy}, target {params.diffusion.target}, step {int(state['step'])}: "
                          f"{final['metric']} {final['fid']:.1f} ({n} samples)")
    print(f"evaluate: {final['metric']} = {final['fid']:.3f} over {n} samples "
          f"(untrained model: {baseline['fid']:.3f})")


def main(argv: list[str] | None = None) -> int:
    return run_stage("evaluate", body, argv=argv, paths=PATHS, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
