"""DVC stage `autoencoder`: train the stage-1 multi-space autoencoder (or import an SD VAE).

Reads the `data` and `autoencoder` sections. Writes the model (--model: {config, state_dict}),
its test-split metrics (--metrics: SSIM, PSNR, L1, train time, parameter count) and a grid
of test originals above their reconstructions (--plot). With `autoencoder.kind: sd-vae`
nothing is trained: the pretrained AutoencoderKL named by `autoencoder.path` (local folder or
hub id) is imported (msdm.codec), and measured on the first SD_VAE_METRIC_IMAGES test images.
"""
from __future__ import annotations

import sys

import torch

from msdm.config import ConfigError
from msdm.io import atomic_write_json
from pipeline.config import PipelineParams
from pipeline.errors import PipelineError
from stages._cli import InputMissingError, run_stage

PATHS = {"model": "models/autoencoder.pt", "metrics": "metrics/autoencoder.json",
         "plot": "plots/reconstructions.png"}
NUM_SHOWN = 16
# A pretrained VAE is only checked, not selected on these numbers: a fixed slice of the
# test split is enough, and keeps the stage short on ImageNet-size test splits.
SD_VAE_METRIC_IMAGES = 512


def build(params: PipelineParams, device: str):
    """(model, what its metrics add, test images): everything that can be refused, before any step."""
    from msdm import data
    from msdm.codec import CodecError, load_pretrained_vae, sd_vae_codec
    from msdm.losses import ReconstructionLoss
    from msdm.multispace import build_autoencoder, count_parameters
    from msdm.precision import resolve_precision

    cfg = params.autoencoder
    try:
        if cfg.kind == "sd-vae":
            codec = sd_vae_codec(cfg, load_pretrained_vae(cfg.path), data.image_channels(params.data), cfg.path)
            test = data.first_images(params.data, "test", SD_VAE_METRIC_IMAGES)
            return codec, dict(kind=cfg.kind, source=cfg.path, params=count_parameters(codec.vae), steps=0,
                               train_seconds=0.0, scaling_factor=codec.scaling_factor), test
        model = build_autoencoder(cfg, in_channels=data.image_channels(params.data))
        loss_fn = ReconstructionLoss.from_config(cfg)
        precision = resolve_precision(cfg.precision, device, key="autoencoder.precision")
        train_images, _ = data.load_arrays(params.data, "train")
        test, _ = data.load_arrays(params.data, "test")
    except (CodecError, ValueError) as e:
        raise ConfigError(str(e)) from None
    except data.DatasetError as e:
        raise InputMissingError(str(e)) from None
    from msdm.autoencoder_training import train_autoencoder

    try:
        result = train_autoencoder(model, train_images, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr,
                                   loss_fn=loss_fn, precision=precision, seed=cfg.seed, device=device)
    except FloatingPointError as e:
        raise PipelineError(f"autoencoder training diverged: {e}") from None
    return model, dict(train_seconds=round(result.train_seconds, 1), params=count_parameters(model),
                       steps=cfg.steps, final_train_loss=result.final_loss, **precision.as_metrics()), test


def body(params: PipelineParams, args) -> None:
    from msdm.autoencoder_training import reconstruction_metrics, save_reconstruction_grid
    from msdm.codec import save_sd_vae
    from msdm.multispace import save_autoencoder

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model, facts, test = build(params, device)
    batch = 64 if params.autoencoder.kind == "sd-vae" else 1000  # SdVaeCodec splits further into micro-batches
    metrics = {**reconstruction_metrics(model, test, batch_size=batch, device=device), **facts, "device": device}
    (save_sd_vae if params.autoencoder.kind == "sd-vae" else save_autoencoder)(model.cpu(), args.model)
    atomic_write_json(metrics, args.metrics)
    a = params.autoencoder
    shape = f"K={a.subspaces} x C={a.channels}" if a.kind == "multispace" else a.kind
    save_reconstruction_grid(model, test[:NUM_SHOWN], args.plot, batch_size=batch, device=device,
                             title=f"{shape} autoencoder, {metrics['steps']} steps: test SSIM {metrics['ssim']:.4f}, "
                                   f"PSNR {metrics['psnr']:.2f} dB (over {metrics['num_images']} test images)")
    how = f", {metrics['precision']}: {metrics['precision_reason']}" if "precision" in metrics else ""
    print(f"autoencoder ({params.autoencoder.kind}): test ssim {metrics['ssim']:.4f}, psnr {metrics['psnr']:.2f} dB, "
          f"l1 {metrics['l1']:.4f} over {metrics['num_images']} images; {metrics['params']} params, "
          f"{metrics['steps']} steps in {metrics['train_seconds']:.0f}s on {device}{how} "
          f"-> {args.model}, {args.metrics}, {args.plot}")


def main(argv: list[str] | None = None) -> int:
    return run_stage("autoencoder", body, argv=argv, paths=PATHS, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
