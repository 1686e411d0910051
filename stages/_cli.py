"""Shared entry-point plumbing for the stage CLIs: clear one-line errors, no tracebacks."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import yaml

from msdm.codec import CodecError
from msdm.config import ConfigError
from msdm.data import DatasetError
from msdm.io import CorruptFileError
from pipeline.config import PipelineParams, load_params
from pipeline.errors import PipelineError

PIPELINE_FILE = Path("dvc.yaml")
# errors about an artefact on disk: the message names the file, the stage adds how to remake it
ARTEFACT_ERRORS = (CorruptFileError, FileNotFoundError, DatasetError, CodecError)


class InputMissingError(FileNotFoundError):
    """An input a stage needs is not there; the message names the stage that makes it."""


def require(path: str | Path, made_by: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise InputMissingError(f"{path}: not found. It is made by the '{made_by}' stage: dvc repro {made_by}")
    return path


def stage_outputs(pipeline_file: Path = PIPELINE_FILE) -> dict[str, str]:
    """{output path: the dvc.yaml stage that writes it}, from the pipeline's `outs`."""
    try:
        stages = (yaml.safe_load(pipeline_file.read_text()) or {}).get("stages", {})
    except (OSError, yaml.YAMLError):
        return {}
    outputs = {}
    for stage, body in stages.items():
        for out in (body or {}).get("outs", []):
            outputs[out if isinstance(out, str) else next(iter(out))] = stage
    return outputs


def remake_hint(message: str, pipeline_file: Path = PIPELINE_FILE) -> str:
    """' Rerun the stage that makes it: dvc repro -f STAGE' for the first pipeline output the
    message names (as written in dvc.yaml or as an absolute path), else ''."""
    if "dvc repro" in message:
        return ""
    found = []  # (position in the message, -length): the earliest, then the most specific, wins
    for out, stage in stage_outputs(pipeline_file).items():
        for form in {out.rstrip("/"), str(Path(out).resolve())}:
            at = message.find(form)
            end = at + len(form)
            if at >= 0 and (end == len(message) or message[end] in "/:,. )'\""):
                found.append((at, -len(form), stage))
    if not found:
        return ""
    return f" Rerun the stage that makes it: dvc repro -f {min(found)[2]}"


def progress(desc: str):
    """A per-batch callback (done, total): a tqdm bar on a terminal, one line per call otherwise."""
    from tqdm import tqdm

    bars: dict[int, tqdm] = {}

    def update(done: int, total: int) -> None:
        if not sys.stderr.isatty():
            print(f"{desc}: {done}/{total}", flush=True)
            return
        bar = bars.setdefault(total, tqdm(total=total, desc=desc, unit="sample"))
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            bars.pop(total)

    return update


def params_read(stage: str, pipeline_file: Path = PIPELINE_FILE) -> str | None:
    """'Params it reads (dvc.yaml): data, autoencoder', from the stage's `params:` in dvc.yaml."""
    try:
        body = ((yaml.safe_load(pipeline_file.read_text()) or {}).get("stages") or {}).get(stage) or {}
    except (OSError, yaml.YAMLError):
        return None
    keys = [k if isinstance(k, str) else ", ".join(map(str, k)) for k in body.get("params", [])]
    return f"Params it reads from params.yaml (dvc.yaml): {', '.join(keys)}" if keys else None


def add_paths(parser: argparse.ArgumentParser, **paths: str | Path) -> None:
    """One `--name PATH` option per file or folder the stage reads or writes. dvc.yaml's `cmd`
    passes each; the defaults are the repository's layout, for running a stage by hand."""
    for name, default in paths.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=Path, default=Path(default), metavar="PATH",
                            help=f"(default: {default})")


def run_stage(name: str, body: Callable[[PipelineParams, argparse.Namespace], None],
              configure: Callable[[argparse.ArgumentParser], None] | None = None,
              argv: list[str] | None = None, *, paths: dict[str, str | Path] | None = None,
              description: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=f"python -m stages.{name}", description=description,
                                     epilog=params_read(name), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml", metavar="PATH",
                        help="the params file, validated before any compute (default: params.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", dest="overrides",
                        help="override one value of the params file (VALUE in YAML), like dvc exp run -S; "
                             "repeatable. The ablation pipeline (ablation/dvc.yaml) uses it")
    add_paths(parser, **(paths or {}))
    if configure is not None:
        configure(parser)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        params = load_params(args.params, args.overrides)
        body(params, args)
    except ARTEFACT_ERRORS as e:
        print(f"{name}: error: {e}{remake_hint(str(e))}", file=sys.stderr)
        return 1
    except ConfigError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    except PipelineError as e:  # a failed run may name a damaged input: say which stage remakes it
        print(f"{name}: error: {e}{remake_hint(str(e))}", file=sys.stderr)
        return 1
    print(f"{name}: done in {time.perf_counter() - start:.1f}s")
    return 0
