"""DVC stage `autoencoder`: train the stage-1 multi-space autoencoder (SPEC section 4).

    python -m stages.autoencoder [--params params.yaml]

Reads the `data` and `autoencoder` sections. Writes models/autoencoder.pt ({config,
state_dict}), metrics/autoencoder.json (SSIM, PSNR, L1 on the whole test split, train
time, parameter count) and plots/reconstructions.png (test originals above their
reconstructions).

With `autoencoder.kind: sd-vae` nothing is trained: the pretrained AutoencoderKL named by
`autoencoder.path` (local folder or hub id) is imported into models/autoencoder.pt (see
msdm.codec), and the same metrics and plot are made on the first SD_VAE_METRIC_IMAGES
test images.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from msdm.config import ConfigError, Params
from pipeline.errors import PipelineError
from msdm.io import atomic_path, atomic_write_json
from stages._cli import InputMissingError, run_stage

MODEL_OUT = Path("models/autoencoder.pt")
METRICS = Path("metrics/autoencoder.json")
PLOT = Path("plots/reconstructions.png")
NUM_SHOWN = 16
# A pretrained VAE is only checked, not selected on these numbers: a fixed slice of the
# test split is enough, and keeps the stage short on ImageNet-size test splits.
SD_VAE_METRIC_IMAGES = 512


def _first_test_images(params: Params, n: int) -> torch.Tensor:
    """uint8 [min(n, N), C, S, S]: the first test images, decoded without reading the whole split."""
    from msdm import data

    try:
        split = data.load_split(params.data, "test")
    except data.DatasetError as e:
        raise InputMissingError(str(e)) from None
    return torch.stack([data.to_uint8(split[i][0]) for i in range(min(n, len(split)))])


def import_sd_vae(params: Params) -> None:
    """kind sd-vae: import the pretrained weights, measure their reconstructions, plot them."""
    from torchvision.utils import save_image

    from msdm import data
    from msdm.ae_train import reconstruct, reconstruction_metrics
    from msdm.codec import CodecError, load_pretrained_vae, save_sd_vae, sd_vae_codec
    from msdm.multispace import count_parameters

    cfg = params.autoencoder
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        vae = load_pretrained_vae(cfg.path)
        codec = sd_vae_codec(cfg, vae, data.image_channels(params.data), cfg.path)
    except CodecError as e:
        raise ConfigError(str(e)) from None
    test_images = _first_test_images(params, SD_VAE_METRIC_IMAGES)
    batch = 64  # SdVaeCodec further splits into micro-batches
    metrics = reconstruction_metrics(codec, test_images, batch_size=batch, device=device)
    metrics.update(kind=cfg.kind, source=cfg.path, params=count_parameters(codec.vae), steps=0,
                   train_seconds=0.0, scaling_factor=codec.scaling_factor, device=device)
    save_sd_vae(codec.cpu(), MODEL_OUT)
    atomic_write_json(metrics, METRICS)
    shown = test_images[:NUM_SHOWN]
    grid = torch.cat([data.from_uint8(shown), reconstruct(codec, shown, batch_size=batch, device=device)])
    with atomic_path(PLOT) as tmp:
        save_image((grid + 1) / 2, tmp, nrow=len(shown), padding=2, format="png")
    print(f"autoencoder: imported the SD VAE {cfg.path!r} ({metrics['params']} params, scale "
          f"{codec.scaling_factor}); first {metrics['num_images']} test images: ssim {metrics['ssim']:.4f}, "
          f"psnr {metrics['psnr']:.2f} dB -> {MODEL_OUT}, {METRICS}, {PLOT}")


def body(params: Params, args) -> None:
    from torchvision.utils import save_image

    from msdm import data
    from msdm.ae_train import reconstruct, reconstruction_metrics, train_autoencoder
    from msdm.losses import ReconstructionLoss
    from msdm.multispace import build_autoencoder, count_parameters, save_autoencoder
    from msdm.precision import resolve_precision

    cfg = params.autoencoder
    if cfg.kind == "sd-vae":
        return import_sd_vae(params)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # Everything that can be refused is built before the data are read or a step is taken.
    try:
        model = build_autoencoder(cfg, in_channels=data.image_channels(params.data))
        loss_fn = ReconstructionLoss.from_config(cfg)
        precision = resolve_precision(cfg.precision, device, key="autoencoder.precision")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        train_images, _ = data.load_arrays(params.data, "train")
        test_images, _ = data.load_arrays(params.data, "test")
    except data.DatasetError as e:
        raise InputMissingError(str(e)) from None

    try:
        result = train_autoencoder(model, train_images, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                                   loss_fn=loss_fn, precision=precision, seed=cfg.seed, device=device)
    except FloatingPointError as e:
        raise PipelineError(f"autoencoder training diverged: {e}") from None
    metrics = reconstruction_metrics(model, test_images, device=device)
    metrics.update(train_seconds=round(result.train_seconds, 1), params=count_parameters(model),
                   steps=cfg.steps, final_train_loss=result.final_loss, device=device,
                   **precision.as_metrics())

    save_autoencoder(model, MODEL_OUT)
    atomic_write_json(metrics, METRICS)
    shown = test_images[:NUM_SHOWN]
    grid = torch.cat([data.from_uint8(shown), reconstruct(model, shown, device=device)])
    with atomic_path(PLOT) as tmp:
        save_image((grid + 1) / 2, tmp, nrow=len(shown), padding=2, format="png")
    print(f"autoencoder: test ssim {metrics['ssim']:.4f}, psnr {metrics['psnr']:.2f} dB, l1 {metrics['l1']:.4f}; "
          f"{metrics['params']} params, trained {cfg.steps} steps in {result.train_seconds:.0f}s on {device} "
          f"({precision.name}: {precision.reason}) "
          f"-> {MODEL_OUT}, {METRICS}, {PLOT}")


if __name__ == "__main__":
    sys.exit(run_stage("autoencoder", body))
