"""The diffusion training loss: joint multi-space diffusion with an injected weighting.

Kept small on purpose (EDM2 style): sample t and noise, call the backbone once on all
subspaces concatenated on channels, and hand the per-subspace MSE to the strategy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .diffusion import GaussianDiffusion, Prediction, prediction
from .weighting import LossContext, WeightingStrategy


@dataclass
class LossOutput:
    loss: Tensor          # scalar to backpropagate
    per_sample: Tensor    # [B]
    mse: Tensor           # [B, K] per-subspace MSE on the trained target (detached)
    weights: Tensor       # [B, K] effective weights (detached)
    t: Tensor             # [B]


class DiffusionLoss:
    def __init__(self, diffusion: GaussianDiffusion, strategy: WeightingStrategy, *, target: Prediction | str,
                 subspaces: int, label_dropout: float, null_class: int | None):
        self.diffusion = diffusion
        self.strategy = strategy
        self.target = prediction(target) if isinstance(target, str) else target
        self.subspaces = subspaces
        self.label_dropout = label_dropout
        self.null_class = null_class

    def __call__(self, model: nn.Module, x0: Tensor, labels: Tensor | None,
                 generator: torch.Generator | None = None, autocast: torch.autocast | None = None) -> LossOutput:
        b, c = x0.shape[:2]
        if c % self.subspaces:
            raise ValueError(f"latent has {c} channels, not divisible into {self.subspaces} subspaces")
        dev = x0.device
        t = torch.randint(0, self.diffusion.timesteps, (b,), device=dev, generator=generator)
        noise = torch.randn(x0.shape, device=dev, generator=generator)
        x_t = self.diffusion.q_sample(x0, t, noise)
        y = labels
        if y is not None and self.null_class is not None and self.label_dropout > 0:
            drop = torch.rand(b, device=dev, generator=generator) < self.label_dropout
            y = torch.where(drop, torch.full_like(y, self.null_class), y)
        if autocast is not None:
            with autocast:
                out = model(x_t, t, y)
        else:
            out = model(x_t, t, y)
        out = out.float()
        var_values = None
        if self.strategy.learns_variance:
            out, var_values = out.chunk(2, dim=1)
        target = self.target.target(self.diffusion, x0, noise, x_t, t)
        mse = (target - out).pow(2).reshape(b, self.subspaces, -1).mean(2)
        ctx = LossContext(t=t, snr=self.diffusion.snr(t), target=self.target, mse=mse,
                          diffusion=self.diffusion, x0=x0, x_t=x_t, prediction=out, var_values=var_values)
        per_sample, weights = self.strategy(ctx)
        return LossOutput(loss=per_sample.mean(), per_sample=per_sample.detach(), mse=mse.detach(),
                          weights=weights, t=t)
