"""Pre-encoded latent shards: the only thing diffusion training reads (docs/method.md).

Layout of a store directory (e.g. data/latents/):

    meta.json              K, C, h, w, num_classes, autoencoder_kind, per-split {n, shards,
                           labels} with each file's SHA-256, per-channel mean/std of the train split
    {split}-{i:05d}.npy    float32 [n_i, K*C, h, w] shards, in dataset order
    {split}-labels.npy     int64 [n] labels of the whole split

The per-channel mean and std are computed on the train split only and stored in
meta.json; `LatentStore.normalize` maps latents to ~zero mean, unit variance per channel.

The directory is written whole or not at all: `LatentStoreWriter` fills a temporary
sibling directory and renames it onto the final path when every split is written, so a
crash never leaves a directory that looks complete. A reader still checks every shard
against meta.json (content hash, then dtype and shape) and names the file and the fix when
one is off: a flipped byte in a shard's data area parses as a valid array, so only the hash
catches it.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch

from msdm.io import CorruptFileError, file_sha256

FORMAT_VERSION = 3  # 2: meta.json records the per-channel min/max; 3: and each file's SHA-256
META_NAME = "meta.json"
FIX = "Re-encode the dataset into a new store"


class LatentStoreError(CorruptFileError):
    """A latent store that is missing, incomplete, or disagrees with its meta.json."""


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}.npy"


def labels_name(split: str) -> str:
    return f"{split}-labels.npy"


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


class _ChannelMoments:
    """Streaming per-channel mean/std in float64 over (N, h, w)."""

    def __init__(self, channels: int):
        self.count = 0
        self.sum = np.zeros(channels, dtype=np.float64)
        self.sum_sq = np.zeros(channels, dtype=np.float64)
        self.min = np.full(channels, np.inf)
        self.max = np.full(channels, -np.inf)

    def update(self, z: np.ndarray) -> None:
        z64 = z.astype(np.float64, copy=False)
        self.count += z.shape[0] * z.shape[2] * z.shape[3]
        self.sum += z64.sum(axis=(0, 2, 3))
        self.sum_sq += np.square(z64).sum(axis=(0, 2, 3))
        self.min = np.minimum(self.min, z64.min(axis=(0, 2, 3)))
        self.max = np.maximum(self.max, z64.max(axis=(0, 2, 3)))

    def mean_std(self) -> tuple[list[float], list[float]]:
        mean = self.sum / self.count
        var = np.maximum(self.sum_sq / self.count - mean ** 2, 0.0)
        # A dead channel (std 0) would divide by zero; leave it unscaled instead.
        std = np.where(var > 1e-12, np.sqrt(var), 1.0)
        return mean.tolist(), std.tolist()


class LatentStoreWriter:
    """Write a whole latent store atomically.

        with LatentStoreWriter("data/latents", subspaces=3, channels=4, num_classes=10,
                               codec_kind="multispace") as writer:
            writer.write_split("train", batches_of_latents, train_labels)
            writer.write_split("test", ...)

    On a clean exit the train statistics and meta.json are written and the directory is
    renamed onto `out_dir` (replacing an older store); on an exception nothing changes.
    """

    def __init__(self, out_dir: str | Path, *, subspaces: int, channels: int, num_classes: int,
                 codec_kind: str, shard_size: int = 20000, extra: Mapping | None = None):
        if shard_size < 1:
            raise ValueError(f"encode.shard_size: got {shard_size}, expected >= 1")
        self.out_dir = Path(out_dir)
        self.subspaces, self.channels = int(subspaces), int(channels)
        self.num_classes, self.codec_kind = int(num_classes), str(codec_kind)
        self.shard_size = int(shard_size)
        self.extra = dict(extra or {})
        self.splits: dict[str, dict] = {}
        self.latent_hw: tuple[int, int] | None = None
        self.train_moments: _ChannelMoments | None = None
        self.tmp_dir: Path | None = None

    def __enter__(self) -> "LatentStoreWriter":
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_dir = Path(tempfile.mkdtemp(prefix=f".{self.out_dir.name}.", suffix=".tmp",
                                             dir=self.out_dir.parent))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._commit()
        finally:
            if self.tmp_dir is not None and self.tmp_dir.exists():
                shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def write_split(self, split: str, latent_batches: Iterable[torch.Tensor | np.ndarray],
                    labels: torch.Tensor | np.ndarray) -> None:
        """Consume batches of latents [b, K*C, h, w] (in label order) into shards of `shard_size`."""
        if self.tmp_dir is None:
            raise RuntimeError("LatentStoreWriter must be used as a context manager")
        if split in self.splits:
            raise ValueError(f"split {split!r} written twice")
        if not split.isidentifier():
            raise ValueError(f"split name {split!r}: expected letters, digits and underscores")
        labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).astype(np.int64)
        if labels.ndim != 1 or len(labels) == 0:
            raise ValueError(f"{split} labels: expected a non-empty shape [N], got {labels.shape}")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"{split} labels: range {labels.min()}..{labels.max()} outside 0..{self.num_classes - 1}")
        moments = _ChannelMoments(self.subspaces * self.channels) if split == "train" else None
        shards: list[dict] = []
        buffer: list[np.ndarray] = []
        buffered = total = 0

        def flush(rows: int) -> None:
            nonlocal buffer, buffered
            block = np.concatenate(buffer) if len(buffer) > 1 else buffer[0]
            shard, rest = block[:rows], block[rows:]
            name = shard_name(split, len(shards))
            np.save(self.tmp_dir / name, np.ascontiguousarray(shard, dtype=np.float32))
            _fsync_file(self.tmp_dir / name)
            shards.append({"file": name, "n": int(rows), "sha256": file_sha256(self.tmp_dir / name)})
            buffer, buffered = ([rest], len(rest)) if len(rest) else ([], 0)

        for batch in latent_batches:
            z = self._check_batch(split, batch)
            if moments is not None:
                moments.update(z)
            buffer.append(z)
            buffered += len(z)
            total += len(z)
            while buffered >= self.shard_size:
                flush(self.shard_size)
        if buffered:
            flush(buffered)
        if total != len(labels):
            raise ValueError(f"{split}: {total} latents but {len(labels)} labels")
        np.save(self.tmp_dir / labels_name(split), labels)
        _fsync_file(self.tmp_dir / labels_name(split))
        self.splits[split] = {"n": int(total), "shards": shards, "labels": labels_name(split),
                              "labels_sha256": file_sha256(self.tmp_dir / labels_name(split))}
        if moments is not None:
            self.train_moments = moments

    def _check_batch(self, split: str, batch: torch.Tensor | np.ndarray) -> np.ndarray:
        if isinstance(batch, torch.Tensor):
            batch = batch.detach().float().cpu().numpy()
        z = np.asarray(batch, dtype=np.float32)
        expected_c = self.subspaces * self.channels
        if z.ndim != 4 or z.shape[1] != expected_c:
            raise ValueError(f"{split}: latent batch of shape {z.shape}, expected [b, K*C={expected_c}, h, w]")
        if self.latent_hw is None:
            self.latent_hw = (z.shape[2], z.shape[3])
        elif (z.shape[2], z.shape[3]) != self.latent_hw:
            raise ValueError(f"{split}: latent batch of spatial size {z.shape[2:]}, earlier batches were "
                             f"{self.latent_hw}")
        if not np.isfinite(z).all():
            raise FloatingPointError(f"{split}: the encoder produced non-finite latents")
        return z

    def _commit(self) -> None:
        if "train" not in self.splits or self.train_moments is None:
            raise ValueError("a latent store needs a 'train' split: the normalisation statistics come from it")
        mean, std = self.train_moments.mean_std()
        meta = {
            "format": FORMAT_VERSION,
            "K": self.subspaces,
            "C": self.channels,
            "h": self.latent_hw[0],
            "w": self.latent_hw[1],
            "num_classes": self.num_classes,
            "autoencoder_kind": self.codec_kind,
            "stats_split": "train",
            "mean": mean,
            "std": std,
            # per-channel range of the raw train latents: the sampler's x0 clamp
            "min": self.train_moments.min.tolist(),
            "max": self.train_moments.max.tolist(),
            "splits": self.splits,
            "extra": self.extra,
        }
        meta_path = self.tmp_dir / META_NAME
        meta_path.write_text(json.dumps(meta, indent=2) + "\n")
        _fsync_file(meta_path)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp_dir, 0o777 & ~umask)  # mkdtemp made it private; the store is not
        _replace_dir(self.tmp_dir, self.out_dir)


def _replace_dir(src: Path, dest: Path) -> None:
    """Rename directory `src` onto `dest`; an existing `dest` is moved aside first.

    rename(2) cannot replace a non-empty directory, so the old one is renamed to a
    sibling, the new one takes its place, and the old one is deleted. Between the two
    renames `dest` is briefly absent, which a reader reports as "missing", never as a
    half-written store.
    """
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
        os.replace(dest, old / dest.name)
    os.replace(src, dest)
    fd = os.open(dest.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # persist the rename itself
    finally:
        os.close(fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_latents(out_dir: str | Path, splits: Mapping[str, tuple[Iterable, torch.Tensor | np.ndarray]], *,
                  subspaces: int, channels: int, num_classes: int, codec_kind: str,
                  shard_size: int = 20000, extra: Mapping | None = None) -> Path:
    """Write a whole store from {split: (latent batches, labels)}; 'train' is required."""
    with LatentStoreWriter(out_dir, subspaces=subspaces, channels=channels, num_classes=num_classes,
                           codec_kind=codec_kind, shard_size=shard_size, extra=extra) as writer:
        for split, (batches, labels) in splits.items():
            writer.write_split(split, batches, labels)
    return Path(out_dir)


_REQUIRED_META = ("format", "K", "C", "h", "w", "num_classes",
                  "autoencoder_kind", "mean", "std", "min", "max", "splits")


class LatentStore:
    """Read a latent store: `load(split)` -> (float32 latents [N, K*C, h, w], int64 labels [N])."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        meta_path = self.directory / META_NAME
        if not meta_path.is_file():
            where = "the directory does not exist" if not self.directory.is_dir() else f"{META_NAME} is missing"
            raise LatentStoreError(f"{meta_path}: no latent store here ({where}). {FIX}")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise LatentStoreError(f"{meta_path}: unreadable ({type(e).__name__}: {e}). {FIX}") from None
        missing = [k for k in _REQUIRED_META if not isinstance(meta, dict) or k not in meta]
        if missing:
            raise LatentStoreError(f"{meta_path}: missing key(s) {', '.join(missing)}. {FIX}")
        if meta["format"] != FORMAT_VERSION:
            raise LatentStoreError(f"{meta_path}: format {meta['format']!r}, this code reads {FORMAT_VERSION}. {FIX}")
        c = meta["K"] * meta["C"]
        for key in ("mean", "std", "min", "max"):
            if not isinstance(meta[key], list) or len(meta[key]) != c:
                raise LatentStoreError(f"{meta_path}: {key} must list K*C = {c} numbers. {FIX}")
        self.meta = meta
        self.mean = torch.tensor(meta["mean"], dtype=torch.float32)
        self.std = torch.tensor(meta["std"], dtype=torch.float32)

    @property
    def subspaces(self) -> int:
        return int(self.meta["K"])

    @property
    def channels(self) -> int:
        return int(self.meta["C"])

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(K*C, h, w)."""
        return (self.subspaces * self.channels, int(self.meta["h"]), int(self.meta["w"]))

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    def num_examples(self, split: str) -> int:
        return int(self._split_meta(split)["n"])

    def _split_meta(self, split: str) -> dict:
        if split not in self.meta["splits"]:
            raise LatentStoreError(f"{self.directory / META_NAME}: no split {split!r} (has "
                                   f"{', '.join(self.meta['splits'])}). {FIX}")
        return self.meta["splits"][split]

    def _open_npy(self, name: str, sha256: str) -> np.ndarray:
        path = self.directory / name
        if not path.is_file():
            raise LatentStoreError(f"{path}: shard listed in {META_NAME} is missing. {FIX}")
        # the content first: a flipped byte in the data area still parses as a valid array
        if file_sha256(path) != sha256:
            raise LatentStoreError(f"{path}: content does not match the SHA-256 in {META_NAME}; the file was "
                                   f"damaged or changed after it was written. {FIX}")
        try:
            return np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - numpy raises ValueError/OSError/EOFError on bad files
            raise LatentStoreError(f"{path}: not a readable .npy file, likely truncated "
                                   f"({type(e).__name__}: {e}). {FIX}") from None

    def shards(self, split: str) -> list[np.ndarray]:
        """The split's shards as read-only memory maps, each checked against meta.json."""
        expected = self.latent_shape
        arrays = []
        for entry in self._split_meta(split)["shards"]:
            z = self._open_npy(entry["file"], entry.get("sha256", ""))
            if z.dtype != np.float32 or z.shape != (entry["n"], *expected):
                raise LatentStoreError(
                    f"{self.directory / entry['file']}: holds {z.dtype} {z.shape}, meta.json says float32 "
                    f"{(entry['n'], *expected)}. {FIX}")
            arrays.append(z)
        return arrays

    def labels(self, split: str) -> torch.Tensor:
        info = self._split_meta(split)
        y = self._open_npy(info["labels"], info.get("labels_sha256", ""))
        if y.dtype != np.int64 or y.shape != (info["n"],):
            raise LatentStoreError(f"{self.directory / info['labels']}: holds {y.dtype} {y.shape}, "
                                   f"meta.json says int64 ({info['n']},). {FIX}")
        return torch.from_numpy(np.array(y))

    def load(self, split: str, normalized: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """All of a split in memory: (float32 latents [N, K*C, h, w], int64 labels [N])."""
        shards = self.shards(split)
        labels = self.labels(split)
        z = torch.from_numpy(np.concatenate(shards) if len(shards) > 1 else np.array(shards[0]))
        if z.shape[0] != labels.shape[0]:
            raise LatentStoreError(f"{self.directory}: {split} has {z.shape[0]} latents but "
                                   f"{labels.shape[0]} labels. {FIX}")
        return (self.normalize(z) if normalized else z), labels

    def _stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if z.ndim != 4 or z.shape[1] != self.mean.numel():
            raise ValueError(f"latents of shape {tuple(z.shape)}, expected [B, {self.mean.numel()}, h, w]")
        shape = (1, -1, 1, 1)
        return self.mean.to(z.device, z.dtype).view(shape), self.std.to(z.device, z.dtype).view(shape)

    def normalized_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (min, max) of the normalised train latents, each of shape [K*C]."""
        lo = (torch.tensor(self.meta["min"], dtype=torch.float32) - self.mean) / self.std
        hi = (torch.tensor(self.meta["max"], dtype=torch.float32) - self.mean) / self.std
        return lo, hi

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """Raw codec latents -> per-channel zero mean, unit std (train statistics)."""
        mean, std = self._stats(z)
        return (z - mean) / std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents (e.g. diffusion samples) -> raw latents for the codec's decoder."""
        mean, std = self._stats(z)
        return z * std + mean
