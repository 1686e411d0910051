"""Benchmark 1: throughput of our training loop vs a bare PyTorch loop on the same ViT.

overhead = (our seconds per step) / (bare seconds per step) - 1. Target: <= 10 %. What
it covers: DiffusionLoss and the weighting strategy object, the WeightLog and running
loss sums, the NaN check, the EMA's per-step parameter list, the hooks. The two loops run
interleaved (bare, ours, bare, ours, ...) so drift on a shared machine hits both alike.
"""
from __future__ import annotations

from msdm.precision import resolve_precision

from .common import (Context, Figure, bench_params, dtype_label, interleaved, latent_info, median_timing,
                     synthetic_latents, time_bare, time_train_loop)

BENCHMARK = "training"


def sizes(quick: bool) -> dict:
    if quick:
        return {"configs": [("vit-tiny", 8)], "examples": 64, "warmup": 2, "steps": 4, "chunk": 2}
    return {"configs": [("vit-tiny", 64), ("vit-tiny", 128), ("vit-small", 64), ("vit-small", 128)],
            "examples": 4096, "warmup": 10, "steps": 50, "chunk": 10}


def compare(ctx: Context, *, preset: str, batch: int, precision: str, strategy: str, size: dict,
            label: str = "") -> list[Figure]:
    params = bench_params(ctx.params, preset=preset, batch=batch, precision=precision, strategy=strategy)
    info = latent_info(params)
    latents, labels = synthetic_latents(max(size["examples"], batch), info)
    timing_kw = dict(warmup=size["warmup"], steps=size["steps"], chunk=size["chunk"])
    tag = f"{preset} b{batch}{label}"
    runs = interleaved({"bare": lambda: time_bare(params, info, latents, labels, **timing_kw),
                        "ours": lambda: time_train_loop(params, latents, labels, info, **timing_kw)},
                       ctx.repeats, log=lambda message: ctx.log(f"{tag} {strategy}: {message}"))
    ours, bare = runs["ours"], runs["bare"]
    ours_s, ours_range = median_timing(ours)
    bare_s, bare_range = median_timing(bare)
    settings = {"preset": preset, "patch_size": params.model.patch_size, "batch": batch,
                "latent": [info.channels, info.size, info.size], "num_classes": info.num_classes,
                "weighting": strategy, "target": params.diffusion.target, "optimizer": "AdamW(fused=True)",
                "ema": True, "grad_clip": params.train.grad_clip, **timing_kw, "repeats": ctx.repeats,
                "statistic": "median over repeats of steady-state images/s"}
    precision = resolve_precision(precision, "cpu").name
    dtype = dtype_label(precision)
    return [
        ctx.figure(BENCHMARK, f"ours (msdm.diffusion_training.train_loop) {tag}", batch / ours_s, "images/s", dtype=dtype,
                   settings=settings, spread=[batch / ours_range[1], batch / ours_range[0]]),
        ctx.figure(BENCHMARK, f"bare PyTorch loop {tag}", batch / bare_s, "images/s", dtype=dtype,
                   settings={**settings, "weighting": "const (inline MSE)"},
                   spread=[batch / bare_range[1], batch / bare_range[0]]),
        ctx.figure(BENCHMARK, f"orchestration overhead {tag}", 100.0 * (ours_s / bare_s - 1.0), "%", dtype=dtype,
                   settings=settings, note="ours step time / bare step time - 1; target <= 10 %"),
    ]


def run(ctx: Context) -> list[Figure]:
    size = sizes(ctx.quick)
    figures: list[Figure] = []
    for preset, batch in size["configs"]:
        figures += compare(ctx, preset=preset, batch=batch, precision="auto", strategy="const", size=size)
    if not ctx.quick:
        # the configured strategy (dysigma: learned variance channels + VLB) on the configured model,
        # against the same bare const loop: what the method's loss costs on top of orchestration
        p = ctx.params
        figures += compare(ctx, preset=p.model.preset, batch=p.train.batch_size, precision=p.train.precision,
                           strategy=p.weighting.strategy, size=size, label=f" weighting={p.weighting.strategy}")
    return figures
