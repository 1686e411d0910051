"""DVC stage `fid_ref`: FID reference statistics of the real test split.

With `fid.reference_stats` set, that .npz (keys mu, sigma: e.g. ADM's VIRTUAL_imagenet512)
is validated against the extractor and copied instead of computed. Writes the statistics
(--stats: mu, sigma, extractor) and what they are (--info: extractor, metric name, number of
images, feature size, source).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from msdm.config import ConfigError
from msdm.io import atomic_write_json
from pipeline.config import PipelineParams
from stages._cli import require, run_stage

PATHS = {"featurenet": "models/featurenet.pt", "stats": "results/fid_ref/stats.npz",
         "info": "results/fid_ref/stats.json"}


def body(params: PipelineParams, args) -> None:
    from msdm import metrics

    extractor = params.fid.extractor
    if extractor == metrics.FEATURENET:
        require(args.featurenet, "featurenet")
    weights = metrics.extractor_weights_path(extractor, params.fid.weights_path, args.featurenet)
    start = time.perf_counter()
    if params.fid.reference_stats:
        source = params.fid.reference_stats
        fix = (f"fid.reference_stats is {source!r}: point it at an .npz with mu [D] and sigma [D, D] of "
               f"this extractor's features, or set it to '' to compute them from the test split")
        if not Path(source).is_file():
            raise ConfigError(f"fid.reference_stats: {source} not found. Fix: {fix}")
        stats = metrics.load_stats(source, fix=fix)
        metrics.check_stats_match(stats, extractor, metrics.feature_dim(extractor, weights), source, fix=fix)
        num_images = None
    else:
        source = f"{params.data.dataset} test split"
        metrics.get_extractor(extractor, weights)  # fail on bad weights before reading the data; it is cached
        images = metrics.real_test_images(params.data)
        stats = metrics.reference_statistics(images, extractor, weights, params.eval.batch_size)
        num_images = len(images)
    metrics.save_stats(args.stats, stats, extractor=extractor)
    info = {"extractor": extractor, "metric": metrics.metric_name(extractor), "num_images": num_images,
            "feature_dim": int(stats["mu"].shape[0]), "source": source,
            "seconds": round(time.perf_counter() - start, 1)}
    atomic_write_json(info, args.info)
    counted = f"{num_images} images" if num_images is not None else "precomputed"
    print(f"fid_ref: {extractor} statistics of {source} ({counted}, {info['feature_dim']} features) -> {args.stats}")


def main(argv: list[str] | None = None) -> int:
    return run_stage("fid_ref", body, argv=argv, paths=PATHS, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
