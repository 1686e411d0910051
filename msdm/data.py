"""Datasets: make them available on disk, verify them, and load them as [-1, 1] tensors.

Layouts under `data.root` (the directory `prepare()` returns is in brackets):

| dataset        | files                                                             |
|----------------|-------------------------------------------------------------------|
| fashion_mnist  | [root/FashionMNIST/raw]/{train,t10k}-{images,labels}-idx*-ubyte.gz |
| cifar10        | [root/cifar-10-batches-py]/{data_batch_1..5,test_batch,batches.meta} |
| celeba         | [root/celeba]/img_align_celeba/*.jpg + the torchvision annotation files |
| lsun_bedroom   | [root/lsun_bedroom]/**/*.{jpg,png,webp} or bedroom_{train,val}_lmdb/ |
| lsun_church    | [root/lsun_church]/**/*.{jpg,png,webp} or church_outdoor_{train,val}_lmdb/ |
| imagenet       | [root/imagenet]/{train,val}/<wnid>/*.JPEG (ILSVRC folders)          |

Fashion-MNIST is copied from Debian's `dataset-fashion-mnist` package when it is
installed (offline), else downloaded; CIFAR-10 and CelebA are downloaded by torchvision.
Every file with a published MD5 is checked against it. LSUN and ImageNet cannot be
downloaded automatically (size, licence): `prepare()` checks that the folders are there.

Large datasets should live outside `data/raw` (set `data.root`), because `data/raw` is a
DVC output: DVC would cache a copy of them and delete them before rerunning the stage.

Fashion-MNIST and CIFAR-10 are small enough to hold in memory as uint8 arrays
(`load_arrays`, ~1 s for Fashion-MNIST); the others stream from disk (`load_split`).
"""
from __future__ import annotations

import codecs
import functools
import gzip
import hashlib
import os
import pickle
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from msdm.config import DATASETS, ConfigError, DataConfig
from msdm.io import atomic_path

try:  # numpy >= 2 moved the pickle helpers; the CIFAR pickles name the numpy 1 paths
    from numpy._core import multiarray as _np_multiarray
    from numpy._core import numeric as _np_numeric
except ImportError:  # pragma: no cover - numpy 1
    from numpy.core import multiarray as _np_multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _np_numeric  # type: ignore[no-redef]


class DatasetError(RuntimeError):
    """A dataset that is missing, incomplete or corrupt; the message says how to fix it."""


SPLITS = ("train", "test")

SYSTEM_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
APT_FIX = "apt-get install -y dataset-fashion-mnist"
RERUN_FIX = "prepare the dataset again"  # the download stage's CLI adds its `dvc repro` command
DELETE_AND_RERUN = f"delete it and {RERUN_FIX}"

# MD5 of what those .gz files decompress to. Debian's package holds the same compressed
# stream, but its build (strip-nondeterminism) rewrote the gzip header (mtime, file name),
# so its .gz bytes no longer match the published MD5; the content still must match these.
FASHION_MNIST_CONTENT_MD5: dict[str, str] = {
    "train-images-idx3-ubyte.gz": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte.gz": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte.gz": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte.gz": "15d484375f8d13e6eb1aabb0c3f46965",
}
FASHION_MNIST_FILES = {  # split -> (images, labels)
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


# torchvision is imported on first use, not with this module: importing it costs about 1.5 s
# (its models pull in torch._dynamo), paid by every stage process and Ray worker otherwise.
# The tables below come from torchvision's dataset classes so there is one source for them.
@functools.cache
def _tables() -> dict:
    from torchvision.datasets import CIFAR10, CelebA, FashionMNIST

    return {
        "CLASS_NAMES": tuple(FashionMNIST.classes),  # Fashion-MNIST labels 0..9
        # published checksums of the .gz files
        "FASHION_MNIST_MD5": dict(FashionMNIST.resources),
        "CIFAR10_MD5": {**{name: md5 for name, md5 in CIFAR10.train_list + CIFAR10.test_list},
                        CIFAR10.meta["filename"]: CIFAR10.meta["md5"]},
        "CIFAR10_FILES": {"train": tuple(name for name, _ in CIFAR10.train_list),
                          "test": tuple(name for name, _ in CIFAR10.test_list)},
        # the images' zip may be deleted after extraction; the annotation files are needed
        "CELEBA_MD5": {name: md5 for _, md5, name in CelebA.file_list if not name.endswith(".zip")},
    }


_LAZY_TABLES = ("CLASS_NAMES", "FASHION_MNIST_MD5", "CIFAR10_MD5", "CIFAR10_FILES", "CELEBA_MD5")


def __getattr__(name: str):
    """CLASS_NAMES, FASHION_MNIST_MD5, CIFAR10_MD5, CIFAR10_FILES, CELEBA_MD5 (lazy, see above)."""
    if name in _LAZY_TABLES:  # checked first: the import system probes names such as __path__
        return _tables()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

LSUN_CATEGORY = {"lsun_bedroom": "bedroom", "lsun_church": "church_outdoor"}
NUM_CLASSES = {"fashion_mnist": 10, "cifar10": 10, "celeba": 1,
               "lsun_bedroom": 1, "lsun_church": 1, "imagenet": 1000}
CELEBA_CROP = 140  # the usual DDPM/DDIM CelebA crop of the 178x218 aligned faces


# ---------------------------------------------------------------------------- helpers


def _check_dataset(name: str) -> str:
    if name not in DATASETS:
        raise ConfigError(f"data.dataset: got {name!r}, expected one of {', '.join(map(repr, DATASETS))}")
    return name


def _check_split(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split: got {split!r}, expected one of {', '.join(map(repr, SPLITS))}")
    return split


def num_classes(cfg: DataConfig) -> int:
    """Number of labels; 1 for unconditional datasets (every label is 0)."""
    return NUM_CLASSES[_check_dataset(cfg.dataset)]


def image_channels(cfg: DataConfig) -> int:
    return 1 if _check_dataset(cfg.dataset) == "fashion_mnist" else 3


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> uint8 in [0, 255] (values outside are clipped)."""
    return ((x.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def from_uint8(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [-1, 1]; exact inverse of `to_uint8` on its outputs."""
    return x.to(torch.float32) / 127.5 - 1.0


def dataset_dir(cfg: DataConfig) -> Path:
    """The directory holding `cfg.dataset`'s files (see the module docstring)."""
    root = Path(cfg.root)
    if _check_dataset(cfg.dataset) == "fashion_mnist":
        return root / "FashionMNIST/raw"
    from torchvision.datasets import CIFAR10, CelebA

    sub = {"cifar10": CIFAR10.base_folder, "celeba": CelebA.base_folder}.get(cfg.dataset, cfg.dataset)
    return root / sub


def file_md5(path: str | Path) -> str:
    with open(path, "rb") as fh:  # not torchvision's calculate_md5: importing torchvision costs 1.5 s
        return hashlib.file_digest(fh, lambda: hashlib.md5(usedforsecurity=False)).hexdigest()


def gunzipped_md5(path: str | Path) -> str:
    """MD5 of a .gz file's decompressed content."""
    path = Path(path)
    try:
        data = gzip.decompress(path.read_bytes())
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path}: cannot be decompressed ({type(e).__name__}: {e}); the file is "
                           f"truncated or corrupt. Fix: {DELETE_AND_RERUN}") from None
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def verify_checksums(directory: str | Path, md5_table: dict[str, str], *,
                     content_md5: dict[str, str] | None = None, fix: str = DELETE_AND_RERUN) -> None:
    """Check every file of `md5_table` in `directory`; DatasetError names the first bad one.

    A .gz file listed in `content_md5` also passes when its decompressed content has that MD5.
    """
    directory = Path(directory)
    for name, expected in md5_table.items():
        _verify_file(directory / name, expected, (content_md5 or {}).get(name), fix=fix)


def _verify_file(path: Path, expected_md5: str, expected_content_md5: str | None = None, *,
                 fix: str = DELETE_AND_RERUN) -> None:
    if not path.is_file():
        raise DatasetError(f"{path}: {path.name} is missing. Fix: {RERUN_FIX}")
    actual = file_md5(path)
    if actual == expected_md5:
        return
    content = ""
    if expected_content_md5 is not None:
        actual_content = gunzipped_md5(path)
        if actual_content == expected_content_md5:
            return
        content = f"; decompressed md5 {actual_content}, expected {expected_content_md5}"
    raise DatasetError(
        f"{path}: checksum mismatch for {path.name} (md5 {actual}, expected {expected_md5}{content}; "
        f"{path.stat().st_size} bytes): the file is truncated or corrupt. Fix: {fix}"
    )


def _copy_atomically(src: Path, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)


def _iter_images(directory: Path) -> Iterator[Path]:
    """Image files under `directory`, any nesting, in a stable (sorted) order."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(IMG_EXTENSIONS):
                yield Path(dirpath) / name


def _has_images(directory: Path) -> bool:
    return directory.is_dir() and next(_iter_images(directory), None) is not None


# ---------------------------------------------------------------------------- prepare


def prepare(cfg: DataConfig, *, system_dir: str | Path = SYSTEM_FASHION_MNIST_DIR) -> Path:
    """Make `cfg.dataset` available under `cfg.root`, verify it, and return its directory.

    `system_dir` is where the Debian package puts Fashion-MNIST (a parameter so that tests
    can point it elsewhere). Raises DatasetError with the fix when the data cannot be had.
    """
    preparers: dict[str, Callable[[DataConfig, Path], Path]] = {
        "fashion_mnist": lambda c, d: _prepare_fashion_mnist(c, d, Path(system_dir)),
        "cifar10": _prepare_cifar10,
        "celeba": _prepare_celeba,
        "lsun_bedroom": _prepare_lsun,
        "lsun_church": _prepare_lsun,
        "imagenet": _prepare_imagenet,
    }
    return preparers[_check_dataset(cfg.dataset)](cfg, dataset_dir(cfg))


def _prepare_fashion_mnist(cfg: DataConfig, raw_dir: Path, system_dir: Path) -> Path:
    for name, md5 in _tables()["FASHION_MNIST_MD5"].items():
        dest = raw_dir / name
        if dest.is_file():
            continue  # verified below, with all the others
        src = system_dir / name
        if src.is_file():
            _verify_file(src, md5, FASHION_MNIST_CONTENT_MD5[name],
                         fix="the system copy is damaged; reinstall it: "
                             "apt-get install --reinstall -y dataset-fashion-mnist")
            _copy_atomically(src, dest)
        elif cfg.download:
            _download_fashion_mnist_file(name, md5, raw_dir)
        else:
            raise DatasetError(
                f"{dest}: Fashion-MNIST file {name} not found, {system_dir} does not have it either, "
                f"and data.download is false. Fix: {APT_FIX} (installs the files under {system_dir}), "
                f"or set data.download: true, or set data.root to a folder holding FashionMNIST/raw/{name}"
            )
    verify_checksums(raw_dir, _tables()["FASHION_MNIST_MD5"], content_md5=FASHION_MNIST_CONTENT_MD5)
    return raw_dir


def _download_fashion_mnist_file(name: str, md5: str, raw_dir: Path) -> None:
    from torchvision.datasets import FashionMNIST
    from torchvision.datasets.utils import download_url

    raw_dir.mkdir(parents=True, exist_ok=True)
    errors = []
    for mirror in FashionMNIST.mirrors:
        # Download next to the target and rename, so a broken download leaves nothing behind.
        with tempfile.TemporaryDirectory(dir=raw_dir, prefix=".download-") as tmp:
            try:
                download_url(f"{mirror}{name}", tmp, filename=name, md5=md5)
            except Exception as e:  # noqa: BLE001 - URLError, HTTPError, checksum RuntimeError, ...
                errors.append(f"{mirror}: {type(e).__name__}: {e}")
                continue
            os.replace(Path(tmp) / name, raw_dir / name)
            return
    raise DatasetError(
        f"{raw_dir / name}: could not download Fashion-MNIST file {name} ({'; '.join(errors)}). "
        f"Fix: {APT_FIX} to use the offline copy, or copy the file into {raw_dir}"
    )


def _prepare_cifar10(cfg: DataConfig, batch_dir: Path) -> Path:
    from torchvision.datasets import CIFAR10

    missing = [name for name in _tables()["CIFAR10_MD5"] if not (batch_dir / name).is_file()]
    if missing:
        if not cfg.download:
            raise DatasetError(
                f"{batch_dir}: CIFAR-10 file(s) {', '.join(missing)} not found and data.download is false. "
                f"Fix: set data.download: true, or extract cifar-10-python.tar.gz "
                f"(https://www.cs.toronto.edu/~kriz/cifar.html) into {cfg.root}"
            )
        try:  # torchvision checks the archive's MD5 before extracting it
            CIFAR10(cfg.root, train=True, download=True)
        except Exception as e:  # noqa: BLE001
            raise DatasetError(f"{batch_dir}: CIFAR-10 download failed ({type(e).__name__}: {e}). "
                               f"Fix: check the network, or extract cifar-10-python.tar.gz into {cfg.root}") from e
        archive = Path(cfg.root) / CIFAR10.filename
        archive.unlink(missing_ok=True)  # the extracted batches are all we read; keep the DVC out small
    verify_checksums(batch_dir, _tables()["CIFAR10_MD5"])
    return batch_dir


def _prepare_celeba(cfg: DataConfig, celeba_dir: Path) -> Path:
    from torchvision.datasets import CelebA

    image_dir = celeba_dir / "img_align_celeba"
    complete = all((celeba_dir / n).is_file() for n in _tables()["CELEBA_MD5"]) and _has_images(image_dir)
    if not complete:
        if not cfg.download:
            raise DatasetError(
                f"{celeba_dir}: CelebA not found (need img_align_celeba/ and {', '.join(_tables()['CELEBA_MD5'])}) "
                f"and data.download is false. Fix: set data.download: true, or unpack the aligned "
                f"CelebA files from https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html into {celeba_dir}"
            )
        try:  # torchvision downloads from Google Drive (needs `gdown`) and checks each MD5
            CelebA(cfg.root, split="all", target_type=[], download=True)
        except Exception as e:  # noqa: BLE001
            raise DatasetError(
                f"{celeba_dir}: CelebA download failed ({type(e).__name__}: {e}). Google Drive often "
                f"refuses it (quota) and it needs `pip install gdown`. Fix: download img_align_celeba.zip "
                f"and the annotation files by hand into {celeba_dir} and unzip the images there"
            ) from e
    verify_checksums(celeba_dir, _tables()["CELEBA_MD5"])
    if not _has_images(image_dir):
        raise DatasetError(f"{image_dir}: no images. Fix: unzip img_align_celeba.zip in {celeba_dir}")
    return celeba_dir


def _lsun_lmdb_dir(cfg: DataConfig, split: str) -> Path:
    lmdb_split = "train" if split == "train" else "val"  # LSUN's held-out split is called val
    return dataset_dir(cfg) / f"{LSUN_CATEGORY[cfg.dataset]}_{lmdb_split}_lmdb"


def _prepare_lsun(cfg: DataConfig, lsun_dir: Path) -> Path:
    if (_lsun_lmdb_dir(cfg, "train") / "data.mdb").is_file() or _has_images(lsun_dir):
        return lsun_dir
    category = LSUN_CATEGORY[cfg.dataset]
    raise DatasetError(
        f"{lsun_dir}: no LSUN {category} images found (LSUN is not downloaded automatically). "
        f"Fix: put the exported images under {lsun_dir} (any nesting; .jpg/.png/.webp), or the "
        f"lmdb database as {lsun_dir}/{category}_train_lmdb/data.mdb (https://github.com/fyu/lsun), "
        f"or set data.root to the folder that holds {cfg.dataset}/"
    )


def _prepare_imagenet(cfg: DataConfig, imagenet_dir: Path) -> Path:
    fix = (f"Fix: put the ILSVRC-2012 images under {imagenet_dir}/train/<wnid>/*.JPEG and "
           f"{imagenet_dir}/val/<wnid>/*.JPEG (ImageNet is not downloaded automatically; its licence "
           f"needs a login), or set data.root to the folder that holds imagenet/")
    _check_image_folder(imagenet_dir / "train", fix)
    if (imagenet_dir / "val").is_dir():
        _check_image_folder(imagenet_dir / "val", fix)
    return imagenet_dir


def _check_image_folder(split_dir: Path, fix: str) -> None:
    if not split_dir.is_dir():
        raise DatasetError(f"{split_dir}: not found. {fix}")
    class_dirs = [d for d in split_dir.iterdir() if d.is_dir()]
    if not class_dirs:
        loose = next(_iter_images(split_dir), None)
        hint = (" It holds images but no <wnid> class folders: sort them into one folder per class "
                "(for the ILSVRC val set, e.g. with the usual valprep.sh script)." if loose else "")
        raise DatasetError(f"{split_dir}: no class folders.{hint} {fix}")
    if not any(_has_images(d) for d in class_dirs):
        raise DatasetError(f"{split_dir}: class folders hold no images. {fix}")


# ---------------------------------------------------------------------------- raw readers

_IDX_DTYPE = {0x08: np.uint8}


def read_idx(path: str | Path) -> np.ndarray:
    """Decode one (gzipped) idx file, e.g. a Fashion-MNIST images or labels file.

    The whole file is decompressed at once and viewed with numpy: ~0.2 s for the 47 MB
    training images, against tens of seconds for one PIL image at a time.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: not found. Fix: {RERUN_FIX}")
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path}: cannot be decompressed ({type(e).__name__}: {e}); the file is "
                           f"truncated or corrupt. Fix: {DELETE_AND_RERUN}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPE or not 1 <= data[3] <= 4:
        raise DatasetError(f"{path}: not an unsigned-byte idx file (bad magic number {data[:4].hex()}). "
                           f"Fix: {DELETE_AND_RERUN}")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{path}: idx header is cut short ({len(data)} bytes); the file is truncated. "
                           f"Fix: {DELETE_AND_RERUN}")
    shape = tuple(int(v) for v in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise DatasetError(f"{path}: idx header says shape {shape} ({expected} bytes) but the file has "
                           f"{len(data)} bytes; it is truncated or corrupt. Fix: {DELETE_AND_RERUN}")
    return np.frombuffer(data, dtype=_IDX_DTYPE[data[2]], offset=header).reshape(shape)


def read_fashion_mnist(raw_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Unverified read of one split: uint8 images [N, 28, 28] and int64 labels [N].

    Checksums are `prepare()`'s job; this reads any well-formed idx files (tests use tiny ones).
    """
    images_name, labels_name = FASHION_MNIST_FILES[_check_split(split)]
    images = read_idx(Path(raw_dir) / images_name)
    labels = read_idx(Path(raw_dir) / labels_name)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetError(f"{raw_dir}: {images_name} has shape {images.shape} and {labels_name} has shape "
                           f"{labels.shape}; expected [N, H, W] images and [N] labels. Fix: {RERUN_FIX}")
    if labels.size and labels.max() >= len(_tables()["CLASS_NAMES"]):
        raise DatasetError(f"{Path(raw_dir) / labels_name}: label {labels.max()} is out of range 0..9")
    return images, labels.astype(np.int64)


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR batch holds (dicts, lists, numpy arrays): no code runs."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _np_multiarray._reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _np_multiarray._reconstruct,
        ("numpy.core.numeric", "_frombuffer"): _np_numeric._frombuffer,
        ("numpy._core.numeric", "_frombuffer"): _np_numeric._frombuffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # how protocol 2 stores bytes
    }

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}") from None


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DatasetError(f"{path}: CIFAR-10 file {path.name} not found. Fix: {RERUN_FIX}")
    try:
        with open(path, "rb") as fh:
            # latin1: the published batches are Python 2 pickles (what torchvision does too)
            batch = _CifarUnpickler(fh, encoding="latin1").load()
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except Exception as e:  # noqa: BLE001 - truncated/foreign pickles raise many types
        raise DatasetError(f"{path}: not a readable CIFAR-10 batch ({type(e).__name__}: {e}). "
                           f"Fix: {DELETE_AND_RERUN}") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(labels):
        raise DatasetError(f"{path}: data has shape {data.shape} with {len(labels)} labels; expected "
                           f"[N, 3072] and N labels. Fix: {DELETE_AND_RERUN}")
    return data.reshape(-1, 3, 32, 32), labels


def read_cifar10(batch_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Unverified read of one split: uint8 images [N, 3, 32, 32] and int64 labels [N]."""
    names = _tables()["CIFAR10_FILES"][_check_split(split)]
    parts = [_read_cifar_batch(Path(batch_dir) / name) for name in names]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


# ---------------------------------------------------------------------------- loading


def _pad_or_resize(images: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """uint8 [N, C, H, W] square images -> [N, C, size, size].

    Larger targets are padded with 0 (background, -1 after scaling): Fashion-MNIST's
    28 -> 32 as in the MNIST-family diffusion papers. Smaller ones are resized with
    antialiasing. Native size is returned as is.
    """
    native = images.shape[-1]
    if size == native:
        return images
    if size > native and images.shape[1] == 1:
        before = (size - native) // 2
        after = size - native - before
        return F.pad(images, (before, after, before, after), value=0)
    out = torch.empty(*images.shape[:2], size, size, dtype=torch.uint8)
    for start in range(0, len(images), chunk):
        x = images[start:start + chunk].float()
        y = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out[start:start + chunk] = y.round().clamp(0, 255).to(torch.uint8)
    return out


class ArrayDataset(Dataset):
    """uint8 images [N, C, S, S] + int64 labels -> (float32 image in [-1, 1], int label)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(labels):
            raise ValueError(f"ArrayDataset: expected uint8 [N, C, H, W] images and N labels, got "
                             f"{images.dtype} {tuple(images.shape)} and {len(labels)} labels")
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return from_uint8(self.images[i]), int(self.labels[i])


class ImageFilesDataset(Dataset):
    """Every image under a folder (any nesting, sorted), one label for all of them."""

    def __init__(self, directory: str | Path, transform: Callable, label: int = 0):
        from torchvision.datasets.folder import IMG_EXTENSIONS

        self.directory = Path(directory)
        self.paths = list(_iter_images(self.directory))
        if not self.paths:
            raise DatasetError(f"{self.directory}: no image files ({', '.join(IMG_EXTENSIONS)}). "
                               f"Fix: put the exported images there, or set data.root")
        self.transform, self.label = transform, label

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from torchvision.datasets.folder import default_loader

        return self.transform(default_loader(str(self.paths[i]))), self.label


class _Unconditional(Dataset):
    """Wraps a dataset of (image, anything) as (image, 0)."""

    def __init__(self, base: Dataset):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.base[i][0], 0


def _to_minus_one_one() -> list:
    from torchvision import transforms

    return [transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)]


def celeba_transform(size: int) -> Callable:
    from torchvision import transforms

    return transforms.Compose([transforms.CenterCrop(CELEBA_CROP), transforms.Resize(size, antialias=True),
                               *_to_minus_one_one()])


def center_crop_transform(size: int) -> Callable:
    """ADM-style preprocessing: resize the short side to `size` (bicubic, antialiased), center-crop."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
        transforms.CenterCrop(size), *_to_minus_one_one(),
    ])


def load_arrays(cfg: DataConfig, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images [N, C, S, S] and int64 labels [N] of one split, all in memory.

    Fast for Fashion-MNIST (~1 s) and CIFAR-10 (numpy decoding of the raw files). For
    CelebA, LSUN and ImageNet it decodes every image through `load_split`: slow, and the
    result is large (ImageNet train at S=256 is ~250 GB); use `load_split` for those.
    """
    _check_split(split)
    name = _check_dataset(cfg.dataset)
    if name == "fashion_mnist":
        images, labels = read_fashion_mnist(dataset_dir(cfg), split)
        images_t = torch.from_numpy(images.copy()).unsqueeze(1)  # copy: frombuffer views are read-only
    elif name == "cifar10":
        images, labels = read_cifar10(dataset_dir(cfg), split)
        images_t = torch.from_numpy(images)
    else:
        return _decode_all(load_split(cfg, split), desc=f"{name} {split}")
    return _pad_or_resize(images_t, cfg.image_size), torch.from_numpy(labels)


def _decode_all(dataset: Dataset, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    # Worker processes cost more to start than a few thousand images take to decode.
    workers = 0 if len(dataset) < 2048 else min(4, os.cpu_count() or 1)  # type: ignore[arg-type]
    loader = DataLoader(dataset, batch_size=256, num_workers=workers, shuffle=False)
    images, labels = [], []
    for x, y in tqdm(loader, desc=desc, disable=None):
        images.append(to_uint8(x))
        labels.append(torch.as_tensor(y, dtype=torch.int64))
    return torch.cat(images), torch.cat(labels)


def first_images(cfg: DataConfig, split: str, n: int) -> torch.Tensor:
    """uint8 [min(n, N), C, S, S]: the split's first images, decoded without reading the whole split."""
    dataset = load_split(cfg, split)
    return torch.stack([to_uint8(dataset[i][0]) for i in range(min(n, len(dataset)))])


def load_split(cfg: DataConfig, split: str) -> Dataset:
    """Dataset of (float32 image [C, S, S] in [-1, 1], int label); 'test' is the val split where needed."""
    from torchvision.datasets import CelebA, ImageFolder

    _check_split(split)
    name = _check_dataset(cfg.dataset)
    size = cfg.image_size
    if name in ("fashion_mnist", "cifar10"):
        return ArrayDataset(*load_arrays(cfg, split))
    if name == "celeba":
        try:
            base = CelebA(cfg.root, split=split, target_type=[], transform=celeba_transform(size))
        except RuntimeError as e:
            raise DatasetError(f"{dataset_dir(cfg)}: CelebA cannot be read ({e}). Fix: {RERUN_FIX}") from e
        return _Unconditional(base)
    if name in LSUN_CATEGORY:
        return _load_lsun(cfg, split)
    folder = dataset_dir(cfg) / ("train" if split == "train" else "val")
    _check_image_folder(folder, f"Fix: put the ILSVRC-2012 images under {folder}/<wnid>/*.JPEG, or set data.root")
    return ImageFolder(folder, transform=center_crop_transform(size))


def _load_lsun(cfg: DataConfig, split: str) -> Dataset:
    """Exported images (with optional train/ and val/ or test/ subfolders) or the lmdb database.

    Without split subfolders, both splits are the whole folder: generative FID on LSUN is
    measured against the training images.
    """
    from torchvision.datasets import LSUN

    lsun_dir = dataset_dir(cfg)
    transform = center_crop_transform(cfg.image_size)
    lmdb_dir = _lsun_lmdb_dir(cfg, split)
    if (lmdb_dir / "data.mdb").is_file():
        try:
            return _Unconditional(LSUN(str(lsun_dir), classes=[lmdb_dir.name[: -len("_lmdb")]],
                                       transform=transform))
        except ImportError as e:
            raise DatasetError(f"{lmdb_dir}: reading LSUN lmdb needs the `lmdb` package ({e}). "
                               f"Fix: pip install lmdb, or export the images to {lsun_dir}") from e
    candidates = ["train"] if split == "train" else ["val", "test"]
    for sub in candidates:
        if _has_images(lsun_dir / sub):
            return ImageFilesDataset(lsun_dir / sub, transform)
    return ImageFilesDataset(lsun_dir, transform)


# ---------------------------------------------------------------------------- manifest


def _file_entry(path: Path) -> dict:
    entry = {"bytes": path.stat().st_size, "md5": file_md5(path)}
    if path.suffix == ".gz":
        entry["content_md5"] = gunzipped_md5(path)
    return entry


def _image_listing(directory: Path) -> dict:
    """Count, total size and a fingerprint (MD5 of sorted 'path<TAB>bytes' lines) of all images.

    Hashing the contents of millions of files would take hours; the listing catches
    added, removed, renamed and resized files.
    """
    digest = hashlib.md5(usedforsecurity=False)
    count = total = 0
    for path in _iter_images(directory):
        size = path.stat().st_size
        digest.update(f"{path.relative_to(directory)}\t{size}\n".encode())
        count += 1
        total += size
    return {"count": count, "bytes": total, "listing_md5": digest.hexdigest()}


def num_examples(cfg: DataConfig, split: str) -> int:
    """Number of examples in a split, read cheaply where the format allows."""
    _check_split(split)
    name = _check_dataset(cfg.dataset)
    if name == "fashion_mnist":
        return len(read_idx(dataset_dir(cfg) / FASHION_MNIST_FILES[split][1]))
    if name == "cifar10":
        return len(read_cifar10(dataset_dir(cfg), split)[1])
    if name == "imagenet" and split == "test" and not (dataset_dir(cfg) / "val").is_dir():
        return 0
    return len(load_split(cfg, split))  # type: ignore[arg-type]


def build_manifest(cfg: DataConfig, directory: str | Path) -> dict:
    """What `prepare()` made available: files (bytes, md5), or an image listing, and split sizes."""
    directory = Path(directory)
    name = _check_dataset(cfg.dataset)
    md5_tables = {"fashion_mnist": _tables()["FASHION_MNIST_MD5"], "cifar10": _tables()["CIFAR10_MD5"],
                  "celeba": _tables()["CELEBA_MD5"]}
    manifest: dict = {
        "dataset": name,
        "root": str(cfg.root),
        "directory": str(directory),
        "image_size": cfg.image_size,
        "channels": image_channels(cfg),
        "num_classes": num_classes(cfg),
        "files": {n: _file_entry(directory / n) for n in md5_tables.get(name, {})},
        "num_examples": {split: num_examples(cfg, split) for split in SPLITS},
    }
    if name not in ("fashion_mnist", "cifar10"):
        image_root = directory / "img_align_celeba" if name == "celeba" else directory
        manifest["images"] = _image_listing(image_root)
    return manifest
