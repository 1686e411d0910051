"""FID through torch-fidelity, with Inception-V3 or an offline domain classifier as features.

Extractors (the `fid.extractor` config names):

- ``inception-v3-compat``: torch-fidelity's own TF-compatible Inception-V3 (2048-d pool3
  features). Weights come from `fid.weights_path` (a local state_dict) or, when that is
  empty, torch-fidelity's release URL (cached by torch.hub).
- ``featurenet``: the FeatureNet classifier of `msdm.models.featurenet`, trained on the
  dataset by the `featurenet` stage and registered with torch-fidelity as
  ``msdm-featurenet``; its weights file reaches it as torch-fidelity's
  `feature_extractor_weights_path`. Its FID is reported as ``fid_featurenet``, never as
  plain "FID": numbers from a domain classifier are not comparable to Inception FIDs.

Reference statistics (mu, sigma of the real test split's features) are computed once
by the `fid_ref` stage and stored as an ADM-compatible .npz (keys `mu`, `sigma`, plus
`extractor`, the extractor's config name). Generated samples are then scored against
them with torch-fidelity's `fid_featuresdict_to_statistics` / `fid_statistics_to_metric`
rather than `calculate_metrics`, which would re-extract the reference set at every
evaluation. torch-fidelity's own disk cache is never used (it unpickles with
weights_only=False and keys entries by name only).
"""
from __future__ import annotations

import functools
import io
import sys
import urllib.error
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torch_fidelity
from torch import Tensor
from torch.utils.data import Dataset
from torch_fidelity import FeatureExtractorBase, FeatureExtractorInceptionV3
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_featuresdict_to_statistics, fid_statistics_to_metric
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

from msdm.config import ConfigError, DataConfig
from msdm.data import from_uint8, load_arrays, load_split, to_uint8
from msdm.io import CorruptFileError, atomic_path, safe_torch_load
from msdm.models.featurenet import FeatureNet, load_featurenet

FEATURENET = "featurenet"
INCEPTION = "inception-v3-compat"
EXTRACTORS = (FEATURENET, INCEPTION)
FEATURENET_EXTRACTOR_NAME = "msdm-featurenet"  # the name registered with torch-fidelity
# config name -> (torch-fidelity extractor name, FID feature layer, metric name)
_EXTRACTOR_SPECS = {
    FEATURENET: (FEATURENET_EXTRACTOR_NAME, "features", "fid_featurenet"),
    INCEPTION: (INCEPTION, "2048", "fid_inception"),
}
INCEPTION_FEATURE_DIM = 2048
IN_MEMORY_DATASETS = ("fashion_mnist", "cifar10")  # msdm.data.load_arrays is fast for these
MIN_IMAGES_FOR_WORKERS = 2048  # streamed datasets smaller than this decode in the main process
# ITU-R BT.601 luma, the weights PIL uses for RGB -> L.
_LUMA = (0.299, 0.587, 0.114)


class MissingReferenceStatsError(FileNotFoundError):
    """The reference statistics file is not there; the message says which stage makes it."""


# ---------------------------------------------------------------------------- extractors


def _adapt_channels(x: Tensor, channels: int) -> Tensor:
    """float images [N, C, H, W] -> [N, channels, H, W]: grey <-> RGB, nothing else."""
    if x.shape[1] == channels:
        return x
    if x.shape[1] == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1)
    if x.shape[1] == 3 and channels == 1:
        weights = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * weights).sum(1, keepdim=True)
    raise ValueError(f"cannot convert {x.shape[1]}-channel images to the {channels} channels the extractor takes")


class FeatureNetExtractor(FeatureExtractorBase):
    """torch-fidelity feature extractor around a FeatureNet checkpoint.

    Takes uint8 [N, C, H, W] as torch-fidelity provides; 1- and 3-channel inputs are
    converted to the channels the net was trained on, other sizes are resized to its size.
    Features: ``features`` (the penultimate layer, used for FID/KID/PRC) and ``logits``.
    """

    def __init__(self, name: str, features_list, feature_extractor_weights_path: str | None = None, **kwargs):
        super().__init__(name, features_list)
        if not feature_extractor_weights_path:
            raise ValueError(f"feature extractor {name!r}: feature_extractor_weights_path is required "
                             f"(the FeatureNet checkpoint)")
        self.net: FeatureNet = load_featurenet(feature_extractor_weights_path)
        self.requires_grad_(False)
        self.eval()

    @staticmethod
    def get_provided_features_list():
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @property
    def feature_dim(self) -> int:
        return self.net.config["feature_dim"]

    def forward(self, x: Tensor):
        if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.ndim == 4):
            raise ValueError(f"{self.name}: expected uint8 images [N, C, H, W], got "
                             f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
        x = _adapt_channels(from_uint8(x), self.net.in_channels)
        size = self.net.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        features, logits = self.net.features_and_logits(x)
        by_name = {"features": features, "logits": logits}
        return tuple(by_name[name].to(torch.float32) for name in self.features_list)


def register_featurenet_extractor() -> None:
    """Register FeatureNetExtractor with torch-fidelity (idempotent: import may happen twice)."""
    registered = FEATURE_EXTRACTORS_REGISTRY.get(FEATURENET_EXTRACTOR_NAME)
    if registered is None:
        torch_fidelity.register_feature_extractor(FEATURENET_EXTRACTOR_NAME, FeatureNetExtractor)
    elif registered.__qualname__ != FeatureNetExtractor.__qualname__:
        raise RuntimeError(f"torch-fidelity already has a different extractor named {FEATURENET_EXTRACTOR_NAME!r}: "
                           f"{registered!r}")


register_featurenet_extractor()


def metric_name(extractor: str) -> str:
    """The reported name of the FID under `extractor`: 'fid_featurenet' or 'fid_inception'."""
    return _spec(extractor)[2]


def _spec(extractor: str) -> tuple[str, str, str]:
    if extractor not in _EXTRACTOR_SPECS:
        raise ValueError(f"fid.extractor: got {extractor!r}, expected one of {', '.join(map(repr, EXTRACTORS))}")
    return _EXTRACTOR_SPECS[extractor]


def _inception_weights_bytes(weights_path: str) -> io.BytesIO:
    """Inception state_dict, loaded weights-only, re-serialised in memory.

    torch-fidelity's constructor unpickles a local weights file with weights_only=False.
    Handing it a buffer we serialised from a weights-only load means it only ever unpickles
    plain tensors, whatever the file on disk holds.
    """
    if weights_path:
        if not Path(weights_path).is_file():
            raise ConfigError(f"fid.weights_path: {weights_path} not found. Fix: point it at torch-fidelity's "
                              f"Inception-V3 weights ({URL_INCEPTION_V3.rsplit('/', 1)[1]}), or set it to '' "
                              f"to download them")
        state_dict = safe_torch_load(weights_path)
    else:
        try:
            state_dict = torch.hub.load_state_dict_from_url(URL_INCEPTION_V3, map_location="cpu",
                                                            progress=sys.stderr.isatty(), weights_only=True)
        except (urllib.error.URLError, OSError) as e:
            raise ConfigError(
                f"fid.weights_path is empty, so the Inception-V3 weights are downloaded from {URL_INCEPTION_V3}, "
                f"and that failed ({type(e).__name__}: {e}). Fix: download that file elsewhere and set "
                f"fid.weights_path to it, or use fid.extractor: featurenet") from None
    if not isinstance(state_dict, dict):
        raise CorruptFileError(f"{weights_path or URL_INCEPTION_V3}: not an Inception-V3 state_dict "
                               f"(got {type(state_dict).__name__}). Fix: point fid.weights_path at "
                               f"torch-fidelity's weights-inception-2015-12-05-6726825d.pth")
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return buffer


def _weights_stamp(weights_path: str) -> tuple:
    """Identity of a weights file for the extractor cache: a rewritten file is reloaded."""
    if not weights_path:
        return ("",)
    path = Path(weights_path)
    if not path.is_file():
        return (str(path),)  # the load below raises the clear error
    stat = path.stat()
    return str(path.resolve()), stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=2)
def _cached_extractor(extractor: str, weights_path: str, stamp: tuple, device: str) -> FeatureExtractorBase:
    tf_name, layer, _ = _spec(extractor)
    cuda = device == "cuda"
    if extractor == FEATURENET:
        if not weights_path:
            raise ValueError("fid.extractor 'featurenet' needs the path of its checkpoint")
        return create_feature_extractor(tf_name, [layer], cuda=cuda, verbose=False,
                                        feature_extractor_weights_path=weights_path)
    weights = _inception_weights_bytes(weights_path)
    try:
        return create_feature_extractor(tf_name, [layer], cuda=cuda, verbose=False,
                                        feature_extractor_weights_path=weights)
    except RuntimeError as e:  # load_state_dict: missing/unexpected keys or shape mismatch
        raise CorruptFileError(f"{weights_path or URL_INCEPTION_V3}: not a state_dict of torch-fidelity's "
                               f"Inception-V3 ({str(e).splitlines()[0]}). Fix: point fid.weights_path at "
                               f"torch-fidelity's weights-inception-2015-12-05-6726825d.pth") from None


def get_extractor(extractor: str, weights_path: str = "", device: str | None = None) -> FeatureExtractorBase:
    """The torch-fidelity extractor for a config name, built once per (weights file, device)."""
    _spec(extractor)
    device = _default_device(device)
    return _cached_extractor(extractor, str(weights_path or ""), _weights_stamp(str(weights_path or "")), device)


def _default_device(device: str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device: got {device!r}, expected 'cpu' or 'cuda'")
    return device


def feature_dim(extractor: str, weights_path: str = "") -> int:
    """Size of the FID feature vector, without building the extractor."""
    _spec(extractor)
    if extractor == INCEPTION:
        return INCEPTION_FEATURE_DIM
    return load_featurenet(weights_path).config["feature_dim"]



# ---------------------------------------------------------------------------- features and statistics


class Uint8ImageDataset(Dataset):
    """Images as the Dataset torch-fidelity reads: one uint8 [C, H, W] tensor per item.

    `source` is an in-memory uint8 tensor [N, C, H, W], or a dataset of (float image in
    [-1, 1], label) pairs such as `msdm.data.load_split` (streamed, for large datasets).
    `channels=3` turns grey images into RGB (Inception-V3 takes only RGB).
    """

    def __init__(self, source: Tensor | Dataset, channels: int | None = None):
        self.source, self.channels = source, channels

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> Tensor:
        image = self.source[i]
        if isinstance(image, (tuple, list)):
            image = to_uint8(image[0])
        if self.channels == 3 and image.shape[0] == 1:
            image = image.expand(3, -1, -1)
        return image


def check_images(images_u8, what: str = "samples") -> Tensor:
    """uint8 [N >= 2, C in (1, 3), H, W] as a CPU tensor, or a ValueError saying what is wrong."""
    if isinstance(images_u8, np.ndarray):
        images_u8 = torch.from_numpy(images_u8)
    if not torch.is_tensor(images_u8):
        raise ValueError(f"{what}: expected a uint8 torch.Tensor [N, C, H, W], got {type(images_u8).__name__}")
    if images_u8.dtype != torch.uint8:
        raise ValueError(f"{what}: expected dtype uint8 (0..255), got {images_u8.dtype}; "
                         f"convert [-1, 1] images with msdm.data.to_uint8")
    if images_u8.ndim != 4 or images_u8.shape[1] not in (1, 3):
        raise ValueError(f"{what}: expected shape [N, C, H, W] with C = 1 or 3, got {tuple(images_u8.shape)}")
    if len(images_u8) < 2:
        raise ValueError(f"{what}: got {len(images_u8)} image(s); a covariance needs at least 2")
    return images_u8.cpu()


def extract_features(images: Tensor | Dataset, feat_extractor: FeatureExtractorBase, batch_size: int = 500,
                     *, verbose: bool = False) -> Tensor:
    """Features [N, D] of the FID layer, through torch-fidelity's dataset loop.

    In-memory tensors and small datasets are read without worker processes (starting them
    costs more than they save); large streamed datasets use torch-fidelity's workers to decode.
    """
    channels = 3 if isinstance(feat_extractor, FeatureExtractorInceptionV3) else None
    cuda = next(feat_extractor.parameters()).is_cuda
    no_workers = torch.is_tensor(images) or len(images) < MIN_IMAGES_FOR_WORKERS  # type: ignore[arg-type]
    featuresdict = get_featuresdict_from_dataset(Uint8ImageDataset(images, channels), feat_extractor,
                                                 batch_size, cuda, save_cpu_ram=no_workers, verbose=verbose)
    (layer,) = feat_extractor.get_requested_features_list()
    return featuresdict[layer]


def _statistics(features: Tensor, layer: str) -> dict:
    stats = fid_featuresdict_to_statistics({layer: features.to(torch.float64)}, layer)
    return {"mu": np.asarray(stats["mu"], np.float64), "sigma": np.asarray(stats["sigma"], np.float64)}


def reference_statistics(images: Tensor | Dataset, extractor: str = FEATURENET, weights_path: str = "",
                         batch_size: int = 500, *, device: str | None = None,
                         verbose: bool | None = None) -> dict:
    """{'mu': float64 [D], 'sigma': float64 [D, D]} of real images under `extractor`.

    `images`: uint8 [N, C, H, W], or a dataset of (float image in [-1, 1], label) pairs.
    """
    if torch.is_tensor(images) or isinstance(images, np.ndarray):
        images = check_images(images, "reference images")
    elif not isinstance(images, Dataset) or len(images) < 2:  # type: ignore[arg-type]
        raise ValueError(f"reference images: expected a uint8 tensor [N, C, H, W] or a Dataset of at least "
                         f"2 (image, label) pairs, got {type(images).__name__}")
    feat_extractor = get_extractor(extractor, weights_path, device)
    verbose = sys.stderr.isatty() if verbose is None else verbose
    features = extract_features(images, feat_extractor, batch_size, verbose=verbose)
    return _statistics(features, feat_extractor.get_requested_features_list()[0])


def real_test_images(data_cfg: DataConfig) -> Tensor | Dataset:
    """The real test split for reference statistics.

    Held in memory where msdm.data loads it fast (Fashion-MNIST, CIFAR-10); streamed and
    decoded on the fly for the image-folder datasets, whose test split may not fit in RAM.
    """
    if data_cfg.dataset in IN_MEMORY_DATASETS:
        return load_arrays(data_cfg, "test")[0]
    return load_split(data_cfg, "test")


def frechet_distance(stats_a: dict, stats_b: dict) -> float:
    """Frechet distance between two Gaussians {'mu', 'sigma'}, by torch-fidelity."""
    a = {k: np.asarray(stats_a[k], np.float64) for k in ("mu", "sigma")}
    b = {k: np.asarray(stats_b[k], np.float64) for k in ("mu", "sigma")}
    if a["mu"].shape != b["mu"].shape or a["sigma"].shape != b["sigma"].shape:
        raise ValueError(f"FID statistics do not match: mu {a['mu'].shape} vs {b['mu'].shape}, "
                         f"sigma {a['sigma'].shape} vs {b['sigma'].shape}")
    return float(fid_statistics_to_metric(a, b, verbose=False)[KEY_METRIC_FID])


# ---------------------------------------------------------------------------- stats files


def save_stats(path: str | Path, stats: dict, *, extractor: str | None = None) -> None:
    """Write {'mu', 'sigma'} (float64) and the extractor's config name to an .npz, atomically."""
    arrays = {"mu": np.asarray(stats["mu"], np.float64), "sigma": np.asarray(stats["sigma"], np.float64)}
    _check_stats_arrays(arrays, Path(path), fix="")
    if extractor is not None:
        _spec(extractor)
        arrays["extractor"] = np.array(extractor)  # a unicode array: loads without pickle
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)  # a file handle, because np.savez appends '.npz' to other names


def load_stats(path: str | Path, *, fix: str = "") -> dict:
    """{'mu', 'sigma', 'extractor' (None for foreign files, e.g. ADM's)} from an .npz.

    `fix`, if given, is the remedy the errors name; without it they name the file and the fault.
    """
    path = Path(path)
    fix = f" Fix: {fix}" if fix else ""
    if not path.is_file():
        raise MissingReferenceStatsError(f"{path}: FID reference statistics not found.{fix}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            # only these keys: ADM reference batches also carry every image (GBs) as arr_0
            contents = {k: npz[k] for k in ("mu", "sigma", "extractor") if k in npz.files}
            found = sorted(npz.files)
    except Exception as e:  # noqa: BLE001 - zipfile/pickle/value errors for bad files
        raise CorruptFileError(f"{path}: not a readable .npz of FID statistics "
                               f"({type(e).__name__}: {e}).{fix}") from None
    missing = [k for k in ("mu", "sigma") if k not in contents]
    if missing:
        raise CorruptFileError(f"{path}: FID statistics need keys 'mu' and 'sigma'; missing {missing}, "
                               f"found {found}.{fix}")
    stats = {"mu": contents["mu"].astype(np.float64), "sigma": contents["sigma"].astype(np.float64)}
    _check_stats_arrays(stats, path, fix)
    extractor = contents.get("extractor")
    stats["extractor"] = str(extractor) if extractor is not None else None
    return stats


def _check_stats_arrays(stats: dict, path: Path, fix: str) -> None:
    mu, sigma = stats["mu"], stats["sigma"]
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise CorruptFileError(f"{path}: FID statistics need mu [D] and sigma [D, D]; got mu {mu.shape} "
                               f"and sigma {sigma.shape}.{fix}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise CorruptFileError(f"{path}: FID statistics contain NaN or inf.{fix}")


def check_stats_match(stats: dict, extractor: str, feature_dim: int, path: str | Path,
                      fix: str = "") -> None:
    """Refuse statistics made with another extractor or of another feature size."""
    recorded = stats.get("extractor")
    fix = f" Fix: {fix}" if fix else ""
    if recorded is not None and recorded != extractor:
        raise CorruptFileError(f"{path}: statistics were computed with extractor {recorded!r}, but "
                               f"fid.extractor is {extractor!r}.{fix}")
    if stats["mu"].shape[0] != feature_dim:
        raise CorruptFileError(f"{path}: statistics have {stats['mu'].shape[0]} features, the {extractor!r} "
                               f"extractor gives {feature_dim}.{fix}")


# ---------------------------------------------------------------------------- FID


def compute_fid(samples_u8: Tensor, ref_stats_path: str | Path, extractor: str = FEATURENET,
                weights_path: str = "", batch_size: int = 500, *, device: str | None = None) -> dict:
    """FID of uint8 samples [N, C, H, W] against stored reference statistics.

    Returns {'name': 'fid_featurenet' | 'fid_inception', 'value', 'extractor', 'num_samples'}.
    `weights_path`: the FeatureNet checkpoint for 'featurenet'; a local Inception state_dict
    or '' (download) for 'inception-v3-compat'. The extractor is built once and cached.
    """
    samples_u8 = check_images(samples_u8, "samples")
    _, layer, name = _spec(extractor)
    ref = load_stats(ref_stats_path)  # before any compute: a missing file fails fast
    feat_extractor = get_extractor(extractor, weights_path, device)
    dim = INCEPTION_FEATURE_DIM if extractor == INCEPTION else feat_extractor.feature_dim
    check_stats_match(ref, extractor, dim, ref_stats_path)
    features = extract_features(samples_u8, feat_extractor, batch_size)
    value = frechet_distance(_statistics(features, layer), ref)
    return {"name": name, "value": value, "extractor": extractor, "num_samples": len(samples_u8)}


def extractor_weights_path(extractor: str, fid_weights_path: str, featurenet_path: str | Path) -> str:
    """The weights file an extractor reads: the FeatureNet checkpoint, or `fid.weights_path`."""
    _spec(extractor)
    return str(featurenet_path) if extractor == FEATURENET else fid_weights_path
