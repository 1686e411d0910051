"""Shared entry-point plumbing for the stage CLIs: clear one-line errors, no tracebacks."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

from msdm.config import ConfigError, Params, load_params
from msdm.data import DatasetError
from pipeline.errors import PipelineError
from msdm.io import CorruptFileError


class InputMissingError(FileNotFoundError):
    """An input a stage needs is not there; the message names the stage that makes it."""


def require(path: str | Path, made_by: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputMissingError(f"{path}: not found. It is made by the '{made_by}' stage: dvc repro {made_by}")
    return path


def run_stage(name: str, body: Callable[[Params, argparse.Namespace], None],
              configure: Callable[[argparse.ArgumentParser], None] | None = None,
              argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m stages.{name}")
    parser.add_argument("--params", default="params.yaml")
    if configure is not None:
        configure(parser)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        params = load_params(args.params)
        body(params, args)
    except (ConfigError, CorruptFileError, FileNotFoundError, DatasetError, PipelineError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    print(f"{name}: done in {time.perf_counter() - start:.1f}s")
    return 0
