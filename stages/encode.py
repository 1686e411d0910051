"""DVC stage `encode`: encode the train and test splits once into latent shards.

    python -m stages.encode [--params params.yaml]

Reads the `data`, `autoencoder` and `encode` sections and models/autoencoder.pt (the
trained multi-space autoencoder, or the SD VAE the autoencoder stage imported); writes
data/latents/ (msdm.latents format: float32 shards, labels, meta.json with the train
split's per-channel mean/std). Encoding runs in fp32 under inference mode: it is a small
share of the pipeline's time and keeps the stored latents free of bf16 rounding.

Fashion-MNIST and CIFAR-10 are encoded from in-memory arrays; the image-folder datasets
(CelebA, LSUN, ImageNet) are streamed through a DataLoader, because ImageNet's train
split decoded at 256x256 would need ~250 GB of RAM.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Iterator

import torch
from tqdm import tqdm

from msdm.config import ConfigError, Params
from stages._cli import InputMissingError, require, run_stage

MODEL_IN = Path("models/autoencoder.pt")
LATENTS_OUT = Path("data/latents")


def encode_batches(codec, images_u8: torch.Tensor, batch_size: int, device: torch.device,
                   desc: str) -> Iterator[torch.Tensor]:
    """Float32 CPU latents of uint8 images, one batch at a time."""
    from msdm.data import from_uint8

    with torch.inference_mode():
        for start in tqdm(range(0, len(images_u8), batch_size), desc=desc, disable=None):
            x = from_uint8(images_u8[start:start + batch_size]).to(device)
            yield codec.encode(x).float().cpu()


IN_MEMORY_DATASETS = ("fashion_mnist", "cifar10")


def encode_stream(codec, dataset, batch_size: int, device: torch.device, desc: str) -> Iterator[torch.Tensor]:
    """Float32 CPU latents of a dataset of ([-1, 1] image, label), decoded by loader workers."""
    import os

    from torch.utils.data import DataLoader

    workers = 0 if len(dataset) < 2048 else min(8, os.cpu_count() or 1)  # workers cost more than tiny sets
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda")
    with torch.inference_mode():
        for x, _ in tqdm(loader, desc=desc, disable=None):
            yield codec.encode(x.to(device, non_blocking=True)).float().cpu()


def dataset_labels(dataset, num_classes: int) -> torch.Tensor:
    """int64 labels [N] of a streamed split without decoding any image."""
    if num_classes == 1:
        return torch.zeros(len(dataset), dtype=torch.int64)
    targets = getattr(dataset, "targets", None)  # torchvision ImageFolder
    if targets is None:
        targets = getattr(dataset, "labels")  # msdm.data.ArrayDataset
    return torch.as_tensor(targets, dtype=torch.int64)


def _sha256(path: Path) -> str:
    # Recorded in meta.json, so latents from another autoencoder never look the same.
    # Streamed: an imported SD VAE is a 335 MB file.
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def body(params: Params, args) -> None:
    from msdm import data
    from msdm.codec import load_codec
    from msdm.latents import LatentStoreWriter

    require(MODEL_IN, "autoencoder")  # both kinds: sd-vae weights are imported there too
    try:
        codec = load_codec(params.autoencoder, MODEL_IN)
    except (ValueError, NotImplementedError) as e:
        raise ConfigError(str(e)) from None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    codec.to(device)

    with LatentStoreWriter(LATENTS_OUT, subspaces=codec.subspaces, channels=codec.channels,
                           num_classes=data.num_classes(params.data), codec_kind=codec.kind,
                           shard_size=params.encode.shard_size,
                           extra={"dataset": params.data.dataset, "image_size": params.data.image_size,
                                  "autoencoder_sha256": _sha256(MODEL_IN) if MODEL_IN.is_file() else ""}) as writer:
        for split in ("train", "test"):
            try:
                if params.data.dataset in IN_MEMORY_DATASETS:
                    images, labels = data.load_arrays(params.data, split)
                    latents = encode_batches(codec, images, params.encode.batch_size, device, desc=f"encode {split}")
                else:
                    dataset = data.load_split(params.data, split)
                    labels = dataset_labels(dataset, data.num_classes(params.data))
                    latents = encode_stream(codec, dataset, params.encode.batch_size, device, desc=f"encode {split}")
            except data.DatasetError as e:
                raise InputMissingError(str(e)) from None
            writer.write_split(split, latents, labels)
    sizes = ", ".join(f"{split} {info['n']}" for split, info in writer.splits.items())
    print(f"encode: {sizes} latents of shape {codec.subspaces * codec.channels}x{writer.latent_hw[0]}x"
          f"{writer.latent_hw[1]} ({codec.subspaces} subspaces) -> {LATENTS_OUT}")


if __name__ == "__main__":
    sys.exit(run_stage("encode", body))
