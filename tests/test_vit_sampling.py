"""The ViT backbone and the samplers: DDIM / DDPM with an
oracle denoiser must return the data, the learned variance must set the DDPM noise, and
classifier-free guidance must combine predictions as uncond + s * (cond - uncond)."""
from __future__ import annotations

import math

import pytest
import torch

from msdm.config import PRESETS
from msdm.diffusion import GaussianDiffusion, prediction
from msdm.models.vit import VIT_PRESETS, ViT, build_vit, timestep_embedding
from msdm.sampling import Denoiser, sample, timestep_grid

T = 1000
DIFFUSION = GaussianDiffusion(T)




def tiny_vit(**overrides) -> ViT:
    kwargs = dict(in_channels=12, image_size=8, patch_size=2, dim=32, depth=2, heads=2, num_classes=10,
                  learn_sigma=False)
    kwargs.update(overrides)
    return ViT(**kwargs)


def randomise_head(model: ViT, seed: int = 0) -> ViT:
    """The head starts at zero (output 0); give it weights so outputs depend on the input."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=g) * 0.1)
        model.head.bias.copy_(torch.randn(model.head.bias.shape, generator=g) * 0.1)
    return model


# ------------------------------------------------------------------------------------ ViT
@pytest.mark.parametrize("channels,size,patch,learn_sigma", [
    (12, 8, 2, False), (12, 8, 2, True), (3, 16, 4, True), (1, 8, 1, False), (4, 8, 8, True), (5, 6, 3, False),
])
def test_vit_output_shape(channels, size, patch, learn_sigma):
    model = tiny_vit(in_channels=channels, image_size=size, patch_size=patch, learn_sigma=learn_sigma)
    x = torch.randn(3, channels, size, size)
    out = model(x, torch.tensor([0, 500, 999]), torch.tensor([1, 2, 10]))
    assert out.shape == (3, channels * (2 if learn_sigma else 1), size, size)
    assert model.out_channels == channels * (2 if learn_sigma else 1)


def test_vit_zero_initialised_head_gives_zero_output():
    model = tiny_vit(learn_sigma=True)
    out = model(torch.randn(2, 12, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 9]))
    assert torch.count_nonzero(out) == 0
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    # ...but the rest is initialised, so gradients reach the head
    out.pow(2).sum().backward()
    assert model.pos_embed.abs().sum() > 0
    out = model(torch.randn(2, 12, 8, 8), torch.tensor([3, 700]), torch.tensor([0, 9]))
    (out - 1).pow(2).sum().backward()
    assert model.head.weight.grad.abs().sum() > 0


def test_vit_null_class_for_guidance():
    model = randomise_head(tiny_vit())
    assert model.null_class == 10
    assert model.class_embed.num_embeddings == 11  # 10 classes + the null class
    x, t = torch.randn(2, 12, 8, 8), torch.tensor([100, 100])
    null = model(x, t, torch.full((2,), 10))
    torch.testing.assert_close(model(x, t, None), null)  # no labels = the null class
    cond = model(x, t, torch.tensor([3, 3]))
    assert (cond - null).abs().max() > 1e-4
    assert (model(x, t, torch.tensor([4, 4])) - cond).abs().max() > 1e-4
    # the time token matters too
    assert (model(x, torch.tensor([900, 900]), None) - null).abs().max() > 1e-4
    # an unconditional ViT has no class token and ignores labels
    plain = randomise_head(tiny_vit(num_classes=0))
    assert plain.class_embed is None and plain.extras == 1
    torch.testing.assert_close(plain(x, t, None), plain(x, t, torch.tensor([1, 2])))


def test_vit_unpatchify_keeps_patches_in_place():
    """With no blocks each output patch depends only on its own input patch, so a change in
    input patch (row 0, col 1) must show up exactly in output rows 0:p, cols p:2p."""
    p = 2
    model = randomise_head(tiny_vit(depth=0, in_channels=3, image_size=6, patch_size=p, learn_sigma=True))
    x = torch.randn(1, 3, 6, 6)
    t, y = torch.tensor([10]), torch.tensor([1])
    x2 = x.clone()
    x2[0, 1, 0, p + 1] += 1.0  # a pixel of patch (0, 1), channel 1
    diff = (model(x2, t, y) - model(x, t, y)).abs().sum(1)[0]  # [H, W]
    changed = diff > 1e-6
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[0:p, p:2 * p] = True
    assert torch.equal(changed, expected)


def test_vit_refuses_wrong_input_shape():
    model = tiny_vit()
    with pytest.raises(ValueError, match=r"expected \[B, 12, 8, 8\]"):
        model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="got shape"):
        model(torch.randn(2, 12, 16, 16), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="patch_size 3"):
        tiny_vit(patch_size=3)
    with pytest.raises(ValueError, match="divisible by heads"):
        tiny_vit(dim=30, heads=4)


def test_timestep_embedding_values():
    emb = timestep_embedding(torch.tensor([0, 5]), 7)
    assert emb.shape == (2, 7)
    torch.testing.assert_close(emb[0], torch.tensor([1.0, 1, 1, 0, 0, 0, 0]))  # cos 0, sin 0, pad
    freqs = torch.exp(-math.log(10000.0) * torch.arange(3) / 3)
    torch.testing.assert_close(emb[1, :3], torch.cos(5 * freqs))
    torch.testing.assert_close(emb[1, 3:6], torch.sin(5 * freqs))
    assert emb[1, 6] == 0


def expected_param_count(dim, depth, mlp_ratio, channels, patch, image, classes, learn_sigma):
    hidden = int(dim * mlp_ratio)
    block = (dim * 3 * dim + 3 * dim) + (dim * dim + dim) + 4 * dim + (dim * hidden + hidden) + (hidden * dim + dim)
    out = channels * (2 if learn_sigma else 1) * patch ** 2
    tokens = (image // patch) ** 2 + (2 if classes else 1)
    return (channels * patch ** 2 * dim + dim            # patch embedding
            + dim * 4 * dim + 4 * dim + 4 * dim * dim + dim  # time MLP
            + ((classes + 1) * dim if classes else 0)    # class table with the null class
            + tokens * dim                               # positions
            + depth * block + 2 * dim                    # blocks, final norm
            + dim * out + out)                           # head


def test_presets_construct_with_the_specified_sizes():
    assert set(VIT_PRESETS) == set(PRESETS)
    b = VIT_PRESETS["vit-b"]
    assert (b.dim, b.depth, b.heads, b.mlp_ratio) == (768, 12, 12, 4.0)
    xl = VIT_PRESETS["vit-xl"]
    assert (xl.dim, xl.depth) == (1152, 28)
    for name in PRESETS:
        p = VIT_PRESETS[name]
        with torch.device("meta"):  # no memory, no init cost: vit-xl is ~0.7B parameters
            model = build_vit(name, in_channels=4, image_size=32, patch_size=2, num_classes=1000, learn_sigma=True)
        assert len(model.blocks) == p.depth and model.norm.normalized_shape == (p.dim,)
        n = sum(t.numel() for t in model.parameters())
        assert n == expected_param_count(p.dim, p.depth, p.mlp_ratio, 4, 2, 32, 1000, True), name
    # the CPU presets really build and run
    model = build_vit("vit-tiny", in_channels=12, image_size=8, patch_size=2, num_classes=10, learn_sigma=True)
    assert model(torch.randn(2, 12, 8, 8), torch.tensor([0, 999]), None).shape == (2, 24, 8, 8)
    with pytest.raises(ValueError, match="vit-tiny"):
        build_vit("vit-huge", in_channels=4, image_size=32, patch_size=2, num_classes=0, learn_sigma=False)


# ---------------------------------------------------------------------------- samplers
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("timesteps,steps", [(1000, 50), (1000, 1000), (1000, 2), (1000, 1), (10, 7), (1000, 999),
                                             (1000, 15)])
def test_timestep_grid_properties(spacing, timesteps, steps):
    grid = timestep_grid(timesteps, steps, spacing)
    assert len(grid) == steps == len(set(grid))
    assert all(isinstance(t, int) and 0 <= t < timesteps for t in grid)
    assert all(a > b for a, b in zip(grid, grid[1:]))
    if steps == 1:
        assert grid == [timesteps - 1]  # one step goes from pure noise to x0
        return
    gaps = [a - b for a, b in zip(grid, grid[1:])]
    assert max(gaps) - min(gaps) <= 1  # evenly spaced up to rounding
    if spacing == "leading":  # guided-diffusion's ddimN / diffusers' leading: 0, T//S, ..
        assert grid[-1] == 0 and grid[0] == (steps - 1) * (timesteps // steps)
        if timesteps // steps > 1:
            assert grid[0] < timesteps - 1  # the model is never asked for x0 at T-1
    elif spacing == "linspace":
        assert grid[0] == timesteps - 1 and grid[-1] == 0
    else:
        assert grid[0] == timesteps - 1 and grid[-1] == round(timesteps / steps) - 1


def test_timestep_grid_known_values():
    assert timestep_grid(1000, 5, "leading") == [800, 600, 400, 200, 0]
    assert timestep_grid(1000, 5, "trailing") == [999, 799, 599, 399, 199]
    assert timestep_grid(1000, 5, "linspace") == [999, 749, 500, 250, 0]
    with pytest.raises(ValueError, match="eval.spacing"):
        timestep_grid(1000, 5, "uniform")


def test_timestep_grid_refuses_bad_step_counts():
    for steps in (0, 1001):
        with pytest.raises(ValueError, match="1..1000"):
            timestep_grid(1000, steps)


def oracle(x0: torch.Tensor, target: str, var_value: float | None = None, calls: list | None = None):
    """A model fn that knows the data: returns the exact `target` for x0 at the given x_t."""
    def fn(x, t, y):
        if calls is not None:
            calls.append((x.clone(), t.clone()))
        if target == "x0":
            pred = x0.clone()
        elif target == "eps":
            pred = DIFFUSION.eps_from_x0(x, t, x0)
        else:
            pred = DIFFUSION.v_from_x0(x, t, x0)
        if var_value is not None:
            pred = torch.cat([pred, torch.full_like(pred, var_value)], dim=1)
        return pred
    return fn


@pytest.fixture
def data():
    return torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
@pytest.mark.parametrize("target", ["x0", "eps", "v"])
@pytest.mark.parametrize("steps", [1, 10, 50])
def test_deterministic_samplers_with_oracle_return_the_data(data, sampler, target, steps):
    den = Denoiser(oracle(data, target), DIFFUSION, target, learn_sigma=False)
    out = sample(den, tuple(data.shape), labels=None, steps=steps, sampler=sampler, eta=0.0,
                 generator=torch.Generator().manual_seed(1))
    # One eps step goes straight from t=999, where x0 = (x - s eps) / sqrt(ab) divides float32
    # rounding by sqrt(ab) ~ 5e-5; with more steps the last step (at t=0) sets the precision.
    tol = 1e-2 if (target, steps) == ("eps", 1) else 1e-4
    torch.testing.assert_close(out, data, atol=tol, rtol=tol)


def test_ddim_eta0_is_deterministic_and_eta1_still_ends_at_the_data(data):
    den = Denoiser(oracle(data, "x0"), DIFFUSION, "x0", learn_sigma=False)
    noise = torch.randn(data.shape, generator=torch.Generator().manual_seed(2))
    a = sample(den, tuple(data.shape), labels=None, steps=20, eta=0.0, noise=noise,
               generator=torch.Generator().manual_seed(3))
    b = sample(den, tuple(data.shape), labels=None, steps=20, eta=0.0, noise=noise,
               generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    c = sample(den, tuple(data.shape), labels=None, steps=20, eta=1.0, noise=noise,
               generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(c, data, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("target", ["x0", "eps", "v"])
@pytest.mark.parametrize("var_value", [None, -1.0, 0.3])
def test_ddpm_with_oracle_ends_at_the_data(data, target, var_value):
    den = Denoiser(oracle(data, target, var_value), DIFFUSION, target, learn_sigma=var_value is not None)
    out = sample(den, tuple(data.shape), labels=None, steps=25, sampler="ddpm",
                 generator=torch.Generator().manual_seed(5))
    # the last step (t = 0 -> data) adds no noise
    torch.testing.assert_close(out, data, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("var_value", [None, -1.0, 1.0, 0.0])
def test_ddpm_step_noise_follows_the_learned_variance(var_value):
    """Two steps, 999 -> 0 -> data: the input of the second call is the posterior mean plus
    noise whose std is sqrt(beta~) (fixed small, or v = -1), sqrt(beta) (v = +1) or their
    geometric mean (v = 0), with beta the respaced beta = 1 - ab_999 / ab_0."""
    shape = (8, 4, 16, 16)
    zeros = torch.zeros(shape)
    calls = []
    den = Denoiser(oracle(zeros, "x0", var_value, calls), DIFFUSION, "x0", learn_sigma=var_value is not None)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(6))
    sample(den, shape, labels=None, steps=2, sampler="ddpm", spacing="linspace", noise=x_T,
           generator=torch.Generator().manual_seed(7))
    assert [c[1][0].item() for c in calls] == [999, 0]
    ab, ab_prev = DIFFUSION.alphas_cumprod[999].item(), DIFFUSION.alphas_cumprod[0].item()
    beta = 1 - ab / ab_prev
    beta_tilde = beta * (1 - ab_prev) / (1 - ab)
    mean = math.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab) * x_T  # x0 = 0
    added = calls[1][0] - mean
    frac = 0.0 if var_value is None else (var_value + 1) / 2
    expected_std = math.exp(0.5 * (frac * math.log(beta) + (1 - frac) * math.log(beta_tilde)))
    assert added.mean().item() == pytest.approx(0.0, abs=5 * expected_std / math.sqrt(added.numel()))
    assert added.std().item() == pytest.approx(expected_std, rel=0.02)


def toy_model(learn_sigma: bool = False):
    """A label-dependent linear model: 0.5 x + 0.1 y + 1e-3 t (+ a label-coded variance)."""
    def fn(x, t, y):
        yv = torch.zeros(x.shape[0]) if y is None else y.float()
        pred = 0.5 * x + 0.1 * yv.view(-1, 1, 1, 1) + 1e-3 * t.float().view(-1, 1, 1, 1)
        if learn_sigma:
            return torch.cat([pred, (yv / 20).view(-1, 1, 1, 1).expand_as(x)], dim=1)
        return pred
    return fn


def test_cfg_scale_one_is_the_conditional_prediction():
    calls = []
    model = toy_model()

    def counted(x, t, y):
        calls.append(x.shape[0])
        return model(x, t, y)

    x, t, y = torch.randn(3, 2, 4, 4), torch.tensor([10, 500, 900]), torch.tensor([1, 4, 7])
    x0, var = Denoiser(counted, DIFFUSION, "x0", learn_sigma=False, cfg_scale=1.0, null_class=10)(x, t, y)
    torch.testing.assert_close(x0, model(x, t, y))
    assert var is None and calls == [3]  # no unconditional pass is spent


@pytest.mark.parametrize("target", ["x0", "eps", "v"])
@pytest.mark.parametrize("scale", [0.0, 3.0])
def test_cfg_combines_uncond_and_cond(target, scale):
    model = toy_model(learn_sigma=True)
    x, t, y = torch.randn(3, 2, 4, 4), torch.tensor([10, 500, 900]), torch.tensor([1, 4, 7])
    null = torch.full_like(y, 10)
    den = Denoiser(model, DIFFUSION, target, learn_sigma=True, cfg_scale=scale, null_class=10)
    x0, var = den(x, t, y)
    cond, cond_var = model(x, t, y).chunk(2, dim=1)
    uncond = model(x, t, null).chunk(2, dim=1)[0]
    guided = uncond + scale * (cond - uncond)
    torch.testing.assert_close(x0, prediction(target).x0(DIFFUSION, x, t, guided))
    if target == "x0":
        # hand-computed: uncond differs from cond only by 0.1 * (y - 10)
        torch.testing.assert_close(x0, cond + (1 - scale) * 0.1 * (10 - y.float()).view(-1, 1, 1, 1))
    torch.testing.assert_close(var, cond_var)  # the variance comes from the conditional pass


def test_cfg_without_labels_is_unguided():
    model = toy_model()
    x, t = torch.randn(2, 2, 4, 4), torch.tensor([5, 50])
    x0, _ = Denoiser(model, DIFFUSION, "x0", learn_sigma=False, cfg_scale=4.0, null_class=10)(x, t, None)
    torch.testing.assert_close(x0, model(x, t, None))


def gaussian_oracle(target: str, mu: float, s: float):
    """The exact model for data N(mu, s^2) per element: E[x0 | x_t] in closed form, as `target`."""
    def fn(x, t, y):
        a = DIFFUSION.sqrt_alphas_cumprod[t].float().view(-1, 1, 1, 1)
        sig = DIFFUSION.sqrt_one_minus_alphas_cumprod[t].float().view(-1, 1, 1, 1)
        x0 = mu + a * s * s / (a * a * s * s + sig * sig) * (x - a * mu)
        return {"x0": x0, "eps": (x - a * x0) / sig, "v": (a * x - x0) / sig}[target]
    return fn


@pytest.mark.parametrize("target", ["x0", "eps", "v"])
def test_dpmpp_2m_solves_the_gaussian_flow_at_second_order(target):
    """Data N(mu, s^2): the probability-flow ODE maps x_t = a mu + sqrt(a^2 s^2 + sigma^2) z to the
    same z at every t, so the exact end point is known. Doubling the steps must cut DDIM's error
    by ~2 (first order) and DPM-Solver++(2M)'s by ~4 (second order)."""
    mu, s = 0.5, 0.3
    z = torch.randn(64, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    ab = DIFFUSION.alphas_cumprod
    errors = {}
    for steps in (100, 200):
        grid = timestep_grid(T, steps, "leading")
        a, sig = ab[grid[0]].sqrt().item(), (1 - ab[grid[0]]).sqrt().item()
        x_start = a * mu + math.sqrt(a * a * s * s + sig * sig) * z
        # the samplers end with the x0 prediction at the grid's last point (t = 0)
        a0, sig0 = ab[grid[-1]].sqrt().item(), (1 - ab[grid[-1]]).sqrt().item()
        exact = mu + a0 * s * s / math.sqrt(a0 * a0 * s * s + sig0 * sig0) * z
        for sampler in ("ddim", "dpmpp_2m"):
            den = Denoiser(gaussian_oracle(target, mu, s), DIFFUSION, target, learn_sigma=False)
            out = sample(den, tuple(z.shape), labels=None, steps=steps, sampler=sampler, noise=x_start)
            errors[sampler, steps] = (out - exact).abs().max().item()
    assert 1.6 < errors["ddim", 100] / errors["ddim", 200] < 2.5
    assert errors["dpmpp_2m", 100] / errors["dpmpp_2m", 200] > 3.2
    assert errors["dpmpp_2m", 200] < errors["ddim", 200] / 3


def test_dpmpp_2m_ignores_a_learned_variance(data):
    """The ODE has no noise: variance channels are dropped, the result is the unlearned one."""
    plain = sample(Denoiser(oracle(data, "eps"), DIFFUSION, "eps", learn_sigma=False), tuple(data.shape),
                   labels=None, steps=10, sampler="dpmpp_2m", noise=torch.ones(data.shape))
    learned = sample(Denoiser(oracle(data, "eps", 0.7), DIFFUSION, "eps", learn_sigma=True), tuple(data.shape),
                     labels=None, steps=10, sampler="dpmpp_2m", noise=torch.ones(data.shape))
    assert torch.equal(plain, learned)


def test_x0_clamp_is_per_channel_and_applies_to_every_target():
    x, t = torch.randn(4, 2, 3, 3) * 50, torch.full((4,), 999)
    lo, hi = torch.tensor([-1.0, -3.0]), torch.tensor([2.0, 0.5])
    for target in ("x0", "eps", "v"):
        free, _ = Denoiser(toy_model(), DIFFUSION, target, learn_sigma=False)(x, t, None)
        clamped, _ = Denoiser(toy_model(), DIFFUSION, target, learn_sigma=False, x0_range=(lo, hi))(x, t, None)
        for c in range(2):
            torch.testing.assert_close(clamped[:, c], free[:, c].clamp(lo[c].item(), hi[c].item()))
        assert (free.amax(dim=(0, 2, 3)) > hi).any()  # the clamp had something to do


def test_sample_refuses_unknown_sampler(data):
    den = Denoiser(oracle(data, "x0"), DIFFUSION, "x0", learn_sigma=False)
    with pytest.raises(ValueError, match="ddim"):
        sample(den, tuple(data.shape), labels=None, steps=5, sampler="euler")


def test_sample_with_a_real_vit_and_guidance_is_finite():
    model = randomise_head(tiny_vit(learn_sigma=True)).eval()
    den = Denoiser(model, DIFFUSION, "x0", learn_sigma=True, cfg_scale=2.0, null_class=model.null_class)
    for sampler in ("ddim", "ddpm", "dpmpp_2m"):
        out = sample(den, (2, 12, 8, 8), labels=torch.tensor([1, 2]), steps=5, sampler=sampler,
                     generator=torch.Generator().manual_seed(0))
        assert out.shape == (2, 12, 8, 8) and torch.isfinite(out).all()
