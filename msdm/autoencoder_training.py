"""Train and evaluate the stage-1 multi-space autoencoder on in-memory uint8 images.

The training data stay uint8 in memory (Fashion-MNIST train is 61 MB) and each batch
is converted to [-1, 1] floats when it is drawn. Batches are epoch permutations from a
seeded generator, so a run is reproducible given (seed, data, config).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm import tqdm

from msdm.data import from_uint8
from msdm.losses import ReconstructionLoss, ssim
from msdm.precision import Precision, as_precision

WARMUP_FRACTION = 0.02  # linear lr warm-up over the first 2% of steps, then cosine to 0
ADAMW_BETAS = (0.9, 0.99)
ADAMW_WEIGHT_DECAY = 1e-4  # light: a 240k-parameter model on 60k images has little to regularise


def cosine_with_warmup(step: int, total: int) -> float:
    """lr multiplier at `step` of `total`."""
    warmup = max(1, int(WARMUP_FRACTION * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless epoch permutations of range(n) cut into batches (the last one of an epoch may be short)."""
    while True:
        perm = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            yield perm[start:start + batch_size]


@dataclass
class AutoencoderTrainResult:
    losses: list[tuple[int, float]] = field(default_factory=list)  # (step, mean loss over the log window)
    final_loss: float = float("nan")
    train_seconds: float = 0.0
    precision: Precision | None = None


def train_autoencoder(model: nn.Module, images_u8: torch.Tensor, *, steps: int, batch_size: int, lr: float,
                      loss_fn: ReconstructionLoss, precision: Precision | str = "auto", seed: int = 0,
                      device: torch.device | str = "cpu", progress: bool = True,
                      log_every: int = 50) -> AutoencoderTrainResult:
    """Train `model` in place on uint8 images [N, C, S, S]; returns the loss history.

    The history holds the mean loss of every `log_every` steps (the finiteness check runs
    at the same cadence, so the device is synchronised only then).
    AdamW with linear warm-up then cosine decay to 0; loss computed in fp32. `precision` is
    resolved for `device` (see msdm.precision) and returned in the result.
    Raises FloatingPointError on a non-finite loss (lower autoencoder.lr).
    """
    if images_u8.dtype != torch.uint8 or images_u8.ndim != 4 or len(images_u8) == 0:
        raise ValueError(f"expected non-empty uint8 images [N, C, H, W], got {images_u8.dtype} "
                         f"{tuple(images_u8.shape)}")
    device = torch.device(device)
    # resolved (and validated) before any compute
    precision = as_precision(precision, device, key="autoencoder.precision")
    autocast = precision.autocast(device)
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    # channels_last: the training step runs 1.02-1.05x faster on the 2-core Zen 4 CPU
    # (benchmarks/run_all.py --only precision, two runs)
    model.to(device, memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=ADAMW_BETAS, weight_decay=ADAMW_WEIGHT_DECAY,
                                  fused=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine_with_warmup(s, steps))
    scaler = torch.amp.GradScaler("cuda", enabled=precision.needs_grad_scaler)
    result = AutoencoderTrainResult(precision=precision)
    batches = _batches(len(images_u8), batch_size, generator)
    window: list[torch.Tensor] = []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="autoencoder", disable=None if progress else True)
    for step in bar:
        x = from_uint8(images_u8[next(batches)]).to(device, non_blocking=True)
        x = x.contiguous(memory_format=torch.channels_last)
        with autocast:
            recon = model(x)
        loss, _ = loss_fn(x, recon)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        window.append(loss.detach())
        if (step + 1) % log_every == 0 or step + 1 == steps:
            mean = torch.stack(window).mean().item()
            window.clear()
            if not math.isfinite(mean):
                raise FloatingPointError(f"autoencoder loss became {mean} by step {step + 1}; "
                                         f"lower autoencoder.lr (now {lr})")
            result.losses.append((step + 1, mean))
            bar.set_postfix(loss=f"{mean:.4f}")
    result.train_seconds = time.perf_counter() - start
    result.final_loss = result.losses[-1][1] if result.losses else float("nan")
    model.eval()
    return result


@torch.inference_mode()
def reconstruct(model: nn.Module, images_u8: torch.Tensor, *, batch_size: int = 1000,
                device: torch.device | str = "cpu") -> torch.Tensor:
    """fp32 reconstructions in [-1, 1] (clamped) of uint8 images, on the CPU."""
    model.eval().to(device)
    out = [model(from_uint8(images_u8[i:i + batch_size]).to(device)).clamp(-1, 1).cpu()
           for i in range(0, len(images_u8), batch_size)]
    return torch.cat(out)


@torch.inference_mode()
def reconstruction_metrics(model: nn.Module, images_u8: torch.Tensor, *, batch_size: int = 1000,
                           device: torch.device | str = "cpu", progress: bool = True) -> dict[str, float]:
    """Mean per-image SSIM, PSNR (dB) and L1 of fp32 reconstructions clamped to [-1, 1].

    PSNR uses the [-1, 1] peak-to-peak range 2 (same number as on [0, 1] images with peak 1);
    l1 is the mean absolute error on the [0, 1] pixel scale.
    """
    model.eval().to(device)
    ssims, psnrs, l1s = [], [], []
    for i in tqdm(range(0, len(images_u8), batch_size), desc="evaluate", disable=None if progress else True):
        x = from_uint8(images_u8[i:i + batch_size]).to(device)
        y = model(x).float().clamp(-1, 1)
        ssims.append(ssim(x, y, reduction="none").cpu())
        mse = ((x - y) ** 2).flatten(1).mean(1).clamp_min(1e-12)  # floor: a perfect image gives 120 dB, not inf
        psnrs.append((10 * torch.log10(4.0 / mse)).cpu())
        l1s.append(((x - y).abs().flatten(1).mean(1) / 2).cpu())
    return {"ssim": torch.cat(ssims).mean().item(), "psnr": torch.cat(psnrs).mean().item(),
            "l1": torch.cat(l1s).mean().item(), "num_images": int(len(images_u8))}


def save_reconstruction_grid(model: nn.Module, images_u8: torch.Tensor, path, *, batch_size: int = 1000,
                             device: torch.device | str = "cpu", title: str = "") -> None:
    """A labelled PNG: the test images (top row) above their reconstructions, written atomically."""
    from msdm.data import to_uint8
    from msdm.plots import save_row_grid

    recon = to_uint8(reconstruct(model, images_u8, batch_size=batch_size, device=device))
    save_row_grid([images_u8, recon], ["original", "reconstruction"], path, title=title)
