"""Dataset presets: partial params overrides (configs/*.yaml) run as DVC experiments.

    python -m pipeline.presets configs/imagenet256.yaml          # print the `dvc exp run` command
    python -m pipeline.presets configs/imagenet256.yaml --set data.root=/mnt/datasets --set train.num_workers=16
    python -m pipeline.presets configs/imagenet256.yaml --apply  # write it into params.yaml (comments kept)
    python -m pipeline.presets --check                           # validate every configs/*.yaml

A preset is a YAML mapping `section: {key: value}` holding the keys its recipe depends on;
everything else comes from params.yaml. It is validated merged over params.yaml by
`pipeline.config.params_from_dict`, so an unknown key or a bad value is refused with the
preset file named. The printed command passes every key as a `-S key=value` override in
the Hydra syntax DVC parses, so `dvc exp show` lists the run like any other experiment,
and `--apply` uses DVC's own override code to edit params.yaml without losing comments.
"""
from __future__ import annotations

import argparse
import copy
import math
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

from msdm.config import ConfigError, read_yaml, to_dict

from .config import PipelineParams, load_params, params_from_dict

PRESET_DIR = Path("configs")
PARAMS = Path("params.yaml")
# Strings Hydra reads back as themselves without quotes; anything else is quoted.
_BARE_STRING = re.compile(r"[A-Za-z_/][\w./-]*")
_HYDRA_KEYWORDS = {"true", "false", "null", "nan", "inf"}


class PresetError(ConfigError):
    """A preset file that is missing, not a mapping of sections, or invalid over params.yaml."""


def load_preset(path: str | Path) -> dict[str, dict[str, Any]]:
    """The preset's {section: {key: value}} mapping, shape-checked (values are checked on merge)."""
    path = Path(path)
    raw = read_yaml(path, error=PresetError,
                    missing_hint=f"preset file not found (the presets are {', '.join(available_presets())})")
    if not isinstance(raw, dict) or not raw:
        raise PresetError(f"{path}: expected a mapping of params sections (e.g. `train: {{lr: 0.0001}}`)")
    for section, keys in raw.items():
        if not isinstance(keys, dict) or not keys:
            raise PresetError(f"{path}: section {section!r} must map keys to values, got {keys!r}")
    return raw


def available_presets(directory: str | Path = PRESET_DIR) -> list[str]:
    return sorted(str(p) for p in Path(directory).glob("*.yaml"))


def merge(base: dict, preset: dict, *, source: str) -> dict:
    """`base` (a full params dict) with the preset's keys replaced; unknown sections refused."""
    merged = copy.deepcopy(base)
    for section, keys in preset.items():
        if section not in merged:
            raise PresetError(f"{source}: unknown section {section!r}; params.yaml has "
                              f"{', '.join(sorted(merged))}")
        merged[section].update(copy.deepcopy(keys))
    return merged


def preset_params(preset: str | Path | dict, base: PipelineParams | None = None, *,
                  source: str | None = None) -> PipelineParams:
    """The validated params of `preset` (a file or a mapping) over `base` (default: params.yaml)."""
    if not isinstance(preset, dict):
        source = source or str(preset)
        preset = load_preset(preset)
    source = source or "preset"
    base = load_params(PARAMS) if base is None else base
    try:
        return params_from_dict(merge(to_dict(base), preset, source=source))
    except PresetError:
        raise
    except ConfigError as e:
        raise PresetError(f"{source}: {e}") from None


def parse_set(items: list[str]) -> dict[str, dict[str, Any]]:
    """`section.key=value` strings (value in YAML) -> a preset mapping."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not section or not name:
            raise PresetError(f"--set {item!r}: expected section.key=value, e.g. data.root=/mnt/datasets")
        out.setdefault(section, {})[name] = yaml.safe_load(value) if value else ""
    return out


def combine(preset: dict, extra: dict) -> dict:
    out = copy.deepcopy(preset)
    for section, keys in extra.items():
        out.setdefault(section, {}).update(keys)
    return out


def hydra_value(value: Any) -> str:
    """`value` in the override grammar `dvc exp run -S` parses (Hydra's), read back unchanged."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PresetError(f"{value!r}: params values must be finite")
        return repr(value)
    if isinstance(value, str):
        if _BARE_STRING.fullmatch(value) and value.lower() not in _HYDRA_KEYWORDS:
            return value
        # Hydra's quoted strings: a backslash escapes only a quote or the backslashes before one.
        return "'" + re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value) + "'"
    if isinstance(value, list):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    raise PresetError(f"{value!r}: a params value must be a number, string, boolean or list")


def overrides(preset: dict) -> list[str]:
    """One `section.key=value` override per preset key, in the preset's order."""
    return [f"{section}.{key}={hydra_value(value)}" for section, keys in preset.items() for key, value in keys.items()]


def exp_run_command(preset: dict, name: str, target: str = "") -> str:
    """The shell command that runs the preset as a DVC experiment named `name`."""
    parts = ["dvc", "exp", "run", "-n", name]
    for override in overrides(preset):
        parts += ["-S", override]
    if target:
        parts.append(target)
    # One override per line (a backslash-newline continues a shell command): readable, still pastable.
    return " ".join(shlex.quote(p) for p in parts).replace(" -S ", " \\\n    -S ")


def apply_to_params_file(preset: dict, params_path: str | Path = PARAMS) -> PipelineParams:
    """Write the preset into `params_path` through DVC's own -S code (comments survive), then validate."""
    from dvc.utils.hydra import apply_overrides

    params_from_dict(merge(to_dict(load_params(params_path)), preset, source=str(params_path)))  # refuse first
    apply_overrides(str(params_path), overrides(preset))
    return load_params(params_path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.presets", description=__doc__.splitlines()[0])
    parser.add_argument("preset", nargs="?", help="a preset file, e.g. configs/imagenet256.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="an extra override on top of the preset (repeatable), e.g. data.root=/mnt/datasets")
    parser.add_argument("--target", default="evaluate",
                        help="the dvc stage to run up to (default: evaluate; '' for the whole pipeline)")
    parser.add_argument("--apply", action="store_true", help="write the overrides into --params instead of printing")
    parser.add_argument("--params", default=str(PARAMS), help="the params file merged under the preset")
    parser.add_argument("--check", action="store_true", help="validate every configs/*.yaml and exit")
    args = parser.parse_args(argv)
    try:
        base = load_params(args.params)
        if args.check:
            for path in available_presets():
                preset_params(path, base)
                print(f"{path}: ok")
            return 0
        if not args.preset:
            parser.error(f"give a preset file (one of {', '.join(available_presets())}) or --check")
        preset = combine(load_preset(args.preset), parse_set(args.set))
        preset_params(preset, base, source=args.preset)
        if args.apply:
            apply_to_params_file(preset, args.params)
            print(f"{args.params}: applied {args.preset} ({len(overrides(preset))} keys)")
        else:
            print(exp_run_command(preset, Path(args.preset).stem, args.target))
    except ConfigError as e:
        print(f"presets: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
