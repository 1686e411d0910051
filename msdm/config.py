"""`params.yaml` -> typed, validated dataclasses: the one source of truth for config.

Every section is a frozen dataclass. Each field declares its allowed values in its
metadata (`choices`, `min`, `max`), so that a bad value is refused with a message
naming the key, the value and what is allowed, before any compute starts.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml


class ConfigError(ValueError):
    """A params.yaml value that is missing, unknown, mistyped or out of range."""


def option(default: Any, *, choices=None, min=None, max=None, min_exclusive=False, doc: str = ""):
    """A config field: its default, and what values are allowed (checked when params are loaded)."""
    meta = {"choices": choices, "min": min, "max": max, "min_exclusive": min_exclusive, "doc": doc}
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
    steps: int = option(1750, min=0)
    batch_size: int = option(128, min=1)
    lr: float = option(2e-3, min=0.0, min_exclusive=True)
    seed: int = option(0, min=0)
    precision: str = option("auto", choices=PRECISIONS)


@dataclass(frozen=True)
class EncodeConfig:
    batch_size: int = option(1000, min=1)
    shard_size: int = option(20000, min=1)


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
    steps: int = option(4000, min=0)
    batch_size: int = option(64, min=1, doc="global batch, split over workers")
    lr: float = option(1e-3, min=0.0, min_exclusive=True)
    betas: list = option([0.9, 0.99])
    weight_decay: float = option(0.03, min=0.0)
    ema_decay: float = option(0.995, min=0.0, max=1.0)
    grad_clip: float = option(1.0, min=0.0, doc="0 disables clipping")
    precision: str = option("auto", choices=PRECISIONS, doc="also the sweep's and evaluation's sampling")
    num_workers: int = option(1, min=1, max=4096)
    use_gpu: bool = option(False)
    cpus_per_worker: int = option(2, min=1, max=512)
    checkpoint_every: int = option(1000, min=1)
    log_every: int = option(100, min=1)
    max_nan_skips: int = option(3, min=0, doc="non-finite losses skipped before the run stops")
    max_failures: int = option(2, min=0, doc="Ray Train worker restarts from the last checkpoint")
    seed: int = option(0, min=0)


@dataclass(frozen=True)
class EvalConfig:
    every: int = option(1000, min=1, doc="steps between FID evaluations of the EMA weights")
    num_samples: int = option(1000, min=2)
    final_num_samples: int = option(5000, min=2)
    sampler: str = option("dpmpp_2m", choices=SAMPLERS)
    sampling_steps: int = option(20, min=1)
    spacing: str = option("leading", choices=SPACINGS, doc="timestep grid; leading never calls the model at T-1")
    clip_x0: bool = option(True, doc="clamp x0 to the per-channel range of the training latents")
    eta: float = option(0.0, min=0.0, max=1.0)
    cfg_scale: float = option(1.0, min=0.0)
    batch_size: int = option(500, min=1)
    seed: int = option(1234, min=0)


@dataclass(frozen=True)
class FIDConfig:
    extractor: str = option("featurenet", choices=EXTRACTORS)
    weights_path: str = option("", doc="inception-v3-compat: local state_dict; empty = standard download")
    reference_stats: str = option("", doc="optional precomputed mu/sigma .npz (e.g. ADM VIRTUAL_imagenet)")


@dataclass(frozen=True)
class FeatureNetConfig:
    steps: int = option(1000, min=0)
    batch_size: int = option(256, min=1)
    lr: float = option(2e-3, min=0.0, min_exclusive=True)
    feature_dim: int = option(128, min=2, max=4096)
    seed: int = option(0, min=0)
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
            raise ConfigError(f"{key}: got {value!r} (str), expected a number") from None
    if not _type_ok(value, tp):
        raise ConfigError(f"{key}: got {value!r} ({type(value).__name__}), expected {_TYPE_NAMES.get(tp, tp)}")
    if tp is float:
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{key}: got {value!r}, expected a finite number")
    m = f.metadata
    if m.get("choices") is not None and value not in m["choices"]:
        raise ConfigError(f"{key}: got {value!r}, expected one of {', '.join(map(repr, m['choices']))}")
    lo, hi = m.get("min"), m.get("max")
    if lo is not None and (value < lo or (m.get("min_exclusive") and value == lo)):
        rel = ">" if m.get("min_exclusive") else ">="
        raise ConfigError(f"{key}: got {value!r}, expected a value {rel} {lo}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key}: got {value!r}, expected a value <= {hi}")
    return value


def build_section(cls: type, raw: Any, prefix: str):
    """Build dataclass `cls` from a mapping, refusing unknown keys and bad values."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix}: expected a mapping of keys, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"{prefix}: unknown key(s) {', '.join(map(repr, unknown))}; "
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


def need(cond: bool, msg: str) -> None:
    """Raise ConfigError(msg) unless `cond`: one cross-field check."""
    if not cond:
        raise ConfigError(msg)


def _cross_checks(p: Params) -> None:
    need(len(p.train.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in p.train.betas),
         f"train.betas: got {p.train.betas!r}, expected two numbers in [0, 1)")
    need(len(p.autoencoder.widths) >= 1 and all(isinstance(w, int) and not isinstance(w, bool) and w > 0
                                                for w in p.autoencoder.widths),
         f"autoencoder.widths: got {p.autoencoder.widths!r}, expected a non-empty list of positive integers")
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


def read_yaml(path: Path, *, missing_hint: str, error: type[ConfigError] = ConfigError) -> Any:
    """`yaml.safe_load` of a file; a missing file or bad YAML raises `error` naming the path."""
    if not path.is_file():
        raise error(f"{path}: {missing_hint}")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {e}") from None


def load_params(path: str | Path = "params.yaml", cls: type[Params] = Params,
                overrides: Sequence[str] = ()) -> Params:
    """`path`, with `overrides` ("section.key=VALUE", VALUE in YAML) applied before validation."""
    path = Path(path)
    raw = read_yaml(path, missing_hint="params file not found (run from the repository root)")
    raw = raw if raw is not None else {}
    if overrides:
        raw = apply_overrides(raw, overrides)
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
            raise ConfigError(f"override {item[:200]!r}: expected section.key=VALUE, e.g. autoencoder.subspaces=1")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {key}: VALUE {text[:200]!r} is not valid YAML ({type(e).__name__})") from None
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

