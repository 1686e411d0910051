"""`params.yaml` -> typed, validated dataclasses: the one source of truth for config.

Every section is a frozen dataclass. Each field declares its allowed values in its
metadata (`choices`, `min`, `max`), so that a bad value is refused with a message
naming the key, the value and what is allowed, before any compute starts.
"""
from __future__ import annotations

import dataclasses
import math
import reprlib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml


class ConfigError(ValueError):
    """A params.yaml value that is missing, unknown, mistyped or out of range."""


# Upper bounds: far beyond any real run (ImageNet-512 on a GPU cluster included), low enough
# that nothing downstream overflows or tries to allocate the impossible.
SEED_MAX = 2 ** 31 - 1       # every RNG the pipeline seeds (torch, numpy, Python) takes it, seed + rank too
STEPS_MAX = 10 ** 8
BATCH_MAX = 2 ** 16
SAMPLES_MAX = 10 ** 6        # FID-50K is 5e4
LIST_MAX = 1000              # sweep seeds and the like
PARAMS_FILE_MAX_BYTES = 1 << 20
SHOWN_CHARS = 200            # of a bad value in a message

# Training-split sizes: a batch larger than its dataset cannot be drawn.
TRAIN_SET_SIZES = {"fashion_mnist": 60_000, "cifar10": 50_000, "celeba": 162_770, "lsun_bedroom": 3_033_042,
                   "lsun_church": 126_227, "imagenet": 1_281_167}

_short = reprlib.Repr()
_short.maxlevel, _short.maxlist, _short.maxtuple, _short.maxdict = 3, 8, 8, 8
_short.maxstring, _short.maxlong, _short.maxother = SHOWN_CHARS, 40, SHOWN_CHARS


def shown(value: Any) -> str:
    """A bad value as a message shows it: repr, cut to about 200 characters (nested and huge
    values included), so that one line names it without pasting all of it."""
    text = _short.repr(value)
    return text if len(text) <= SHOWN_CHARS else text[:SHOWN_CHARS] + "..."


def option(default: Any, *, choices=None, min=None, max=None, min_exclusive=False, max_exclusive=False,
           doc: str = ""):
    """A config field: its default, and what values are allowed (checked when params are loaded)."""
    meta = {"choices": choices, "min": min, "max": max, "min_exclusive": min_exclusive,
            "max_exclusive": max_exclusive, "doc": doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


STRATEGIES = ("const", "min_snr", "learned", "dysigma", "dysigma_min_snr", "soft_min_snr", "p2")
DATASETS = ("fashion_mnist", "cifar10", "celeba", "lsun_bedroom", "lsun_church", "imagenet")
PRESETS = ("vit-tiny", "vit-small", "vit-b", "vit-l", "vit-xl")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # auto: msdm.precision picks per device
TARGETS = ("x0", "eps", "v")  # what the backbone predicts; msdm.diffusion.prediction(name)
SAMPLERS = ("ddim", "ddpm", "dpmpp_2m")
SPACINGS = ("leading", "linspace", "trailing", "karras")  # timestep grids, see msdm.sampling.timestep_grid
EXTRACTORS = ("featurenet", "inception-v3-compat")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = option("fashion_mnist", choices=DATASETS)
    root: str = option("data/raw", doc="where datasets live or are downloaded to")
    image_size: int = option(32, min=8, max=1024)
    download: bool = option(True, doc="allow a network download when the files are not found locally")


@dataclass(frozen=True)
class AutoencoderConfig:
    kind: str = option("multispace", choices=("multispace", "sd-vae"))
    path: str = option("stabilityai/sd-vae-ft-mse", doc="sd-vae: local folder or hub id")
    subspaces: int = option(3, min=1, max=16, doc="K")
    channels: int = option(4, min=1, max=64, doc="C, channels per subspace")
    downsample: int = option(4, choices=(1, 2, 4, 8, 16), doc="f")
    widths: list = option([32, 64])
    attn_heads: int = option(4, min=1, max=64)
    ssim_weight: float = option(0.3, min=0.0, max=1.0, doc="lambda in lambda*(1-SSIM)+(1-lambda)*Huber")
    recon_loss: str = option("hybrid", choices=("hybrid", "l2"))
    huber_delta: float = option(0.1, min=0.0, min_exclusive=True)
    steps: int = option(1750, min=0, max=STEPS_MAX)
    batch_size: int = option(128, min=1, max=BATCH_MAX)
    lr: float = option(2e-3, min=0.0, min_exclusive=True)
    seed: int = option(0, min=0, max=SEED_MAX)
    precision: str = option("auto", choices=PRECISIONS)


@dataclass(frozen=True)
class EncodeConfig:
    batch_size: int = option(1000, min=1, max=BATCH_MAX)
    shard_size: int = option(20000, min=1, max=10 ** 7)


@dataclass(frozen=True)
class DiffusionConfig:
    timesteps: int = option(1000, min=2, max=100000)
    schedule: str = option("cosine", choices=("cosine", "linear"))
    target: str = option("x0", choices=TARGETS)


@dataclass(frozen=True)
class WeightingConfig:
    strategy: str = option("dysigma_min_snr", choices=STRATEGIES)
    gamma: float = option(5.0, min=0.0, min_exclusive=True, doc="min_snr / dysigma_min_snr clip")
    clamp_max: float = option(10.0, min=0.0, min_exclusive=True, doc="dysigma weight upper clamp")
    fourier_features: int = option(128, min=1, max=4096, doc="learned u(t): random Fourier features")
    sigma_data: float = option(0.5, min=0.0, min_exclusive=True, doc="soft_min_snr")
    p2_k: float = option(1.0, min=0.0, min_exclusive=True)
    p2_gamma: float = option(1.0, min=0.0)
    buckets: int = option(10, min=1, max=1000, doc="t-buckets for weight logging")


@dataclass(frozen=True)
class ModelConfig:
    preset: str = option("vit-tiny", choices=PRESETS)
    patch_size: int = option(2, min=1, max=32)
    label_dropout: float = option(0.15, min=0.0, max=1.0)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = option(4000, min=0, max=STEPS_MAX)
    batch_size: int = option(64, min=1, max=BATCH_MAX, doc="global batch, split over workers")
    lr: float = option(1e-3, min=0.0, min_exclusive=True)
    betas: list = option([0.9, 0.99])
    weight_decay: float = option(0.03, min=0.0)
    ema_decay: float = option(0.995, min=0.0, max=1.0, max_exclusive=True, doc="1 would never move the EMA")
    grad_clip: float = option(1.0, min=0.0, doc="0 disables clipping")
    precision: str = option("auto", choices=PRECISIONS, doc="also the sweep's and evaluation's sampling")
    num_workers: int = option(1, min=1, max=4096)
    use_gpu: bool = option(False)
    cpus_per_worker: int = option(2, min=1, max=512)
    checkpoint_every: int = option(1000, min=1, max=STEPS_MAX)
    log_every: int = option(100, min=1, max=STEPS_MAX)
    max_nan_skips: int = option(3, min=0, max=STEPS_MAX, doc="non-finite losses skipped before the run stops")
    max_failures: int = option(2, min=0, max=1000, doc="Ray Train worker restarts from the last checkpoint")
    seed: int = option(0, min=0, max=SEED_MAX)


@dataclass(frozen=True)
class EvalConfig:
    every: int = option(1000, min=1, max=STEPS_MAX, doc="steps between FID evaluations of the EMA weights")
    num_samples: int = option(1000, min=2, max=SAMPLES_MAX)
    final_num_samples: int = option(5000, min=2, max=SAMPLES_MAX)
    sampler: str = option("dpmpp_2m", choices=SAMPLERS)
    sampling_steps: int = option(20, min=1, max=100000)
    spacing: str = option("leading", choices=SPACINGS, doc="timestep grid; leading never calls the model at T-1")
    clip_x0: bool = option(True, doc="clamp x0 to the per-channel range of the training latents")
    eta: float = option(0.0, min=0.0, max=1.0)
    cfg_scale: float = option(1.0, min=0.0, max=100.0)
    batch_size: int = option(500, min=1, max=BATCH_MAX)
    seed: int = option(1234, min=0, max=SEED_MAX)


@dataclass(frozen=True)
class FIDConfig:
    extractor: str = option("featurenet", choices=EXTRACTORS)
    weights_path: str = option("", doc="inception-v3-compat: local state_dict; empty = standard download")
    reference_stats: str = option("", doc="optional precomputed mu/sigma .npz (e.g. ADM VIRTUAL_imagenet)")


@dataclass(frozen=True)
class FeatureNetConfig:
    steps: int = option(1000, min=0, max=STEPS_MAX)
    batch_size: int = option(256, min=1, max=BATCH_MAX)
    lr: float = option(2e-3, min=0.0, min_exclusive=True)
    feature_dim: int = option(128, min=2, max=4096)
    seed: int = option(0, min=0, max=SEED_MAX)
    precision: str = option("auto", choices=PRECISIONS)


@dataclass(frozen=True)
class Params:
    data: DataConfig = field(default_factory=DataConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    weighting: WeightingConfig = field(default_factory=WeightingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    fid: FIDConfig = field(default_factory=FIDConfig)
    featurenet: FeatureNetConfig = field(default_factory=FeatureNetConfig)

    def validate(self) -> None:
        """Checks across fields (one field's range is checked as it is read). A subclass that adds
        sections (pipeline.config.PipelineParams) extends this."""
        _cross_checks(self)


def _type_ok(value: Any, tp: Any) -> bool:
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is list:
        return isinstance(value, list)
    return True


_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list"}


def _check_field(key: str, value: Any, f: dataclasses.Field, tp: Any) -> Any:
    if tp is float and isinstance(value, str):
        try:  # `dvc exp run -S train.lr=1e-5` writes 1e-05, which YAML 1.1 reads as a string
            value = float(value)
        except ValueError:
            raise ConfigError(f"{key}: got {shown(value)} (str), expected a number") from None
    if not _type_ok(value, tp):
        raise ConfigError(f"{key}: got {shown(value)} ({type(value).__name__}), expected {_TYPE_NAMES.get(tp, tp)}")
    if tp is float:
        try:
            value = float(value)
        except OverflowError:  # an integer of hundreds of digits
            raise ConfigError(f"{key}: got {shown(value)}, expected a number within float range") from None
        if not math.isfinite(value):
            raise ConfigError(f"{key}: got {value!r}, expected a finite number")
    if tp is list and len(value) > LIST_MAX:
        raise ConfigError(f"{key}: got a list of {len(value)} entries, expected at most {LIST_MAX}")
    m = f.metadata
    if m.get("choices") is not None and value not in m["choices"]:
        raise ConfigError(f"{key}: got {shown(value)}, expected one of {', '.join(map(repr, m['choices']))}")
    lo, hi = m.get("min"), m.get("max")
    if lo is not None and (value < lo or (m.get("min_exclusive") and value == lo)):
        rel = ">" if m.get("min_exclusive") else ">="
        raise ConfigError(f"{key}: got {shown(value)}, expected a value {rel} {lo}")
    if hi is not None and (value > hi or (m.get("max_exclusive") and value == hi)):
        rel = "<" if m.get("max_exclusive") else "<="
        raise ConfigError(f"{key}: got {shown(value)}, expected a value {rel} {hi}")
    return value


def build_section(cls: type, raw: Any, prefix: str):
    """Build dataclass `cls` from a mapping, refusing unknown keys and bad values."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'params'}: expected a mapping of keys, got {type(raw).__name__}")
    not_names = [k for k in raw if not isinstance(k, str)]
    if not_names:
        raise ConfigError(f"{prefix or 'params'}: keys must be names, got {shown(not_names[0])} "
                          f"({type(not_names[0]).__name__})")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"{prefix or 'params'}: unknown key(s) {', '.join(shown(k) for k in unknown[:5])}"
            f"{f' and {len(unknown) - 5} more' if len(unknown) > 5 else ''}; "
            f"allowed keys are {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_section(tp, value, key)
        else:
            kwargs[name] = _check_field(key, value, fields[name], tp)
    return cls(**kwargs)


def is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def need(cond: bool, msg: str) -> None:
    """Raise ConfigError(msg) unless `cond`: one cross-field check."""
    if not cond:
        raise ConfigError(msg)


def _cross_checks(p: Params) -> None:
    need(len(p.train.betas) == 2 and all(is_number(b) and 0 <= b < 1 for b in p.train.betas),
         f"train.betas: got {shown(p.train.betas)}, expected two numbers in [0, 1)")
    need(1 <= len(p.autoencoder.widths) <= 8 and all(is_count(w) and 0 < w <= 4096 for w in p.autoencoder.widths),
         f"autoencoder.widths: got {shown(p.autoencoder.widths)}, expected 1 to 8 integers in [1, 4096]")
    for section in ("autoencoder", "train", "featurenet"):
        batch, size = getattr(p, section).batch_size, TRAIN_SET_SIZES[p.data.dataset]
        need(batch <= size, f"{section}.batch_size: {batch} exceeds the {size} training images of "
                            f"data.dataset {p.data.dataset!r}")
    need(p.data.image_size % p.autoencoder.downsample == 0,
         f"autoencoder.downsample: {p.autoencoder.downsample} does not divide data.image_size "
         f"{p.data.image_size}")
    latent = p.data.image_size // p.autoencoder.downsample
    if p.autoencoder.kind == "sd-vae":
        need(p.autoencoder.downsample == 8, "autoencoder.downsample: sd-vae downsamples by 8; set it to 8")
        need(p.autoencoder.subspaces * p.autoencoder.channels == 4,
             f"autoencoder.subspaces x autoencoder.channels: {p.autoencoder.subspaces} x {p.autoencoder.channels} "
             f"must equal the 4 sd-vae latent channels (e.g. subspaces 2, channels 2)")
    need(latent % p.model.patch_size == 0,
         f"model.patch_size: {p.model.patch_size} does not divide the latent size {latent} "
         f"(data.image_size / autoencoder.downsample)")
    need(p.train.batch_size % p.train.num_workers == 0,
         f"train.batch_size: {p.train.batch_size} is not divisible by train.num_workers {p.train.num_workers}")
    need(p.train.precision != "fp16" or p.train.use_gpu,
         "train.precision: 'fp16' needs train.use_gpu: true (use 'auto', 'bf16' or 'fp32' on CPU)")
    need(p.eval.sampling_steps <= p.diffusion.timesteps,
         f"eval.sampling_steps: {p.eval.sampling_steps} exceeds diffusion.timesteps {p.diffusion.timesteps}")
    need(p.eval.eta == 0 or p.eval.sampler == "ddim",
         f"eval.eta: {p.eval.eta} only applies to eval.sampler 'ddim' (got {p.eval.sampler!r}); set it to 0")


def params_from_dict(raw: Any, cls: type[Params] = Params) -> Params:
    """Validated `cls` (Params, or a subclass with more sections) from a mapping of sections."""
    if not isinstance(raw, dict):
        raise ConfigError(f"params: expected a mapping of sections, got {type(raw).__name__}")
    p = build_section(cls, raw, "")
    p.validate()
    return p


# libyaml's parser where PyYAML has it: 10-50x faster than the pure-Python one, and it caps
# nesting depth (1000) with a clean error instead of Python's recursion limit
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _ParamsYamlLoader(_SAFE_LOADER):
    """yaml.safe_load's loader, refusing a repeated key: PyYAML keeps the last one without a word."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                repeated = key in seen
            except TypeError:
                raise yaml.constructor.ConstructorError(None, None, "a key that is a list or mapping",
                                                        key_node.start_mark) from None
            if repeated:
                raise yaml.constructor.ConstructorError(None, None, f"the key {shown(key)} appears twice",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    """`yaml.safe_load`, refusing what a params file never needs and what makes a load misleading
    or explosive: repeated keys, and aliases (`*name`: an alias bomb expands into billions of
    nodes in whatever walks or prints the result). Aliases are found in the event stream, before
    anything is built."""
    for event in yaml.parse(text, Loader=_SAFE_LOADER):
        if isinstance(event, yaml.AliasEvent):
            raise yaml.composer.ComposerError(None, None, f"YAML aliases (*{event.anchor}) are not allowed here",
                                              event.start_mark)
    loader = _ParamsYamlLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line: where and what (PyYAML's own message spans several lines)."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = getattr(e, "problem", None) or str(e)
    return where + " ".join(str(what).split())[:SHOWN_CHARS]


MAX_DEPTH = 6  # params -> section -> key -> list -> ...: deeper is no params file


def _too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    level = [value]
    for _ in range(limit):
        level = [v for x in level if isinstance(x, (dict, list))
                 for v in (x.values() if isinstance(x, dict) else x)]
        if not level:
            return False
    return any(isinstance(x, (dict, list)) for x in level)


def read_yaml(path: Path, *, missing_hint: str, error: type[ConfigError] = ConfigError) -> Any:
    """Safe YAML of a small UTF-8 file; anything else raises `error` as one line naming the path."""
    if not path.is_file():
        raise error(f"{path}: {missing_hint}")
    size = path.stat().st_size
    if size > PARAMS_FILE_MAX_BYTES:
        raise error(f"{path}: {size} bytes, expected a YAML file under {PARAMS_FILE_MAX_BYTES >> 20} MiB")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {_yaml_problem(e)}") from None
    except RecursionError:
        raise error(f"{path}: nested too deeply to be a params file") from None
    except ValueError as e:  # e.g. an integer beyond Python's 4300-digit conversion limit
        raise error(f"{path}: a value YAML cannot read: {' '.join(str(e).split())[:SHOWN_CHARS]}") from None
    if _too_deep(data):
        raise error(f"{path}: values nested more than {MAX_DEPTH} levels deep; a params value is a scalar or "
                    f"a list of scalars")
    return data


def load_params(path: str | Path = "params.yaml", cls: type[Params] = Params,
                overrides: Sequence[str] = ()) -> Params:
    """`path`, with `overrides` ("section.key=VALUE", VALUE in YAML) applied before validation.

    The file must name every section of `cls`, each a mapping (`{}` for all its defaults): an
    empty file, a section left out or left empty (`train:` alone is null) is refused rather than
    silently run on defaults. Keys left out of a section take their defaults (those of the
    repository's params.yaml).
    """
    path = Path(path)
    raw = read_yaml(path, missing_hint="params file not found (run from the repository root)")
    sections = [f.name for f in dataclasses.fields(cls)]
    if raw is None:
        raise ConfigError(f"{path}: the file is empty; expected the sections {', '.join(sections)}")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    if overrides:
        raw = apply_overrides(raw, overrides)
    missing = [name for name in sections if name not in raw]
    if missing:
        raise ConfigError(f"{path}: section(s) {', '.join(missing)} missing; every section of the repository's "
                          f"params.yaml must be present")
    empty = [name for name in sections if raw[name] is None]
    if empty:
        raise ConfigError(f"{path}: section {empty[0]} is empty (null); give its keys, or write "
                          f"`{empty[0]}: {{}}` for all its defaults")
    return params_from_dict(raw, cls)


def apply_overrides(raw: Any, overrides: Sequence[str]) -> dict:
    """A copy of the raw params mapping with each "section.key=VALUE" set, as `dvc exp run -S` does.

    VALUE is read as YAML (`[x0, eps]`, `0.5`, `true`); what it sets is validated with the rest.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"params: expected a mapping of sections, got {type(raw).__name__}")
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    for item in overrides:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name or "." in name:
            raise ConfigError(f"override {shown(item)}: expected section.key=VALUE, e.g. autoencoder.subspaces=1")
        try:
            value = parse_yaml(text)
        except (yaml.YAMLError, ValueError, RecursionError) as e:
            raise ConfigError(f"override {key}: VALUE {shown(text)} is not valid YAML ({type(e).__name__})") from None
        current = out.get(section)
        if current is None:
            current = {}
        if not isinstance(current, dict):
            raise ConfigError(f"{section}: expected a mapping of keys, got {type(current).__name__}")
        out[section] = {**current, name: value}
    return out


def replace(p: Params, section: str, **changes) -> Params:
    """A copy of `p` with fields of one section changed, re-validated."""
    return update(p, {section: changes})


def update(p: Params, changes: dict[str, dict]) -> Params:
    """A copy of `p` with fields of several sections changed, validated once."""
    raw = to_dict(p)
    for section, fields in changes.items():
        raw[section].update(fields)
    return params_from_dict(raw, type(p))


def to_dict(p: Any) -> dict:
    return dataclasses.asdict(p)

