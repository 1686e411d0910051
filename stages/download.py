"""DVC stage `download`: make the dataset available under data.root, verified.

    python -m stages.download [--params params.yaml]

Writes data/raw/manifest.json (files with bytes and md5, examples per split). Fashion-MNIST
is copied into data.root from Debian's dataset-fashion-mnist package when it is installed.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from msdm.config import ConfigError, load_params
from msdm.data import DatasetError, build_manifest, prepare
from msdm.io import atomic_write_json

MANIFEST_PATH = Path("data/raw/manifest.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.download", description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml", help="params file (its `data` section is used)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        cfg = load_params(args.params).data
        directory = prepare(cfg)
        manifest = build_manifest(cfg, directory)
    except (ConfigError, DatasetError) as e:
        print(f"download: error: {e}", file=sys.stderr)
        return 1
    atomic_write_json(manifest, MANIFEST_PATH)
    sizes = ", ".join(f"{split} {n}" for split, n in manifest["num_examples"].items())
    megabytes = sum(f["bytes"] for f in manifest["files"].values()) / 1e6
    print(f"download: {cfg.dataset} ready in {directory} ({sizes} examples; {len(manifest['files'])} files, "
          f"{megabytes:.1f} MB, md5 verified) -> {MANIFEST_PATH} in {time.perf_counter() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
