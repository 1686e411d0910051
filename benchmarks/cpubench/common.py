"""Shared pieces: a figure row, the run context, step timing, synthetic data, the bare loop.

Timing is steady state: a step function runs `warmup` steps, then `steps` more, and a time
stamp is taken every `chunk` steps. Seconds per step = (last stamp - stamp after warm-up) /
steps, so start-up (model build, first-call kernel selection, allocator growth) and the end
of a run (final checkpoint) stay outside the window. The per-chunk rates give the spread.
"""
from __future__ import annotations

import copy
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from msdm.config import Params, replace, update
from msdm.diffusion import GaussianDiffusion
from msdm.models.vit import build_vit
from msdm.precision import resolve_precision
from msdm.diffusion_training import LatentInfo, TrainHooks, train_loop

from .machine import Machine


@dataclass
class Figure:
    """One measured number, with everything needed to reproduce and compare it."""

    benchmark: str
    name: str
    value: float | None
    unit: str
    dtype: str = ""
    torch_threads: int = 0
    settings: dict = field(default_factory=dict)
    spread: list[float] | None = None   # [min, max] over repeats or chunks, same unit
    note: str = ""
    machine: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        if isinstance(self.value, float) and not math.isfinite(self.value):
            d["value"] = None
        return d


@dataclass
class Context:
    params: Params          # params.yaml: every benchmark starts from the real config
    machine: Machine
    quick: bool
    repeats: int            # interleaved repeats of each comparison (median reported)
    tmp: Path               # scratch directory, removed after the run
    repo: Path

    def log(self, message: str) -> None:
        """Progress on stderr: a full run takes minutes per benchmark."""
        print(f"[bench]   {message}", file=sys.stderr, flush=True)

    def figure(self, benchmark: str, name: str, value: float | None, unit: str, **kw: Any) -> Figure:
        kw.setdefault("torch_threads", torch.get_num_threads())
        return Figure(benchmark, name, value, unit, machine=self.machine.short(), **kw)


def latent_info(params: Params) -> LatentInfo:
    """The latent shape params.yaml implies (12x8x8 for the default K=3, C=4, f=4, 32 px)."""
    ae = params.autoencoder
    return LatentInfo(channels=ae.subspaces * ae.channels, size=params.data.image_size // ae.downsample,
                      subspaces=ae.subspaces, num_classes=10)


def auto_precision() -> str:
    """What `precision: auto` runs on this CPU (bf16 only with avx512_bf16 or amx_bf16)."""
    return resolve_precision("auto", "cpu").name


def dtype_label(precision: str) -> str:
    return "fp32" if precision == "fp32" else f"{precision} autocast"


def bench_params(params: Params, *, preset: str, batch: int, precision: str = "auto",
                 strategy: str = "const", **train: Any) -> Params:
    p = replace(params, "model", preset=preset)
    p = replace(p, "weighting", strategy=strategy)
    return replace(p, "train", batch_size=batch, precision=precision, **train)


def synthetic_latents(n: int, info: LatentInfo, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, info.channels, info.size, info.size, generator=g),
            torch.randint(0, max(info.num_classes, 1), (n,), generator=g))


def write_store(path: Path, n: int, info: LatentInfo) -> Path:
    """A synthetic latent store (train split only) written by the project's LatentStoreWriter."""
    from msdm.latents import LatentStoreWriter

    latents, labels = synthetic_latents(n, info)
    with LatentStoreWriter(path, subspaces=info.subspaces, channels=info.channels // info.subspaces,
                           num_classes=info.num_classes, codec_kind="synthetic") as writer:
        writer.write_split("train", [latents.numpy()], labels.numpy())
    return path


# ---------------------------------------------------------------------------- timing


@dataclass
class Timing:
    seconds_per_step: float
    chunk_seconds_per_step: list[float]
    warmup: int
    steps: int

    def images_per_second(self, batch: int) -> float:
        return batch / self.seconds_per_step

    def spread_images_per_second(self, batch: int) -> list[float]:
        rates = [batch / s for s in self.chunk_seconds_per_step]
        return [min(rates), max(rates)]


def timing_from_stamps(stamps: list[tuple[int, float]], warmup: int) -> Timing:
    """Steady-state timing from (step, time) stamps; the first stamp at `warmup` opens the window."""
    window = [(s, t) for s, t in stamps if s >= warmup]
    if len(window) < 2:
        raise ValueError(f"need stamps at the warm-up step {warmup} and after it, got steps "
                         f"{[s for s, _ in stamps]}")
    (s0, t0), (s1, t1) = window[0], window[-1]
    chunks = [(tb - ta) / (sb - sa) for (sa, ta), (sb, tb) in zip(window, window[1:])]
    return Timing(seconds_per_step=(t1 - t0) / (s1 - s0), chunk_seconds_per_step=chunks, warmup=s0, steps=s1 - s0)


def time_steps(step: Callable[[], None], *, warmup: int, steps: int, chunk: int) -> Timing:
    """Run `step` warmup + steps times, stamping every `chunk` steps after the warm-up."""
    for _ in range(warmup):
        step()
    stamps = [(warmup, time.perf_counter())]
    done = 0
    while done < steps:
        n = min(chunk, steps - done)
        for _ in range(n):
            step()
        done += n
        stamps.append((warmup + done, time.perf_counter()))
    return timing_from_stamps(stamps, warmup)


def interleaved(runs: dict[str, Callable[[], Any]], repeats: int,
                log: Callable[[str], None] | None = None) -> dict[str, list[Any]]:
    """Call each run `repeats` times, alternating the order (A B, B A, ...) so that drift on a
    shared machine and first-run effects (kernel selection, allocator growth) fall on all alike."""
    results: dict[str, list[Any]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            if log is not None:
                log(f"{name} (repeat {r + 1}/{repeats})")
            results[name].append(runs[name]())
    return results


def median_timing(timings: list[Timing]) -> tuple[float, list[float]]:
    """(median seconds per step over repeats, [min, max])."""
    values = [t.seconds_per_step for t in timings]
    return statistics.median(values), [min(values), max(values)]


# ---------------------------------------------------------------------------- our loop


def time_train_loop(params: Params, latents: Tensor, labels: Tensor, info: LatentInfo, *,
                    warmup: int, steps: int, chunk: int, hooks: TrainHooks | None = None) -> Timing:
    """Steady-state step time of `msdm.diffusion_training.train_loop` itself, library code unchanged.

    The timer rides on the loop's public `evaluate` callback: with eval_every = chunk it is
    called on rank 0 after every chunk of steps and records a time stamp (it returns no
    metrics, so no sampling or FID happens). checkpoint_every is past the end, so the only
    checkpoint is the final one, after the last stamp.
    """
    if warmup < chunk or warmup % chunk or steps < chunk or steps % chunk:
        raise ValueError(f"warmup {warmup} and steps {steps} must be positive multiples of chunk {chunk}: "
                         f"the loop's evaluate callback, which stamps the time, runs every chunk steps")
    total = warmup + steps
    stamps: list[tuple[int, float]] = []

    def stamp(_model, step: int) -> dict:
        stamps.append((step, time.perf_counter()))
        return {}

    p = update(params, {"train": {"steps": total, "checkpoint_every": total + 1}, "eval": {"every": chunk}})
    train_loop(p, latents, labels, info, hooks=hooks or TrainHooks(), evaluate=stamp,
               progress=False)
    return timing_from_stamps(stamps, warmup)


# ---------------------------------------------------------------------------- the bare loop


class BareTrainer:
    """The same training step written as a plain PyTorch loop: the baseline for overhead.

    Same ViT (build_vit), same x0-target MSE with const weighting, same label dropout,
    AdamW with the same hyper-parameters, the same precision, gradient clipping and an EMA by
    `torch._foreach_lerp_`; no DiffusionLoss, strategy, weight log, NaN policy or hooks.
    """

    def __init__(self, params: Params, info: LatentInfo, *, compile_model: bool = False,
                 fused_adam: bool | None = True, seed: int = 0):
        tc = params.train
        torch.manual_seed(seed)
        self.model = build_vit(params.model.preset, in_channels=info.channels, image_size=info.size,
                               patch_size=params.model.patch_size, num_classes=info.num_classes,
                               learn_sigma=False)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.params_list = list(self.model.parameters())
        self.ema_list = list(self.ema.parameters())
        self.opt = torch.optim.AdamW(self.params_list, lr=tc.lr, betas=tuple(tc.betas),
                                     weight_decay=tc.weight_decay, fused=fused_adam)
        self.forward = torch.compile(self.model) if compile_model else self.model
        diffusion = GaussianDiffusion(params.diffusion.timesteps, params.diffusion.schedule)
        self.timesteps = diffusion.timesteps
        self.sqrt_ab = diffusion.sqrt_alphas_cumprod.float()
        self.sqrt_1m_ab = diffusion.sqrt_one_minus_alphas_cumprod.float()
        precision = resolve_precision(tc.precision, "cpu", key="train.precision")
        self.autocast = precision.autocast("cpu")  # a null context for fp32
        self.ema_decay, self.grad_clip = tc.ema_decay, tc.grad_clip
        self.label_dropout, self.null_class = params.model.label_dropout, info.num_classes

    def step(self, x0: Tensor, y: Tensor) -> Tensor:
        b = x0.shape[0]
        t = torch.randint(0, self.timesteps, (b,))
        noise = torch.randn_like(x0)
        x_t = self.sqrt_ab[t].view(b, 1, 1, 1) * x0 + self.sqrt_1m_ab[t].view(b, 1, 1, 1) * noise
        y = torch.where(torch.rand(b) < self.label_dropout, torch.full_like(y, self.null_class), y)
        if self.autocast is not None:
            with self.autocast:
                out = self.forward(x_t, t, y)
        else:
            out = self.forward(x_t, t, y)
        loss = (out.float() - x0).pow(2).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params_list, self.grad_clip)
        self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(self.ema_list, self.params_list, 1.0 - self.ema_decay)
        return loss


class EpochBatches:
    """Batches of an in-memory dataset in seeded epoch permutations (as train_loop draws them)."""

    def __init__(self, latents: Tensor, labels: Tensor, batch: int, seed: int = 0):
        if batch > len(latents):
            raise ValueError(f"batch {batch} is larger than the {len(latents)} synthetic examples")
        self.latents, self.labels, self.batch = latents, labels, batch
        self.generator = torch.Generator().manual_seed(seed)
        self.perm, self.pos = torch.randperm(len(latents), generator=self.generator), 0

    def next_indices(self) -> Tensor:
        if self.pos + self.batch > len(self.perm):
            self.perm, self.pos = torch.randperm(len(self.perm), generator=self.generator), 0
        idx = self.perm[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return idx

    def __call__(self) -> tuple[Tensor, Tensor]:
        idx = self.next_indices()
        return self.latents[idx], self.labels[idx]


def time_bare(params: Params, info: LatentInfo, latents: Tensor, labels: Tensor, *, warmup: int, steps: int,
              chunk: int, **trainer_kw: Any) -> Timing:
    trainer = BareTrainer(params, info, **trainer_kw)
    batches = EpochBatches(latents, labels, params.train.batch_size)
    return time_steps(lambda: trainer.step(*batches()), warmup=warmup, steps=steps, chunk=chunk)


class threads:
    """Context manager: run with `n` torch intra-op threads, then restore."""

    def __init__(self, n: int | None):
        self.n, self.old = n, torch.get_num_threads()

    def __enter__(self):
        if self.n:
            torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self.old)
