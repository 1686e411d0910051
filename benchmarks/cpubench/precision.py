"""Benchmark 4: numeric format and compiler settings of the training step on this CPU.

  bf16 autocast vs fp32      the bare diffusion step (common.BareTrainer), configured model
  torch.compile on vs off    same step, bf16; compile seconds reported apart from the steady state
  fused vs default AdamW     same step, bf16 (train_loop and the bare loop use fused; before, the
                             CPU default, a per-parameter for-loop, was used)
  channels_last vs default   the stage-1 autoencoder's training step (as msdm.autoencoder_training runs it)

bf16 speed depends on the ISA: AVX512_BF16 gives bf16 dot products at 2x the fp32 rate
(Zen 4, Cooper Lake); AMX (Sapphire Rapids and later) far more; without either, oneDNN
converts and computes in fp32 and bf16 is usually slower. The machine block says which.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from msdm.autoencoder_training import ADAMW_BETAS, ADAMW_WEIGHT_DECAY
from msdm.precision import resolve_precision
from msdm.data import from_uint8, image_channels
from msdm.losses import ReconstructionLoss
from msdm.multispace import build_autoencoder

from .common import (BareTrainer, Context, EpochBatches, Figure, bench_params, interleaved, latent_info,
                     synthetic_latents, time_steps)

BENCHMARK = "precision"


def sizes(quick: bool, params) -> dict:
    if quick:
        return {"preset": "vit-tiny", "batch": 8, "ae_batch": 8, "examples": 64, "warmup": 2, "steps": 4, "chunk": 2}
    return {"preset": params.model.preset, "batch": params.train.batch_size,
            "ae_batch": params.autoencoder.batch_size, "examples": 4096, "warmup": 5, "steps": 30, "chunk": 5}


def _rate(batch: int, seconds: list[float]) -> tuple[float, list[float]]:
    return batch / statistics.median(seconds), [batch / max(seconds), batch / min(seconds)]


def run(ctx: Context) -> list[Figure]:
    size = sizes(ctx.quick, ctx.params)
    timing_kw = {k: size[k] for k in ("warmup", "steps", "chunk")}
    batch = size["batch"]
    base = bench_params(ctx.params, preset=size["preset"], batch=batch, precision="bf16", strategy="const")
    info = latent_info(base)
    latents, labels = synthetic_latents(max(size["examples"], batch), info)
    settings = {"preset": size["preset"], "batch": batch, "latent": [info.channels, info.size, info.size],
                "step": "bare training step (common.BareTrainer)", **timing_kw, "repeats": ctx.repeats}

    def bare(precision: str = "bf16", **kw) -> float:
        p = bench_params(ctx.params, preset=size["preset"], batch=batch, precision=precision, strategy="const")
        trainer, batches = BareTrainer(p, info, **kw), EpochBatches(latents, labels, batch)
        return time_steps(lambda: trainer.step(*batches()), **timing_kw).seconds_per_step

    runs = interleaved({"fp32": lambda: bare("fp32"), "bf16": lambda: bare("bf16"),
                        "default": lambda: bare("bf16", fused_adam=None)}, ctx.repeats, ctx.log)
    fp32, fp32_range = _rate(batch, runs["fp32"])
    bf16, bf16_range = _rate(batch, runs["bf16"])
    unfused, unfused_range = _rate(batch, runs["default"])
    figures = [
        ctx.figure(BENCHMARK, "train step fp32", fp32, "images/s", dtype="fp32", settings=settings, spread=fp32_range),
        ctx.figure(BENCHMARK, "train step bf16 autocast", bf16, "images/s", dtype="bf16 autocast", settings=settings,
                   spread=bf16_range),
        ctx.figure(BENCHMARK, "bf16 speedup over fp32", bf16 / fp32, "x", settings=settings),
        ctx.figure(BENCHMARK, "train step bf16, default AdamW (before)", unfused, "images/s",
                   dtype="bf16 autocast", settings={**settings, "optimizer": "AdamW(fused=None): for-loop on CPU"},
                   spread=unfused_range),
        ctx.figure(BENCHMARK, "fused AdamW speedup over the default", bf16 / unfused, "x", dtype="bf16 autocast",
                   settings=settings, note="msdm.diffusion_training and msdm.autoencoder_training use AdamW(fused=True) on every device"),
    ]
    figures += compile_figures(ctx, base, info, latents, labels, batch, bf16, timing_kw, settings)
    figures += channels_last_figures(ctx, size, timing_kw)
    return figures


def compile_figures(ctx: Context, params, info, latents, labels, batch: int, eager_rate: float, timing_kw: dict,
                    settings: dict) -> list[Figure]:
    """torch.compile (inductor, default mode) of the ViT inside the bare step; a failure is reported."""
    s = {**settings, "compile": "torch.compile(model), inductor default mode", "repeats": 1}
    ctx.log("torch.compile")
    if ctx.quick:  # compiling takes a minute or more, whatever the size
        return [ctx.figure(BENCHMARK, "torch.compile", None, "images/s", dtype="bf16 autocast", settings=s,
                           note="skipped in --quick")]
    try:
        trainer, batches = BareTrainer(params, info, compile_model=True), EpochBatches(latents, labels, batch)
        start = time.perf_counter()
        trainer.step(*batches())  # compiles forward and backward
        first_step = time.perf_counter() - start
        timing = time_steps(lambda: trainer.step(*batches()), **timing_kw)
    except Exception as e:  # noqa: BLE001 - a compile failure is a result, reported as such
        msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400]
        return [ctx.figure(BENCHMARK, "torch.compile", None, "images/s", dtype="bf16 autocast", settings=s,
                           note=f"failed: {msg}")]
    rate = timing.images_per_second(batch)
    return [
        ctx.figure(BENCHMARK, "train step bf16, torch.compile", rate, "images/s", dtype="bf16 autocast",
                   settings=s, spread=timing.spread_images_per_second(batch)),
        ctx.figure(BENCHMARK, "torch.compile speedup over eager", rate / eager_rate, "x", dtype="bf16 autocast",
                   settings=s, note="eager = the median bf16 figure above"),
        ctx.figure(BENCHMARK, "torch.compile first step (compile time)", first_step, "s", dtype="bf16 autocast",
                   settings=s, note="paid once per process (and per Ray worker start)"),
    ]


def autoencoder_step(params, images: torch.Tensor, batch: int, *, memory_format: torch.memory_format,
                     precision: str) -> Callable[[], None]:
    """One training step of the stage-1 autoencoder as msdm.autoencoder_training runs it, on random batches of `images`."""
    cfg = params.autoencoder
    torch.manual_seed(cfg.seed)
    model = build_autoencoder(cfg, images.shape[1]).to(memory_format=memory_format).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=ADAMW_BETAS, weight_decay=ADAMW_WEIGHT_DECAY,
                            fused=True)  # as msdm.autoencoder_training
    loss_fn = ReconstructionLoss.from_config(cfg)
    autocast = resolve_precision(precision, "cpu", key="autoencoder.precision").autocast("cpu")
    g = torch.Generator().manual_seed(0)

    def step():
        idx = torch.randint(0, len(images), (batch,), generator=g)
        x = from_uint8(images[idx]).contiguous(memory_format=memory_format)
        with autocast:
            recon = model(x)
        loss, _ = loss_fn(x, recon)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def channels_last_figures(ctx: Context, size: dict, timing_kw: dict) -> list[Figure]:
    """The autoencoder's step as msdm.autoencoder_training runs it, with the model and input in each memory format."""
    cfg = ctx.params.autoencoder
    channels, s, batch = image_channels(ctx.params.data), ctx.params.data.image_size, size["ae_batch"]
    images = torch.randint(0, 256, (max(size["examples"], batch), channels, s, s), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))

    def ae_step_time(memory_format: torch.memory_format) -> float:
        step = autoencoder_step(ctx.params, images, batch, memory_format=memory_format, precision=cfg.precision)
        return time_steps(step, **timing_kw).seconds_per_step

    runs = interleaved({"contiguous": lambda: ae_step_time(torch.contiguous_format),
                        "channels_last": lambda: ae_step_time(torch.channels_last)}, ctx.repeats, ctx.log)
    cont, cont_range = _rate(batch, runs["contiguous"])
    last, last_range = _rate(batch, runs["channels_last"])
    settings = {"model": "MultiSpaceAutoencoder (params.yaml autoencoder)", "batch": batch, "image": [channels, s, s],
                "loss": cfg.recon_loss, **timing_kw, "repeats": ctx.repeats}
    used = resolve_precision(cfg.precision, "cpu", key="autoencoder.precision").name
    dtype = "fp32" if used == "fp32" else f"{used} autocast"
    return [
        ctx.figure(BENCHMARK, "autoencoder step, contiguous (NCHW)", cont, "images/s", dtype=dtype,
                   settings=settings, spread=cont_range),
        ctx.figure(BENCHMARK, "autoencoder step, channels_last (NHWC)", last, "images/s", dtype=dtype,
                   settings=settings, spread=last_range),
        ctx.figure(BENCHMARK, "channels_last speedup", last / cont, "x", dtype=dtype, settings=settings),
    ]
