"""DVC stage `sweep`: Ray Tune over sweep.strategies x sweep.targets x sweep.seeds, each trial a Ray Train run.

Writes --out/curves.csv (strategy, target, seed, step, fid, loss, per-subspace MSE and the
mean weight per t-bucket), --out/trials.csv and --out/trials/ (each trial's own curve).
Re-running after an interruption restores the Tune experiment and resumes each unfinished
trial from its last checkpoint.
"""
from __future__ import annotations

import sys

from pipeline.config import PipelineParams
from stages._cli import require, run_stage

PATHS = {"latents": "data/latents", "autoencoder": "models/autoencoder.pt", "featurenet": "models/featurenet.pt",
         "fid_ref": "results/fid_ref/stats.npz", "out": "results/sweep"}


def body(params: PipelineParams, args) -> None:
    from pipeline.cluster import init_ray, require_room
    from pipeline.spec import ArtefactPaths, stage_storage, train_spec, trial_resources
    from pipeline.sweep import run_sweep

    require(args.latents / "meta.json", "encode")
    require(args.autoencoder, "autoencoder")
    require(args.fid_ref, "fid_ref")
    if params.fid.extractor == "featurenet":
        require(args.featurenet, "featurenet")
    paths = ArtefactPaths(latents=str(args.latents), autoencoder=str(args.autoencoder),
                          featurenet=str(args.featurenet), fid_ref=str(args.fid_ref))
    init_ray(params.ray)
    spec = train_spec(params, paths, stage_storage(params, args.runs))
    require_room(trial_resources(params).per_run(), "sweep", params.ray)
    out = run_sweep(spec, args.out)
    print(f"sweep: wrote {out.curves} and {out.trials}")


def main(argv: list[str] | None = None) -> int:
    return run_stage("sweep", body, configure=_options, argv=argv, paths=PATHS, description=__doc__)


def _options(parser) -> None:
    parser.add_argument("--runs", default="sweep", metavar="NAME",
                        help="the folder under ray.storage_path that keeps this sweep's Ray runs and checkpoints "
                             "(declared in dvc.yaml as results/ray/NAME, persistent; default: sweep)")


if __name__ == "__main__":
    sys.exit(main())
