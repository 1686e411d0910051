"""Loss-weight strategies, one small class each, injected into the diffusion loss.

Every strategy sees the per-sample, per-subspace MSE on the *trained* target and returns
the per-sample loss plus the effective weight it put on each subspace's MSE (for logging).

Predefined weights are defined on the x0 error and moved to the trained target with
    w_eps = w_x0 / SNR,   w_v = w_x0 / (SNR + 1)
because eps-MSE = SNR * x0-MSE and v-MSE = (SNR + 1) * x0-MSE at the same x_t. The formulas
below are written in closed forms that stay finite at SNR = 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import STRATEGIES, WeightingConfig
from .diffusion import GaussianDiffusion, Prediction, prediction


@dataclass
class LossContext:
    """What a strategy may look at. Tensors are float32; `mse` is [B, K]."""

    t: Tensor
    snr: Tensor
    target: Prediction                    # what the backbone predicts (msdm.diffusion.prediction)
    mse: Tensor
    diffusion: GaussianDiffusion
    x0: Tensor | None = None
    x_t: Tensor | None = None
    prediction: Tensor | None = None      # the model's target prediction (mean channels)
    var_values: Tensor | None = None      # the model's variance channels, in [-1, 1] nominally

    def __post_init__(self):
        if isinstance(self.target, str):  # a diffusion.target name, looked up once
            self.target = prediction(self.target)


def min_snr_weight(snr: Tensor, target: Prediction, gamma: float) -> Tensor:
    """Min-SNR-gamma (Hang et al. 2023) on `target`; w = 1 where SNR = 0 by definition."""
    w_x0 = snr.clamp(max=gamma)
    safe = torch.where(snr > 0, snr, torch.ones_like(snr))
    w = target.weight_from_x0(w_x0, w_x0 / safe, snr)
    return torch.where(snr > 0, w, torch.ones_like(w))


class WeightingStrategy(nn.Module):
    """Base class. Subclasses implement `weights` (predefined) or override `forward`."""

    name = "base"
    learns_variance = False  # the backbone must output 2x channels (iDDPM learn_sigma)

    def __init__(self, cfg: WeightingConfig, subspaces: int):
        super().__init__()
        self.cfg = cfg
        self.subspaces = subspaces

    def weights(self, ctx: LossContext) -> Tensor:  # [B]
        raise NotImplementedError

    def forward(self, ctx: LossContext) -> tuple[Tensor, Tensor]:
        """Return (per-sample loss [B], effective weight per subspace [B, K], detached)."""
        w = self.weights(ctx).unsqueeze(1).expand_as(ctx.mse)
        return (w * ctx.mse).sum(1), w.detach()


class Const(WeightingStrategy):
    name = "const"

    def weights(self, ctx):
        return torch.ones_like(ctx.snr)


class MinSNR(WeightingStrategy):
    name = "min_snr"

    def weights(self, ctx):
        return min_snr_weight(ctx.snr, ctx.target, self.cfg.gamma)


class SoftMinSNR(WeightingStrategy):
    """k-diffusion's soft-min-SNR: w_x0 = 1 / (sigma^2 + sigma_data^2), sigma^2 = 1/SNR."""

    name = "soft_min_snr"

    def weights(self, ctx):
        sd2 = self.cfg.sigma_data ** 2
        w_over_snr = 1.0 / (1.0 + ctx.snr * sd2)
        return ctx.target.weight_from_x0(ctx.snr * w_over_snr, w_over_snr, ctx.snr)


class P2(WeightingStrategy):
    """P2 weighting (Choi et al. 2022), defined on eps: 1 / (k + SNR)^gamma."""

    name = "p2"

    def weights(self, ctx):
        w_eps = (self.cfg.p2_k + ctx.snr) ** (-self.cfg.p2_gamma)
        return ctx.target.weight_from_x0(ctx.snr * w_eps, w_eps, ctx.snr)


class FourierFeatures(nn.Module):
    """Fixed random Fourier features of normalised time (EDM2's MPFourier)."""

    def __init__(self, num_features: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_features, generator=g))
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_features, generator=g))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cos(x.float().unsqueeze(1) * self.freqs + self.phases) * math.sqrt(2)


class Learned(WeightingStrategy):
    """Uncertainty weighting (Kendall et al. 2018; EDM2): exp(-u(t,k)) * L + u(t,k).

    u is a linear layer on fixed Fourier features of t, one output per subspace, and is
    trained by the model's optimizer. It starts at 0 (weight 1).
    """

    name = "learned"

    def __init__(self, cfg, subspaces):
        super().__init__(cfg, subspaces)
        self.fourier = FourierFeatures(cfg.fourier_features)
        self.linear = nn.Linear(cfg.fourier_features, subspaces)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def prior(self, ctx: LossContext) -> Tensor:
        return torch.ones_like(ctx.snr)

    def log_variance(self, t: Tensor, timesteps: int) -> Tensor:
        """u(t, k), shape [B, K]."""
        return self.linear(self.fourier(2 * t.float() / timesteps - 1))

    def forward(self, ctx):
        u = self.log_variance(ctx.t, ctx.diffusion.timesteps)
        w = self.prior(ctx).unsqueeze(1) * torch.exp(-u)
        return (w * ctx.mse + u).sum(1), w.detach()


class DySigmaMinSNR(Learned):
    """The paper's wording, 'predefined + learnable': min_snr(t) * exp(-u(t,k)) * L + u(t,k)."""

    name = "dysigma_min_snr"

    def prior(self, ctx):
        return min_snr_weight(ctx.snr, ctx.target, self.cfg.gamma)


class DySigma(WeightingStrategy):
    """The MSDM authors' code (`mse_loss_weight_type == "dysigma"`).

    The model also outputs v in [-1, 1]; Sigma = exp(v' log beta_t + (1 - v') log beta~_t),
    v' = (v + 1)/2. The weight is the detached mean of Sigma over each subspace's channels,
    clamped to [0, clamp_max]; the variance itself is trained only by the iDDPM VLB term on
    the frozen mean. The weight is an x0 weight; for eps or v targets it is converted like
    the predefined weights and clamped after conversion so the loss stays bounded.
    """

    name = "dysigma"
    learns_variance = True

    def forward(self, ctx):
        if ctx.var_values is None or ctx.prediction is None or ctx.x_t is None or ctx.x0 is None:
            raise ValueError("dysigma needs the model's variance channels (learn_sigma) and x0, x_t")
        d = ctx.diffusion
        log_var = d.learned_range_log_variance(ctx.var_values, ctx.t)
        b, k = ctx.mse.shape
        sigma = torch.exp(log_var).reshape(b, k, -1).mean(2).detach()
        snr = ctx.snr.unsqueeze(1)
        # sigma > 0, so the eps weight sigma / SNR is +inf at SNR = 0 and clamps to clamp_max
        w = ctx.target.weight_from_x0(sigma, sigma / snr, snr).clamp(0.0, self.cfg.clamp_max)
        x0_hat = ctx.target.x0(d, ctx.x_t, ctx.t, ctx.prediction.detach())
        frozen_mean, _, _ = d.q_posterior(x0_hat, ctx.x_t, ctx.t)
        vlb = d.vlb_terms(ctx.x0, ctx.x_t, ctx.t, frozen_mean, log_var)
        return (w * ctx.mse).sum(1) + vlb, w


_REGISTRY: dict[str, type[WeightingStrategy]] = {
    cls.name: cls for cls in (Const, MinSNR, Learned, DySigma, DySigmaMinSNR, SoftMinSNR, P2)
}
assert set(_REGISTRY) == set(STRATEGIES), "config.STRATEGIES and the registry disagree"


def build_strategy(cfg: WeightingConfig, subspaces: int = 1) -> WeightingStrategy:
    """The strategy named by `weighting.strategy`; unknown names list the valid choices."""
    try:
        cls = _REGISTRY[cfg.strategy]
    except KeyError:
        raise ValueError(
            f"weighting.strategy: got {cfg.strategy!r}, expected one of {', '.join(sorted(_REGISTRY))}"
        ) from None
    if subspaces < 1:
        raise ValueError(f"subspaces: got {subspaces}, expected >= 1")
    return cls(cfg, subspaces)


def strategy_learns_variance(name: str) -> bool:
    if name not in _REGISTRY:
        raise ValueError(f"weighting.strategy: got {name!r}, expected one of {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name].learns_variance


class WeightLog:
    """Running mean of the effective weight per t-bucket, for the weight-dynamics plots."""

    def __init__(self, timesteps: int, buckets: int):
        self.timesteps, self.buckets = timesteps, buckets
        self.reset()

    def reset(self) -> None:
        self.total: Tensor | None = None  # allocated on the device of the first batch
        self.count: Tensor | None = None

    def add(self, t: Tensor, weights: Tensor) -> None:
        if self.total is None:
            self.total = torch.zeros(self.buckets, dtype=torch.float64, device=t.device)
            self.count = torch.zeros(self.buckets, dtype=torch.float64, device=t.device)
        idx = (t.detach() * self.buckets // self.timesteps).clamp(max=self.buckets - 1)
        w = weights.detach().double().mean(1)
        self.total.index_add_(0, idx, w)
        self.count.index_add_(0, idx, torch.ones_like(w))

    def state(self) -> dict:
        """The running sums, for a checkpoint (a resumed run then logs the same means)."""
        return {"total": None if self.total is None else self.total.cpu(),
                "count": None if self.count is None else self.count.cpu()}

    def load_state(self, state: dict, device: str | torch.device = "cpu") -> None:
        self.total = None if state["total"] is None else state["total"].to(device)
        self.count = None if state["count"] is None else state["count"].to(device)

    def means(self) -> list[float]:
        """Mean weight per bucket (NaN for buckets not sampled since the last reset)."""
        if self.total is None:
            return [float("nan")] * self.buckets
        return (self.total / self.count).cpu().tolist()
