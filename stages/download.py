"""DVC stage `download`: make the dataset available under data.root, verified.

Writes --manifest (files with bytes and md5, examples per split). Fashion-MNIST is copied
into data.root from Debian's dataset-fashion-mnist package when it is installed.
"""
from __future__ import annotations

import sys

from msdm.io import atomic_write_json
from pipeline.config import PipelineParams
from stages._cli import run_stage

PATHS = {"manifest": "data/raw/manifest.json"}


def body(params: PipelineParams, args) -> None:
    from msdm.data import build_manifest, prepare

    directory = prepare(params.data)
    manifest = build_manifest(params.data, directory)
    atomic_write_json(manifest, args.manifest)
    sizes = ", ".join(f"{split} {n}" for split, n in manifest["num_examples"].items())
    megabytes = sum(f["bytes"] for f in manifest["files"].values()) / 1e6
    print(f"download: {params.data.dataset} ready in {directory} ({sizes} examples; {len(manifest['files'])} files, "
          f"{megabytes:.1f} MB, md5 verified) -> {args.manifest}")


def main(argv: list[str] | None = None) -> int:
    return run_stage("download", body, argv=argv, paths=PATHS, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
