"""DVC stage `train`: class-conditional multi-space diffusion on the latents, via Ray Train.

Resumes from the last checkpoint when re-run with the same params (the Ray run name is a
hash of everything that defines the run). Writes the EMA weights (--model), the run's curve
logged with DVCLive (--live: FID, loss, per-subspace MSE and loss weights vs step) and the
run's last report (--metrics). `--dry-run [--preset P] [--json]`
reads no data and writes nothing: it prints the configured model's size and FLOPs
(pipeline.dry_run). `--preset` merges a configs/*.yaml preset over the params first (dry run
only: a real run takes its params from params.yaml, through `dvc exp run -S`).
"""
from __future__ import annotations

import argparse
import json
import sys

from msdm.config import ConfigError
from msdm.io import atomic_write_json
from pipeline.config import PipelineParams
from pipeline.spec import ArtefactPaths
from stages._cli import require, run_stage

PATHS = {"latents": "data/latents", "autoencoder": "models/autoencoder.pt", "featurenet": "models/featurenet.pt",
         "fid_ref": "results/fid_ref/stats.npz", "live": "results/train/live",
         "model": "models/diffusion.pt", "metrics": "metrics/train.json"}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dry-run", action="store_true",
                        help="build the configured model without data and print its size and FLOPs per image")
    parser.add_argument("--preset", default="", help="with --dry-run: a configs/*.yaml preset merged over --params")
    parser.add_argument("--json", action="store_true", help="with --dry-run: print the numbers as JSON")


def body(params: PipelineParams, args) -> None:
    if args.dry_run:
        from pipeline.dry_run import dry_run_report, format_report
        from pipeline.presets import preset_params

        report = dry_run_report(preset_params(args.preset, params) if args.preset else params, args.autoencoder)
        return print(json.dumps(report, indent=2) if args.json else format_report(report))
    if args.preset:
        raise ConfigError("--preset only goes with --dry-run; a real run takes its params from params.yaml "
                          "(run a preset with: python -m pipeline.presets PRESET, then the dvc exp run it prints)")
    from msdm.metrics import metric_name
    from pipeline.cluster import init_ray, require_room
    from pipeline.ray_train import export_final_model, fit
    from pipeline.spec import stage_storage, train_spec

    for path, stage in ((args.latents / "meta.json", "encode"), (args.autoencoder, "autoencoder"),
                        (args.featurenet, "featurenet"), (args.fid_ref, "fid_ref")):
        require(path, stage)
    paths = ArtefactPaths(latents=str(args.latents), autoencoder=str(args.autoencoder),
                          featurenet=str(args.featurenet), fid_ref=str(args.fid_ref), live=str(args.live))
    init_ray(params.ray)
    spec = train_spec(params, paths, stage_storage(params, "train"))
    require_room(spec.resources.per_run(), "train", params.ray)
    summary = fit(spec)
    export_final_model(spec, summary.checkpoint, args.model)
    atomic_write_json({**summary.metrics, "run_name": spec.name}, args.metrics)
    print(f"train: {summary.line(metric_name(params.fid.extractor))}; model in {args.model}")


def main(argv: list[str] | None = None) -> int:
    return run_stage("train", body, configure, argv, paths=PATHS, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
