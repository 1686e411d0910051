"""Benchmark 6: achieved FLOP/s of the training step as a fraction of the CPU's peak.

FLOPs per step: torch.utils.flop_counter.FlopCounterMode over one forward + backward of the
configured model through DiffusionLoss (gpu_check.train_step_flops). It counts matmuls,
convolutions and attention at 2 FLOPs per multiply-add; elementwise work, the loss, the
optimizer and the EMA are not counted, so the fraction is of useful model FLOPs (MFU).

Two peaks:
  theoretical  cores x clock x FLOPs/cycle/core of the ISA (machine.FLOPS_PER_CYCLE)
  measured     the best of a few n x n matmuls (torch.mm, n = 4096) in fp32 and bf16: what
               the BLAS/oneDNN kernels reach on this machine with the same thread count
"""
from __future__ import annotations

import time

import torch

from msdm.diffusion import GaussianDiffusion
from msdm.diffusion_loss import DiffusionLoss
from msdm.diffusion_training import build_model

from .common import (Context, Figure, bench_params, latent_info, median_timing, synthetic_latents, time_bare,
                     time_train_loop)
from .machine import theoretical_peak

BENCHMARK = "flops"


def sizes(quick: bool, params) -> dict:
    if quick:
        return {"preset": "vit-tiny", "batch": 8, "examples": 64, "warmup": 2, "steps": 4, "chunk": 2,
                "matmul_n": 512, "matmul_repeats": 2}
    return {"preset": params.model.preset, "batch": params.train.batch_size, "examples": 4096,
            "warmup": 5, "steps": 30, "chunk": 5, "matmul_n": 4096, "matmul_repeats": 5}


def count_step_flops(params, info, batch: int) -> float:
    from gpu_check import train_step_flops

    torch.manual_seed(0)
    model = build_model(params, info)
    diffusion = GaussianDiffusion(params.diffusion.timesteps, params.diffusion.schedule)
    loss_fn = DiffusionLoss(diffusion, model.strategy, target=params.diffusion.target, subspaces=info.subspaces,
                            label_dropout=params.model.label_dropout, null_class=info.num_classes)
    x, y = synthetic_latents(batch, info)
    return train_step_flops(model, loss_fn, x, y)


def matmul_peak(n: int, dtype: torch.dtype, repeats: int) -> dict:
    """Best and median FLOP/s of torch.mm on n x n matrices of `dtype`."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    torch.mm(a, b)  # kernel selection, page faults
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        rates.append(2 * n ** 3 / (time.perf_counter() - start))
    rates.sort()
    return {"best": rates[-1], "median": rates[len(rates) // 2]}


def run(ctx: Context) -> list[Figure]:
    size = sizes(ctx.quick, ctx.params)
    batch, threads = size["batch"], torch.get_num_threads()
    timing_kw = {k: size[k] for k in ("warmup", "steps", "chunk")}
    machine = ctx.machine
    figures: list[Figure] = []
    peaks = {}
    # the peak of the cores torch computes on: with fewer threads than cores, the idle ones do not count
    cores = min(machine.cores, threads)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        theory = theoretical_peak(machine, name, cores)
        ctx.log(f"{size['matmul_n']}x{size['matmul_n']} matmul, {name}")
        measured = matmul_peak(size["matmul_n"], dtype, size["matmul_repeats"])
        peaks[name] = (theory["flops"], measured["best"])
        figures += [
            ctx.figure(BENCHMARK, f"theoretical peak {name}", theory["flops"] / 1e9, "GFLOP/s", dtype=name,
                       settings=theory, note=f"{theory['derivation']}; {cores} of {machine.cores} cores "
                                             f"(= torch threads). A nominal clock: a boosting core beats it"),
            ctx.figure(BENCHMARK, f"measured matmul peak {name}", measured["best"] / 1e9, "GFLOP/s", dtype=name,
                       settings={"op": "torch.mm", "n": size["matmul_n"], "repeats": size["matmul_repeats"],
                                 "median_gflops": measured["median"] / 1e9},
                       note="best of the repeats"),
            ctx.figure(BENCHMARK, f"matmul peak / theoretical {name}", measured["best"] / theory["flops"], "fraction",
                       dtype=name, settings={"n": size["matmul_n"]}),
        ]

    steps = {}
    for precision in ("bf16", "fp32"):
        ctx.log(f"training step, {precision}")
        p = bench_params(ctx.params, preset=size["preset"], batch=batch, precision=precision, strategy="const")
        info = latent_info(p)
        latents, labels = synthetic_latents(max(size["examples"], batch), info)
        steps[f"bare {precision}"] = (p, median_timing([time_bare(p, info, latents, labels, **timing_kw)
                                                        for _ in range(ctx.repeats)])[0])
        if precision == "bf16":
            steps["ours bf16"] = (p, median_timing([time_train_loop(p, latents, labels, info, **timing_kw)
                                                    for _ in range(ctx.repeats)])[0])
    p = steps["bare bf16"][0]
    info = latent_info(p)
    flops = count_step_flops(p, info, batch)
    settings = {"preset": size["preset"], "batch": batch, "latent": [info.channels, info.size, info.size],
                "weighting": "const", "counted": "FlopCounterMode: one forward + backward (gpu_check.train_step_flops)",
                **timing_kw, "repeats": ctx.repeats, "peak_cores": cores, "machine_cores": machine.cores}
    figures.append(ctx.figure(BENCHMARK, "FLOPs per training step", flops / 1e9, "GFLOP", settings=settings,
                              note=f"{flops / batch / 1e6:.1f} MFLOP per image"))
    for label, (params, seconds) in steps.items():
        precision = params.train.precision
        achieved = flops / seconds
        theory, measured = peaks[precision]
        dtype = "bf16 autocast" if precision == "bf16" else "fp32"
        figures += [
            ctx.figure(BENCHMARK, f"achieved, {label} step", achieved / 1e9, "GFLOP/s", dtype=dtype, settings=settings,
                       note=f"FLOPs per step / median step time ({batch / seconds:.0f} images/s)"),
            ctx.figure(BENCHMARK, f"fraction of theoretical {precision} peak, {label}", achieved / theory, "fraction",
                       dtype=dtype, settings=settings),
            ctx.figure(BENCHMARK, f"fraction of measured matmul {precision} peak, {label}", achieved / measured,
                       "fraction", dtype=dtype, settings=settings),
        ]
    return figures
