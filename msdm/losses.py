"""Stage-1 reconstruction losses (docs/method.md): hybrid SSIM + Huber, and L2 for the ablation.

Images are in [-1, 1]. SSIM is computed on (x + 1) / 2 with data_range = 1, i.e. the
standard SSIM of the [0, 1] image. SSIM's luminance term (2 mu_x mu_y + C1) / (mu_x^2 +
mu_y^2 + C1) is not shift invariant, so feeding [-1, 1] directly (data_range = 2) gives a
different, ill-conditioned number around mid-grey (mu ~ 0); the shift makes the loss and
the reported metric the SSIM everyone else reports.

Everything is computed in fp32, also under bf16 autocast: 1 - SSIM is a small difference
of numbers close to 1, which bf16's 8-bit mantissa cannot resolve.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from pytorch_msssim import ssim as _pytorch_msssim_ssim
from torch import nn

SSIM_WIN_SIZE = 11
SSIM_WIN_SIGMA = 1.5
RECON_LOSSES = ("hybrid", "l2")


def ssim(x: torch.Tensor, y: torch.Tensor, *, reduction: str = "mean") -> torch.Tensor:
    """SSIM of [-1, 1] images (Gaussian window 11, sigma 1.5), fp32; 'mean' or per-image 'none'."""
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction: got {reduction!r}, expected 'mean' or 'none'")
    with torch.autocast(x.device.type, enabled=False):
        x01, y01 = (x.float() + 1) / 2, (y.float() + 1) / 2
        if reduction == "mean":
            # Same number, 11x faster on CPU: images as the channels of one sample make
            # pytorch-msssim's Gaussian filter a depthwise conv (fast in oneDNN) instead of
            # a 1-channel conv over a batch, whose backward is slow. The mean over
            # channels of one sample equals the mean over images of the per-image SSIM.
            x01, y01 = x01.reshape(1, -1, *x01.shape[2:]), y01.reshape(1, -1, *y01.shape[2:])
        return _pytorch_msssim_ssim(x01, y01, data_range=1.0, size_average=reduction == "mean",
                                    win_size=SSIM_WIN_SIZE, win_sigma=SSIM_WIN_SIGMA)


def hybrid_recon_terms(x: torch.Tensor, y: torch.Tensor, huber_delta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """The two terms of the hybrid loss, (1 - SSIM, Huber), both fp32 scalars."""
    with torch.autocast(x.device.type, enabled=False):
        x, y = x.float(), y.float()
        return 1.0 - ssim(x, y), F.huber_loss(y, x, delta=huber_delta)


def hybrid_recon_loss(x: torch.Tensor, y: torch.Tensor, ssim_weight: float = 0.3,
                      huber_delta: float = 0.1) -> torch.Tensor:
    """lambda * (1 - SSIM(x, y)) + (1 - lambda) * Huber_delta(x, y), lambda = ssim_weight."""
    if not 0.0 <= ssim_weight <= 1.0:
        raise ValueError(f"ssim_weight: got {ssim_weight}, expected a value in [0, 1]")
    ssim_term, huber_term = hybrid_recon_terms(x, y, huber_delta)
    return ssim_weight * ssim_term + (1.0 - ssim_weight) * huber_term


def l2_recon_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error in fp32 (the ablation baseline)."""
    with torch.autocast(x.device.type, enabled=False):
        return F.mse_loss(y.float(), x.float())


class ReconstructionLoss(nn.Module):
    """The configured reconstruction loss; `forward(target, recon) -> (loss, parts)`.

    `parts` holds each term detached (tensors, so logging costs no device sync per step).
    """

    def __init__(self, kind: str = "hybrid", ssim_weight: float = 0.3, huber_delta: float = 0.1):
        super().__init__()
        if kind not in RECON_LOSSES:
            raise ValueError(f"autoencoder.recon_loss: got {kind!r}, expected one of {', '.join(RECON_LOSSES)}")
        if not 0.0 <= ssim_weight <= 1.0:
            raise ValueError(f"autoencoder.ssim_weight: got {ssim_weight}, expected a value in [0, 1]")
        if huber_delta <= 0:
            raise ValueError(f"autoencoder.huber_delta: got {huber_delta}, expected a value > 0")
        self.kind, self.ssim_weight, self.huber_delta = kind, ssim_weight, huber_delta

    @classmethod
    def from_config(cls, cfg) -> "ReconstructionLoss":
        """From an `msdm.config.AutoencoderConfig`."""
        return cls(cfg.recon_loss, cfg.ssim_weight, cfg.huber_delta)

    def forward(self, target: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.kind == "l2":
            loss = l2_recon_loss(target, recon)
            return loss, {"l2": loss.detach()}
        ssim_term, huber_term = hybrid_recon_terms(target, recon, self.huber_delta)
        loss = self.ssim_weight * ssim_term + (1.0 - self.ssim_weight) * huber_term
        return loss, {"one_minus_ssim": ssim_term.detach(), "huber": huber_term.detach()}
