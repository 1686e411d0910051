"""Samplers on a model that was really trained, for every prediction target.

A tiny MLP denoiser learns a two-mode Gaussian mixture "latent" (8 numbers per sample) with
the project's own loss. Its errors are those of a real network, so this is where an eps
model's x0 at t = T-1 (its error divided by sqrt(alpha_bar) ~ 5e-5 under the cosine schedule)
shows up. The default sampler settings (EvalConfig) must give finite samples at the data's
scale for x0, eps and v; the sampler used before (DDIM over a grid that starts at T-1, no x0
clamp) must not, for eps, or this test would not guard anything.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from msdm.config import EvalConfig, WeightingConfig
from msdm.diffusion import GaussianDiffusion
from msdm.diffusion_loss import DiffusionLoss
from msdm.models.vit import timestep_embedding
from msdm.sampling import Denoiser, sample
from msdm.weighting import build_strategy

DIFFUSION = GaussianDiffusion(1000, "cosine")
SHAPE = (2, 2, 2)  # channels, h, w
MODE, SPREAD = 1.5, 0.3


def mixture(n: int, generator: torch.Generator) -> torch.Tensor:
    """Half the samples around +MODE, half around -MODE (all 8 numbers of a sample share the mode)."""
    sign = torch.randint(0, 2, (n, 1, 1, 1), generator=generator).float() * 2 - 1
    return sign * MODE + SPREAD * torch.randn(n, *SHAPE, generator=generator)


class TinyDenoiser(nn.Module):
    def __init__(self, hidden: int = 128, embed: int = 32):
        super().__init__()
        self.embed = embed
        dim = SHAPE[0] * SHAPE[1] * SHAPE[2]
        self.net = nn.Sequential(nn.Linear(dim + embed, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, dim))

    def forward(self, x, t, y=None):
        return self.net(torch.cat([x.flatten(1), timestep_embedding(t, self.embed)], 1)).view_as(x)


@pytest.fixture(scope="module")
def trained():
    """target -> trained TinyDenoiser, plus the training data's per-channel range."""
    g = torch.Generator().manual_seed(0)
    data = mixture(4096, g)
    models = {}
    for target in ("x0", "eps", "v"):
        torch.manual_seed(0)
        model = TinyDenoiser()
        loss_fn = DiffusionLoss(DIFFUSION, build_strategy(WeightingConfig(strategy="const")), target=target,
                                subspaces=1, label_dropout=0.0, null_class=None)
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        for _ in range(400):
            x0 = data[torch.randint(0, data.shape[0], (256,), generator=g)]
            loss = loss_fn(model, x0, None, generator=g).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        models[target] = model.eval()
    x0_range = (data.amin(dim=(0, 2, 3)), data.amax(dim=(0, 2, 3)))
    return models, x0_range, data


def draw(model, target, *, x0_range, sampler, steps, spacing) -> torch.Tensor:
    den = Denoiser(model, DIFFUSION, target, learn_sigma=False, x0_range=x0_range)
    return sample(den, (512, *SHAPE), labels=None, steps=steps, sampler=sampler, spacing=spacing,
                  generator=torch.Generator().manual_seed(1))


def at_data_scale(samples: torch.Tensor, data: torch.Tensor) -> bool:
    """Finite, with std within 2x of the data's and the two modes' balance roughly kept."""
    if not torch.isfinite(samples).all():
        return False
    ratio = samples.std().item() / data.std().item()
    upper = (samples.mean(dim=(1, 2, 3)) > 0).float().mean().item()
    return 0.5 < ratio < 2.0 and 0.25 < upper < 0.75


@pytest.mark.parametrize("target", ["x0", "eps", "v"])
def test_default_sampler_gives_data_scale_samples_for_every_target(trained, target):
    models, x0_range, data = trained
    ev = EvalConfig()
    samples = draw(models[target], target, x0_range=x0_range if ev.clip_x0 else None,
                   sampler=ev.sampler, steps=ev.sampling_steps, spacing=ev.spacing)
    assert at_data_scale(samples, data), (target, samples.std().item(), data.std().item())


@pytest.mark.parametrize("target", ["x0", "eps", "v"])
def test_few_step_solver_gives_data_scale_samples_for_every_target(trained, target):
    models, x0_range, data = trained
    samples = draw(models[target], target, x0_range=x0_range, sampler="dpmpp_2m", steps=15, spacing="leading")
    assert at_data_scale(samples, data), (target, samples.std().item())


def test_the_previous_sampler_fails_on_the_eps_model(trained):
    """DDIM from t = T-1 without a clamp: the eps model's x0 there is its error times ~2e4."""
    models, _, data = trained
    samples = draw(models["eps"], "eps", x0_range=None, sampler="ddim", steps=50, spacing="linspace")
    assert not at_data_scale(samples, data)
    assert samples.abs().max().item() > 100 * data.abs().max().item()
