"""Images -> latents, one split at a time, for the latent store (msdm.latents).

Fashion-MNIST and CIFAR-10 are encoded from in-memory arrays; the image-folder datasets
(CelebA, LSUN, ImageNet) are streamed through a DataLoader, because ImageNet's train split
decoded at 256x256 would need ~250 GB of RAM. Encoding runs in fp32 under inference mode:
it is a small share of the pipeline's time and keeps the stored latents free of bf16 rounding.
"""
from __future__ import annotations

import os
from typing import Iterator

import torch
from tqdm import tqdm

from . import data
from .config import DataConfig
from .metrics import IN_MEMORY_DATASETS

MIN_IMAGES_FOR_LOADER_WORKERS = 2048  # loader workers cost more than they save on tiny sets


def encode_batches(codec, images_u8: torch.Tensor, batch_size: int, device: torch.device,
                   desc: str) -> Iterator[torch.Tensor]:
    """Float32 CPU latents of uint8 images, one batch at a time."""
    with torch.inference_mode():
        for start in tqdm(range(0, len(images_u8), batch_size), desc=desc, disable=None):
            x = data.from_uint8(images_u8[start:start + batch_size]).to(device)
            yield codec.encode(x).float().cpu()


def encode_stream(codec, dataset, batch_size: int, device: torch.device, desc: str) -> Iterator[torch.Tensor]:
    """Float32 CPU latents of a dataset of ([-1, 1] image, label), decoded by loader workers."""
    from torch.utils.data import DataLoader

    workers = 0 if len(dataset) < MIN_IMAGES_FOR_LOADER_WORKERS else min(8, os.cpu_count() or 1)
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


def encode_split(codec, cfg: DataConfig, split: str, batch_size: int,
                 device: torch.device) -> tuple[Iterator[torch.Tensor], torch.Tensor]:
    """(latent batches, labels [N]) of one split; the batches are encoded as they are consumed."""
    if cfg.dataset in IN_MEMORY_DATASETS:
        images, labels = data.load_arrays(cfg, split)
        return encode_batches(codec, images, batch_size, device, desc=f"encode {split}"), labels
    dataset = data.load_split(cfg, split)
    labels = dataset_labels(dataset, data.num_classes(cfg))
    return encode_stream(codec, dataset, batch_size, device, desc=f"encode {split}"), labels
