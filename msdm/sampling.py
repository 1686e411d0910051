"""Samplers over a respaced timestep grid, with CFG: DDIM (eta), DDPM ancestral and DPM-Solver++(2M).

All three work on a grid of integer timesteps. Between consecutive grid points t > s the step's
beta is 1 - alpha_bar_t / alpha_bar_s, as in iDDPM's respacing, so a learned variance
(learn_sigma) interpolates between that beta and its posterior variance.

Near t = T-1 the cosine schedule's alpha_bar is ~2e-9, so an eps or v model's x0 there is its
output error divided by ~5e-5. Two guards, as in the reference codebases:
- `spacing="leading"` (guided-diffusion's "ddimN", LDM, diffusers' default) never calls the
  model at T-1: the grid is 0, T/S, 2T/S, .. and the first step starts from pure noise there.
- `Denoiser(x0_range=...)` clamps x0 to the per-channel range of the training latents, the
  latent analogue of guided-diffusion's `clip_denoised` to [-1, 1].
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
from torch import Tensor, nn

from .config import SAMPLERS, SPACINGS
from .diffusion import GaussianDiffusion, Prediction, prediction

ModelFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]


KARRAS_SIGMA_MAX = 80.0  # EDM's sigma_max, as the Min-SNR codebase samples
KARRAS_RHO = 7.0


def timestep_grid(timesteps: int, steps: int, spacing: str = "leading",
                  alphas_cumprod: Tensor | None = None) -> list[int]:
    """Up to `steps` distinct timesteps in decreasing order (exactly `steps` unless karras).

    leading: 0, T//S, 2*(T//S), ..  (never T-1); linspace: evenly from T-1 down to 0 (includes
    both ends); trailing: T-1, T-1-T/S, .. (diffusers' "trailing": starts at T-1, ends above 0);
    karras: EDM's rho=7 spacing in sigma = sqrt((1 - ab) / ab) from min(80, sigma_{T-1}) down to
    sigma_0, each sigma rounded to the nearest timestep of the schedule `alphas_cumprod` (as
    k-diffusion does for discrete models); dense near t = 0, where few-step solvers need it.
    """
    if not 1 <= steps <= timesteps:
        raise ValueError(f"sampling steps: got {steps}, expected 1..{timesteps}")
    if spacing not in SPACINGS:
        raise ValueError(f"eval.spacing: got {spacing!r}, expected one of {', '.join(SPACINGS)}")
    if steps == 1:  # a single step goes from pure noise to x0, whatever the spacing
        return [timesteps - 1]
    if spacing == "leading":
        grid = [i * (timesteps // steps) for i in range(steps)]
    elif spacing == "linspace":
        grid = torch.linspace(0, timesteps - 1, steps).round().long().unique().tolist()
    elif spacing == "trailing":
        grid = [round(timesteps - i * timesteps / steps) - 1 for i in range(steps)]
    else:
        if alphas_cumprod is None or len(alphas_cumprod) != timesteps:
            raise ValueError("karras spacing needs the schedule's alphas_cumprod")
        log_sigma = (0.5 * ((1 - alphas_cumprod) / alphas_cumprod).log()).double()
        s_max = min(KARRAS_SIGMA_MAX, float(log_sigma[-1].exp()))
        s_min = float(log_sigma[0].exp())
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
        inv = 1 / KARRAS_RHO
        sigmas = (s_max ** inv + ramp * (s_min ** inv - s_max ** inv)) ** KARRAS_RHO
        grid = (sigmas.log()[:, None] - log_sigma[None]).abs().argmin(dim=1).tolist()
    return sorted(set(grid), reverse=True)


class Denoiser:
    """Turns backbone outputs into (x0 prediction, variance values or None), applying CFG."""

    def __init__(self, model: nn.Module | ModelFn, diffusion: GaussianDiffusion, target: Prediction | str, *,
                 learn_sigma: bool, cfg_scale: float = 1.0, null_class: int | None = None,
                 autocast: contextlib.AbstractContextManager | None = None,
                 x0_range: tuple[Tensor, Tensor] | None = None):
        self.model, self.diffusion = model, diffusion
        self.x0_range = x0_range  # per-channel (min, max), each [C]; None: no clamp
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
        x0 = self.target.x0(self.diffusion, x, t, pred)
        if self.x0_range is not None:
            lo, hi = (r.to(x0.device, x0.dtype).view(1, -1, *([1] * (x0.ndim - 2))) for r in self.x0_range)
            x0 = torch.maximum(torch.minimum(x0, hi), lo)
        return x0, var


@torch.inference_mode()
def sample(denoiser: Denoiser, shape: tuple[int, ...], *, labels: Tensor | None, steps: int,
           sampler: str = "ddim", eta: float = 0.0, spacing: str = "leading",
           generator: torch.Generator | None = None, device: torch.device | str = "cpu",
           noise: Tensor | None = None) -> Tensor:
    """Draw samples with `sampler` (one of SAMPLERS) over `timestep_grid(T, steps, spacing)`.

    ddim: eta-DDIM; ddpm: ancestral, with the learned variance where the model has one;
    dpmpp_2m: DPM-Solver++(2M), a deterministic second-order multistep ODE solver on the
    model's x0 (a learned variance is not used: the ODE has no noise term).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"eval.sampler: got {sampler!r}, expected one of {', '.join(SAMPLERS)}")
    d = denoiser.diffusion
    x = noise.to(device) if noise is not None else torch.randn(shape, generator=generator, device=device)
    grid = timestep_grid(d.timesteps, steps, spacing, d.alphas_cumprod)
    if sampler == "dpmpp_2m":
        return _dpmpp_2m(denoiser, x, grid, labels, device)
    ab_table = d.alphas_cumprod
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
            log_var = frac * math.log(beta) + (1 - frac) * math.log(post_var)
            x = mean + torch.exp(0.5 * log_var) * z
        else:
            x = mean + post_var ** 0.5 * z
    return x


def _dpmpp_2m(denoiser: Denoiser, x: Tensor, grid: list[int], labels: Tensor | None, device) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) in VP form, lambda = log(alpha / sigma).

    x_s = (sigma_s / sigma_t) x_t - alpha_s expm1(-h) D, h = lambda_s - lambda_t, where D is the
    x0 prediction extrapolated from the previous step (first order on the first step). The last
    step lands on alpha = 1, sigma = 0, where the update is x = x0 (k-diffusion does the same).
    """
    ab_table = denoiser.diffusion.alphas_cumprod
    prev_x0, h_prev = None, 0.0
    for i, t_now in enumerate(grid):
        t = torch.full((x.shape[0],), t_now, device=device, dtype=torch.long)
        x0, _ = denoiser(x, t, labels)
        if i + 1 == len(grid):
            return x0
        ab, ab_next = float(ab_table[t_now]), float(ab_table[grid[i + 1]])
        lam, lam_next = 0.5 * math.log(ab / (1 - ab)), 0.5 * math.log(ab_next / (1 - ab_next))
        h = lam_next - lam
        if prev_x0 is None:
            d = x0
        else:  # r = h_prev / h; D = (1 + 1/(2r)) x0 - 1/(2r) x0_prev
            c = h / (2 * h_prev)
            d = (1 + c) * x0 - c * prev_x0
        x = ((1 - ab_next) / (1 - ab)) ** 0.5 * x - ab_next ** 0.5 * math.expm1(-h) * d
        prev_x0, h_prev = x0, h
    return x
