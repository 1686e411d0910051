"""Samplers: DDIM (eta) and DDPM ancestral over any subsequence of timesteps, with CFG.

Both work on a respaced grid: between consecutive grid points t > s the step's beta is
1 - alpha_bar_t / alpha_bar_s, as in iDDPM's respacing, so a learned variance
(learn_sigma) interpolates between that beta and its posterior variance.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import Tensor, nn

from .diffusion import GaussianDiffusion, Prediction, prediction

ModelFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def timestep_grid(timesteps: int, steps: int) -> list[int]:
    """`steps` distinct, evenly spaced timesteps from T-1 down to 0."""
    if not 1 <= steps <= timesteps:
        raise ValueError(f"sampling steps: got {steps}, expected 1..{timesteps}")
    if steps == 1:  # linspace(0, T-1, 1) is [0]: one step must start from pure noise at T-1
        return [timesteps - 1]
    grid = torch.linspace(0, timesteps - 1, steps).round().long().unique().tolist()
    return sorted(grid, reverse=True)


class Denoiser:
    """Turns backbone outputs into (x0 prediction, variance values or None), applying CFG."""

    def __init__(self, model: nn.Module | ModelFn, diffusion: GaussianDiffusion, target: Prediction | str, *,
                 learn_sigma: bool, cfg_scale: float = 1.0, null_class: int | None = None,
                 autocast: contextlib.AbstractContextManager | None = None):
        self.model, self.diffusion = model, diffusion
        self.target = prediction(target) if isinstance(target, str) else target
        self.learn_sigma, self.cfg_scale, self.null_class = learn_sigma, cfg_scale, null_class
        self.autocast = autocast

    def _raw(self, x: Tensor, t: Tensor, y: Tensor | None) -> Tensor:
        with self.autocast if self.autocast is not None else contextlib.nullcontext():
            return self.model(x, t, y).float()

    def __call__(self, x: Tensor, t: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor | None]:
        guided = y is not None and self.null_class is not None and self.cfg_scale != 1.0
        if guided:
            out = self._raw(torch.cat([x, x]), torch.cat([t, t]),
                            torch.cat([y, torch.full_like(y, self.null_class)]))
            cond, uncond = out.chunk(2)
        else:
            cond = self._raw(x, t, y)
        var = None
        if self.learn_sigma:
            cond, var = cond.chunk(2, dim=1)
            if guided:
                uncond = uncond.chunk(2, dim=1)[0]
        pred = uncond + self.cfg_scale * (cond - uncond) if guided else cond
        return self.target.x0(self.diffusion, x, t, pred), var


@torch.inference_mode()
def sample(denoiser: Denoiser, shape: tuple[int, ...], *, labels: Tensor | None, steps: int,
           sampler: str = "ddim", eta: float = 0.0, generator: torch.Generator | None = None,
           device: torch.device | str = "cpu", noise: Tensor | None = None) -> Tensor:
    """Draw samples. `sampler` is 'ddim' (eta) or 'ddpm' (ancestral, learned variance if any)."""
    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"eval.sampler: got {sampler!r}, expected 'ddim' or 'ddpm'")
    d = denoiser.diffusion
    ab_table = d.alphas_cumprod
    x = noise.to(device) if noise is not None else torch.randn(shape, generator=generator, device=device)
    grid = timestep_grid(d.timesteps, steps)
    for i, t_now in enumerate(grid):
        t_prev = grid[i + 1] if i + 1 < len(grid) else -1
        ab = float(ab_table[t_now])
        ab_prev = float(ab_table[t_prev]) if t_prev >= 0 else 1.0
        t = torch.full((shape[0],), t_now, device=device, dtype=torch.long)
        x0, var_values = denoiser(x, t, labels)
        eps = (x - ab ** 0.5 * x0) / (1 - ab) ** 0.5
        z = torch.randn(x.shape, generator=generator, device=device) if t_prev >= 0 else None
        if sampler == "ddim":
            sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)) ** 0.5
            x = ab_prev ** 0.5 * x0 + max(1 - ab_prev - sigma ** 2, 0.0) ** 0.5 * eps
            if z is not None and sigma > 0:
                x = x + sigma * z
            continue
        beta = 1 - ab / ab_prev
        mean = (ab_prev ** 0.5 * beta / (1 - ab)) * x0 + ((1 - beta) ** 0.5 * (1 - ab_prev) / (1 - ab)) * x
        if z is None:
            x = mean
            continue
        post_var = beta * (1 - ab_prev) / (1 - ab)
        if var_values is not None:
            frac = (var_values + 1) / 2
            log_var = frac * torch.log(torch.tensor(beta)) + (1 - frac) * torch.log(torch.tensor(post_var))
            x = mean + torch.exp(0.5 * log_var) * z
        else:
            x = mean + post_var ** 0.5 * z
    return x
