"""DVC stage `featurenet`: train the domain classifier whose features give `fid_featurenet`.

Trains on the train split, measures accuracy on the test split, and writes the model
(--model: {config, state_dict}) and its metrics (--metrics: test_accuracy, train_seconds).
"""
from __future__ import annotations

import sys
import time

from msdm.config import ConfigError
from msdm.io import atomic_write_json
from pipeline.config import PipelineParams
from stages._cli import run_stage

PATHS = {"model": "models/featurenet.pt", "metrics": "metrics/featurenet.json"}


def body(params: PipelineParams, args) -> None:
    from msdm.data import load_arrays, num_classes
    from msdm.models.featurenet import evaluate_accuracy, save_featurenet, train_featurenet
    from msdm.precision import resolve_precision

    cfg = params.featurenet
    if params.fid.extractor != "featurenet":
        # No domain classifier is needed; a marker keeps the declared output (and DVC) consistent.
        from msdm.io import FEATURENET_ARTEFACT, save_artefact

        reason = f"fid.extractor is {params.fid.extractor!r}; no domain classifier trained"
        save_artefact({"kind": "none", "reason": reason}, args.model, FEATURENET_ARTEFACT)
        atomic_write_json({"skipped": reason}, args.metrics)
        print(f"featurenet: skipped ({reason})")
        return
    classes = num_classes(params.data)
    if classes < 2:
        raise ConfigError(f"data.dataset: {params.data.dataset!r} has no class labels, so no classifier can be "
                          f"trained for fid_featurenet. Fix: set fid.extractor: inception-v3-compat")
    precision = resolve_precision(cfg.precision, "cpu", key="featurenet.precision")
    train_images, train_labels = load_arrays(params.data, "train")
    test_images, test_labels = load_arrays(params.data, "test")
    start = time.perf_counter()
    model = train_featurenet(train_images, train_labels, cfg.steps, cfg.batch_size, cfg.lr, cfg.seed,
                             cfg.feature_dim, num_classes=classes, precision=precision)
    train_seconds = time.perf_counter() - start
    accuracy = evaluate_accuracy(model, test_images, test_labels)
    save_featurenet(model, args.model)
    atomic_write_json({"test_accuracy": round(accuracy, 5), "train_seconds": round(train_seconds, 1),
                       "steps": cfg.steps, "num_train": len(train_images), "num_test": len(test_images),
                       **precision.as_metrics()},
                      args.metrics)
    print(f"featurenet: test accuracy {accuracy:.4f} after {cfg.steps} steps ({train_seconds:.0f}s, "
          f"{precision.name}: {precision.reason}) -> {args.model}")


def main(argv: list[str] | None = None) -> int:
    return run_stage("featurenet", body, argv=argv, paths=PATHS, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
