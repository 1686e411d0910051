"""Benchmark 3: training on pre-encoded latents vs encoding every batch on the fly.

Both variants run the same bare training step (common.BareTrainer) on the configured
model; they differ only in where x0 comes from:
  pre-encoded: a batch of latents indexed from memory (what run_worker loads from the store)
  on the fly:  a batch of uint8 32x32 images -> [-1, 1] -> stage-1 encoder under
               torch.inference_mode, fp32 as in msdm/encoding.py -> normalised -> the step
The encoder is msdm.multispace.MultiSpaceAutoencoder with params.yaml's architecture,
randomly initialised (the cost does not depend on the weights).
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from msdm.data import from_uint8, image_channels
from msdm.multispace import build_autoencoder, count_parameters

from .common import (auto_precision, dtype_label, BareTrainer, Context, EpochBatches, Figure, bench_params, interleaved, latent_info,
                     time_steps)

BENCHMARK = "encode"
FASHION_MNIST_TRAIN = 60_000


def sizes(quick: bool, params) -> dict:
    if quick:
        return {"preset": "vit-tiny", "batch": 8, "examples": 64, "warmup": 2, "steps": 4, "chunk": 2}
    return {"preset": params.model.preset, "batch": params.train.batch_size, "examples": 4096,
            "warmup": 5, "steps": 30, "chunk": 5}


def run(ctx: Context) -> list[Figure]:
    size = sizes(ctx.quick, ctx.params)
    params = bench_params(ctx.params, preset=size["preset"], batch=size["batch"], precision=auto_precision(), strategy="const")
    info = latent_info(params)
    n, batch, s = max(size["examples"], size["batch"]), size["batch"], params.data.image_size
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, image_channels(params.data), s, s), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, info.num_classes, (n,), generator=g)
    encoder = build_autoencoder(params.autoencoder, image_channels(params.data)).eval()

    with torch.inference_mode():
        raw = torch.cat([encoder.encode(from_uint8(chunk)) for chunk in images.split(1000)])
    mean, std = raw.mean((0, 2, 3), keepdim=True), raw.std((0, 2, 3), keepdim=True)
    latents = ((raw - mean) / std).clone()  # a normal tensor: autograd may save it

    def encoded(idx: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            z = (encoder.encode(from_uint8(images[idx])) - mean) / std
        return z.clone()  # out of inference mode, as the training step's autograd needs

    timing_kw = {k: size[k] for k in ("warmup", "steps", "chunk")}
    def pre_encoded() -> float:
        trainer, batches = BareTrainer(params, info), EpochBatches(latents, labels, batch)
        return time_steps(lambda: trainer.step(*batches()), **timing_kw).seconds_per_step

    def on_the_fly() -> float:
        trainer, batches = BareTrainer(params, info), EpochBatches(latents, labels, batch)

        def step():
            idx = batches.next_indices()
            trainer.step(encoded(idx), labels[idx])

        return time_steps(step, **timing_kw).seconds_per_step

    def encoder_alone() -> float:
        batches = EpochBatches(latents, labels, batch)
        return time_steps(lambda: encoded(batches.next_indices()), **timing_kw).seconds_per_step

    runs = interleaved({"pre-encoded": pre_encoded, "on the fly": on_the_fly, "encoder alone": encoder_alone},
                       ctx.repeats, ctx.log)
    pre, fly, enc_only = runs["pre-encoded"], runs["on the fly"], runs["encoder alone"]
    pre_s, fly_s, enc_s = statistics.median(pre), statistics.median(fly), statistics.median(enc_only)
    settings = {"preset": size["preset"], "batch": batch, "image": [images.shape[1], s, s],
                "latent": [info.channels, info.size, info.size], "encoder": "MultiSpaceAutoencoder.encode, random init",
                "encoder_params": count_parameters(encoder.encoder),
                "autoencoder": {k: getattr(params.autoencoder, k) for k in
                                ("subspaces", "channels", "downsample", "widths", "attn_heads")},
                "step": "bare training step (common.BareTrainer)", **timing_kw, "repeats": ctx.repeats}
    figures = [
        ctx.figure(BENCHMARK, "train step on pre-encoded latents", batch / pre_s, "images/s", dtype=dtype_label(params.train.precision),
                   settings=settings, spread=[batch / max(pre), batch / min(pre)]),
        ctx.figure(BENCHMARK, "train step encoding each batch on the fly", batch / fly_s, "images/s",
                   dtype=f"{dtype_label(params.train.precision)} step, fp32 encoder", settings=settings,
                   spread=[batch / max(fly), batch / min(fly)]),
        ctx.figure(BENCHMARK, "speedup of pre-encoded latents", fly_s / pre_s, "x", settings=settings,
                   note="step time on the fly / step time on pre-encoded latents"),
        ctx.figure(BENCHMARK, "encoder alone (inference_mode)", batch / enc_s, "images/s", dtype="fp32",
                   settings=settings),
        ctx.figure(BENCHMARK, "one-off encode of the Fashion-MNIST train split (estimate)",
                   FASHION_MNIST_TRAIN * enc_s / batch, "s", dtype="fp32", settings=settings,
                   note=f"{FASHION_MNIST_TRAIN} images at the encoder-alone rate; paid once by the encode stage"),
    ]
    store_dir = ctx.repo / "data" / "latents"
    if (store_dir / "meta.json").is_file():
        figures.append(load_store_figure(ctx, store_dir))
    return figures


def load_store_figure(ctx: Context, store_dir: Path) -> Figure:
    """Seconds to load the real train split into memory, as run_worker does before training."""
    from msdm.latents import LatentStore

    start = time.perf_counter()
    latents, _ = LatentStore(store_dir).load("train", normalized=True)
    seconds = time.perf_counter() - start
    return ctx.figure(BENCHMARK, "load pre-encoded train split (LatentStore.load)", seconds, "s", dtype="fp32",
                      settings={"store": str(store_dir.relative_to(ctx.repo)), "shape": list(latents.shape),
                                "megabytes": round(latents.numel() * 4 / 2 ** 20, 1)},
                      note="once per worker start; page cache state affects it")
