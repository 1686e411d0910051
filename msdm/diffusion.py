"""Discrete-time Gaussian diffusion (guided-diffusion / Min-SNR conventions).

t is an integer in {0..T-1}. alpha_bar_t = prod_{s<=t} (1 - beta_s), and
x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps.

Prediction targets:
- ``x0``: the clean sample;
- ``eps``: the noise;
- ``v``: (sqrt(alpha_bar) x_t - x0) / sqrt(1 - alpha_bar), the Min-SNR repository's form.
  Expanding x_t shows it equals sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0, the same sign
  as Salimans & Ho's v-parameterisation.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import TARGETS


def cosine_betas(timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Nichol & Dhariwal (2021) cosine schedule, betas clipped at `max_beta`."""
    def f(t):
        return math.cos((t / timesteps + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - f(i + 1) / f(i), max_beta) for i in range(timesteps)]
    return torch.tensor(betas, dtype=torch.float64)


def linear_betas(timesteps: int) -> Tensor:
    """DDPM linear schedule 1e-4 .. 0.02, rescaled by 1000/T so any T spans the same range."""
    scale = 1000 / timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, timesteps, dtype=torch.float64)


def _gather(arr: Tensor, t: Tensor, ndim: int) -> Tensor:
    """arr[t] as float32, shaped [B, 1, 1, ...] to broadcast against an ndim tensor."""
    out = arr.to(t.device)[t].float()
    return out.reshape(-1, *([1] * (ndim - 1)))


class GaussianDiffusion:
    """Schedule tables in float64 (precision at the ends matters), gathered to float32."""

    def __init__(self, timesteps: int = 1000, schedule: str = "cosine"):
        if schedule == "cosine":
            betas = cosine_betas(timesteps)
        elif schedule == "linear":
            betas = linear_betas(timesteps)
        else:
            raise ValueError(f"diffusion.schedule: got {schedule!r}, expected 'cosine' or 'linear'")
        self.timesteps = timesteps
        self.schedule = schedule
        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(alphas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()
        self.snr_table = self.alphas_cumprod / (1.0 - self.alphas_cumprod)
        # q(x_{t-1} | x_t, x0)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # posterior variance is 0 at t=0; clip the log as iDDPM does
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * alphas.sqrt() / (1.0 - self.alphas_cumprod)

    # --- forward process -------------------------------------------------------------
    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        return (_gather(self.sqrt_alphas_cumprod, t, x0.ndim) * x0
                + _gather(self.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise)

    def snr(self, t: Tensor) -> Tensor:
        """SNR(t) = alpha_bar / (1 - alpha_bar), float32 of shape [B]."""
        return self.snr_table.to(t.device)[t].float()

    # --- targets ---------------------------------------------------------------------
    def v_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        a = _gather(self.sqrt_alphas_cumprod, t, x_t.ndim)
        s = _gather(self.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
        return (a * x_t - x0) / s

    def eps_from_x0(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        a = _gather(self.sqrt_alphas_cumprod, t, x_t.ndim)
        s = _gather(self.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
        return (x_t - a * x0) / s

    # --- reverse process -------------------------------------------------------------
    def q_posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x0)."""
        mean = (_gather(self.posterior_mean_coef1, t, x_t.ndim) * x0
                + _gather(self.posterior_mean_coef2, t, x_t.ndim) * x_t)
        var = _gather(self.posterior_variance, t, x_t.ndim).expand_as(x_t)
        logvar = _gather(self.posterior_log_variance_clipped, t, x_t.ndim).expand_as(x_t)
        return mean, var, logvar

    def learned_range_log_variance(self, var_values: Tensor, t: Tensor) -> Tensor:
        """iDDPM: interpolate log variance between beta_tilde_t (v=-1) and beta_t (v=+1)."""
        min_log = _gather(self.posterior_log_variance_clipped, t, var_values.ndim)
        max_log = _gather(torch.log(self.betas), t, var_values.ndim)
        frac = (var_values + 1) / 2
        return frac * max_log + (1 - frac) * min_log

    def vlb_terms(self, x0: Tensor, x_t: Tensor, t: Tensor, model_mean: Tensor,
                  model_log_variance: Tensor) -> Tensor:
        """Per-sample VLB term in bits/dim: KL(q || p_theta) for t>0, decoder NLL at t=0."""
        true_mean, _, true_logvar = self.q_posterior(x0, x_t, t)
        kl = normal_kl(true_mean, true_logvar, model_mean, model_log_variance)
        kl = kl.flatten(1).mean(1) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_variance)
        nll = nll.flatten(1).mean(1) / math.log(2.0)
        return torch.where(t == 0, nll, kl)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: Tensor, means: Tensor, log_scales: Tensor) -> Tensor:
    """Log-likelihood of data in [-1, 1] discretised into 256 bins (DDPM / iDDPM decoder)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999, log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


class Prediction:
    """What the backbone predicts, and everything that depends on it, in one place.

    The idea of k-diffusion's `Denoiser`: the scalings between the network output, the
    regression target and x0 live here, so the loss, the weighting strategies and the
    samplers never compare target names. One instance per target: `prediction(name)`.
    """

    name = ""

    def target(self, d: GaussianDiffusion, x0: Tensor, noise: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The regression target of the training loss."""
        raise NotImplementedError

    def x0(self, d: GaussianDiffusion, x_t: Tensor, t: Tensor, output: Tensor) -> Tensor:
        """The x0 a network output implies at (x_t, t)."""
        raise NotImplementedError

    def weight_from_x0(self, w_x0: Tensor, w_x0_over_snr: Tensor, snr: Tensor) -> Tensor:
        """An x0-error weight moved onto this target's MSE.

        eps-MSE = SNR x0-MSE and v-MSE = (SNR + 1) x0-MSE at the same x_t, so w_eps = w_x0 / SNR
        and w_v = w_x0 / (SNR + 1). `w_x0_over_snr` is w_x0 / SNR in a closed form the caller
        keeps finite at SNR = 0.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"prediction({self.name!r})"


class X0Prediction(Prediction):
    name = "x0"

    def target(self, d, x0, noise, x_t, t):
        return x0

    def x0(self, d, x_t, t, output):
        return output

    def weight_from_x0(self, w_x0, w_x0_over_snr, snr):
        return w_x0


class EpsPrediction(Prediction):
    name = "eps"

    def target(self, d, x0, noise, x_t, t):
        return noise

    def x0(self, d, x_t, t, output):
        a = _gather(d.sqrt_alphas_cumprod, t, x_t.ndim)
        s = _gather(d.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
        return (x_t - s * output) / a

    def weight_from_x0(self, w_x0, w_x0_over_snr, snr):
        return w_x0_over_snr


class VPrediction(Prediction):
    """v = (sqrt(ab) x_t - x0) / sqrt(1 - ab) = sqrt(ab) eps - sqrt(1 - ab) x0."""

    name = "v"

    def target(self, d, x0, noise, x_t, t):
        return d.v_from_x0(x_t, t, x0)

    def x0(self, d, x_t, t, output):
        a = _gather(d.sqrt_alphas_cumprod, t, x_t.ndim)
        s = _gather(d.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
        return a * x_t - s * output

    def weight_from_x0(self, w_x0, w_x0_over_snr, snr):
        # not w_x0_over_snr * snr: that is 0 at SNR = 0 even where w_x0 is not (dysigma)
        return w_x0 / (snr + 1)


_PREDICTIONS = {cls.name: cls() for cls in (X0Prediction, EpsPrediction, VPrediction)}
assert tuple(_PREDICTIONS) == TARGETS


def prediction(name: str) -> Prediction:
    """The `Prediction` for `diffusion.target` (x0, eps or v)."""
    try:
        return _PREDICTIONS[name]
    except KeyError:
        raise ValueError(f"diffusion.target: got {name!r}, expected one of {', '.join(TARGETS)}") from None
