"""Loss-weight strategies against hand-computed weights, the cross-target
equivalence of predefined weights, Dy-Sigma's bounds and gradient routing, the learnable
weights, the diffusion loss, and a short real training run per strategy."""
from __future__ import annotations

import math

import pytest
import torch

from msdm.config import STRATEGIES, WeightingConfig
from msdm.diffusion import GaussianDiffusion
from msdm.diffusion import prediction as prediction_of
from msdm.diffusion_loss import DiffusionLoss
from msdm.models.vit import ViT
from msdm.weighting import (
    Learned,
    LossContext,
    WeightingStrategy,
    WeightLog,
    build_strategy,
    strategy_learns_variance,
)

T = 1000
DIFFUSION = GaussianDiffusion(T)
TARGETS = ("x0", "eps", "v")




def strategy(name: str, subspaces: int = 1, **cfg) -> WeightingStrategy:
    return build_strategy(WeightingConfig(strategy=name, **cfg), subspaces)


def ctx_for(snr: list[float], target: str, subspaces: int = 1, mse: torch.Tensor | None = None) -> LossContext:
    """A context with SNR given directly (so SNR = 0 can be tested); t is only used by u(t)."""
    n = len(snr)
    return LossContext(t=torch.arange(n) * (T // n), snr=torch.tensor(snr), target=target,
                       mse=torch.ones(n, subspaces) if mse is None else mse, diffusion=DIFFUSION)


# -------------------------------------------------------------------- weights, by hand
# SNR values: 0 (the edge), 0.5, 5 (= gamma), 20. Weights worked out by hand from the SPEC
# table: w_eps = w_x0 / SNR, w_v = w_x0 / (SNR + 1).
SNRS = [0.0, 0.5, 5.0, 20.0]
HAND_WEIGHTS = {
    # w = 1 on whatever target is trained
    "const": {t: [1, 1, 1, 1] for t in TARGETS},
    # x0: min(SNR, 5); eps: min(SNR,5)/SNR; v: min(SNR,5)/(SNR+1); 1 where SNR = 0
    "min_snr": {"x0": [1, 0.5, 5, 5], "eps": [1, 1, 1, 0.25], "v": [1, 1 / 3, 5 / 6, 5 / 21]},
    # x0: 1/(1/SNR + 0.25) = SNR/(1 + SNR/4); eps: 1/(1 + SNR/4); v: x0 weight / (SNR + 1)
    "soft_min_snr": {"x0": [0, 0.5 / 1.125, 5 / 2.25, 20 / 6],
                     "eps": [1, 1 / 1.125, 1 / 2.25, 1 / 6],
                     "v": [0, 0.5 / 1.125 / 1.5, 5 / 2.25 / 6, 20 / 6 / 21]},
    # eps: 1/(1 + SNR); x0: SNR/(1 + SNR); v: SNR/(1 + SNR)^2
    "p2": {"x0": [0, 1 / 3, 5 / 6, 20 / 21], "eps": [1, 2 / 3, 1 / 6, 1 / 21],
           "v": [0, 0.5 / 2.25, 5 / 36, 20 / 441]},
    # u = 0 at init: the prior alone
    "learned": {t: [1, 1, 1, 1] for t in TARGETS},
}
HAND_WEIGHTS["dysigma_min_snr"] = HAND_WEIGHTS["min_snr"]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", sorted(HAND_WEIGHTS))
def test_weight_matches_hand_computed_table(name, target):
    k = 2
    mse = torch.tensor([[0.3, 0.7]] * len(SNRS))
    loss, w = strategy(name, subspaces=k)(ctx_for(SNRS, target, k, mse))
    expected = torch.tensor(HAND_WEIGHTS[name][target], dtype=torch.float32)
    assert w.shape == (len(SNRS), k)
    torch.testing.assert_close(w, expected.unsqueeze(1).expand(-1, k), rtol=1e-6, atol=1e-7)
    # loss = sum over subspaces of w * MSE (u = 0 at init for the learned ones)
    torch.testing.assert_close(loss, expected * 1.0, rtol=1e-6, atol=1e-7)
    assert not w.requires_grad


@pytest.mark.parametrize("target", TARGETS)
def test_min_snr_weight_at_schedule_timesteps(target):
    """The weights at real timesteps, with SNR from the cosine closed form f(t+1)/f(0)."""
    ts = [0, 250, 500, 750, 990]

    def snr(t):
        f = lambda u: math.cos((u / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        ab = f(t + 1) / f(0)
        return ab / (1 - ab)

    t = torch.tensor(ts)
    ctx = LossContext(t=t, snr=DIFFUSION.snr(t), target=target, mse=torch.ones(len(ts), 1), diffusion=DIFFUSION)
    _, w = strategy("min_snr")(ctx)
    for got, tt in zip(w[:, 0].tolist(), ts):
        s = snr(tt)
        expected = {"x0": min(s, 5), "eps": min(s, 5) / s, "v": min(s, 5) / (s + 1)}[target]
        assert got == pytest.approx(expected, rel=1e-5)
    # the x0 weight saturates at gamma for small t and follows SNR for large t
    if target == "x0":
        assert w[0, 0].item() == 5.0 and w[-1, 0].item() < 1e-3


def test_min_snr_gamma_is_configurable():
    _, w = strategy("min_snr", gamma=2.0)(ctx_for([1.0, 3.0], "x0"))
    assert w[:, 0].tolist() == [1.0, 2.0]


# ------------------------------------------------------------- cross-target equivalence
def per_target_mse(x0, x0_hat, noise, t, target, k):
    """MSE on `target` when the model's implied x0 is x0_hat, at the same x_t."""
    d = DIFFUSION
    x_t = d.q_sample(x0, t, noise)
    truth = prediction_of(target).target(d, x0, noise, x_t, t)
    pred = {"x0": lambda: x0_hat, "eps": lambda: d.eps_from_x0(x_t, t, x0_hat),
            "v": lambda: d.v_from_x0(x_t, t, x0_hat)}[target]()
    return (truth - pred).pow(2).reshape(x0.shape[0], k, -1).mean(2)


@pytest.mark.parametrize("name", ["min_snr", "soft_min_snr", "p2", "dysigma_min_snr"])
def test_same_x0_error_gives_same_loss_on_every_target(name):
    k = 3
    g = torch.Generator().manual_seed(0)
    t = torch.tensor([1, 30, 120, 400, 700, 950])
    x0 = torch.randn(6, 3 * k, 4, 4, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    # a known x0 error, different per subspace
    x0_hat = x0 + 0.1 * torch.randn(x0.shape, generator=g) * torch.tensor([1.0, 2.0, 0.5]).repeat_interleave(3).view(
        1, -1, 1, 1)
    snr = DIFFUSION.snr(t)
    x0_mse = (x0 - x0_hat).pow(2).reshape(6, k, -1).mean(2)
    losses = {}
    for target in TARGETS:
        mse = per_target_mse(x0, x0_hat, noise, t, target, k)
        # the identities the weight conversion rests on
        factor = {"x0": 1, "eps": snr, "v": snr + 1}[target]
        torch.testing.assert_close(mse, x0_mse * (factor if target == "x0" else factor.unsqueeze(1)),
                                   rtol=2e-3, atol=1e-9)
        ctx = LossContext(t=t, snr=snr, target=target, mse=mse, diffusion=DIFFUSION)
        losses[target] = strategy(name, subspaces=k)(ctx)[0].detach()
    torch.testing.assert_close(losses["eps"], losses["x0"], rtol=2e-3, atol=0)
    torch.testing.assert_close(losses["v"], losses["x0"], rtol=2e-3, atol=0)
    # const is the one strategy whose loss does depend on the target
    const = {tg: strategy("const", k)(LossContext(t=t, snr=snr, target=tg, mse=per_target_mse(
        x0, x0_hat, noise, t, tg, k), diffusion=DIFFUSION))[0] for tg in TARGETS}
    assert not torch.allclose(const["eps"], const["x0"], rtol=0.1)


# --------------------------------------------------------------------------- Dy-Sigma
def dysigma_ctx(t, var_values, target="x0", k=1, prediction=None, x0=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = var_values.shape
    x0 = torch.randn(shape, generator=g) if x0 is None else x0
    x_t = DIFFUSION.q_sample(x0, t, torch.randn(shape, generator=g))
    if prediction is None:
        prediction = prediction_of(target).target(DIFFUSION, x0, torch.randn(shape, generator=g), x_t, t)
    truth = prediction_of(target).target(DIFFUSION, x0, DIFFUSION.eps_from_x0(x_t, t, x0), x_t, t)
    mse = (truth - prediction).pow(2).reshape(shape[0], k, -1).mean(2)
    return LossContext(t=t, snr=DIFFUSION.snr(t), target=target, mse=mse, diffusion=DIFFUSION, x0=x0, x_t=x_t,
                       prediction=prediction, var_values=var_values)


def test_dysigma_weight_is_interpolated_variance_within_beta_bounds():
    k = 3
    t = torch.tensor([0, 1, 5, 100, 500, 900, 999])
    g = torch.Generator().manual_seed(5)
    var_values = torch.rand(len(t), 3 * k, 4, 4, generator=g) * 2 - 1
    _, w = strategy("dysigma", k)(dysigma_ctx(t, var_values, k=k))
    beta = DIFFUSION.betas[t].float().unsqueeze(1)
    beta_tilde = DIFFUSION.posterior_log_variance_clipped[t].exp().float().unsqueeze(1)
    assert w.shape == (len(t), k)
    assert torch.all(w >= beta_tilde * (1 - 1e-5)) and torch.all(w <= beta * (1 + 1e-5))
    assert torch.all(w >= 0) and torch.all(w <= 10.0)
    # closed form with a constant v per subspace: Sigma = beta^v' * beta_tilde^(1 - v')
    v = torch.tensor([-1.0, 0.0, 0.6])
    const_v = v.repeat_interleave(3).view(1, -1, 1, 1).expand(len(t), -1, 4, 4).contiguous()
    _, w = strategy("dysigma", k)(dysigma_ctx(t, const_v, k=k))
    vp = (v + 1) / 2
    expected = beta ** vp * beta_tilde ** (1 - vp)
    torch.testing.assert_close(w, expected, rtol=1e-4, atol=0)
    # the published shape: ~0 at low t, ~1 at high t
    assert w[0].max() < 1e-3 and w[-1].min() > 0.1


def test_dysigma_per_subspace_weights_follow_each_subspace_variance():
    t = torch.tensor([10, 600])
    var_values = torch.cat([-torch.ones(2, 4, 3, 3), torch.ones(2, 4, 3, 3)], dim=1)  # K = 2, C = 4
    _, w = strategy("dysigma", 2)(dysigma_ctx(t, var_values, k=2))
    torch.testing.assert_close(w[:, 0], DIFFUSION.posterior_variance[t].float(), rtol=1e-5, atol=0)
    torch.testing.assert_close(w[:, 1], DIFFUSION.betas[t].float(), rtol=1e-5, atol=0)
    assert torch.all(w[:, 1] > w[:, 0])


def test_dysigma_weight_converted_to_target_and_clamped():
    t = torch.tensor([50, 500, 995])
    var_values = torch.zeros(3, 2, 4, 4)
    _, w_x0 = strategy("dysigma")(dysigma_ctx(t, var_values, "x0"))
    _, w_eps = strategy("dysigma")(dysigma_ctx(t, var_values, "eps"))
    _, w_v = strategy("dysigma")(dysigma_ctx(t, var_values, "v"))
    snr = DIFFUSION.snr(t).unsqueeze(1)
    torch.testing.assert_close(w_eps, (w_x0 / snr).clamp(max=10.0))
    torch.testing.assert_close(w_v, w_x0 / (snr + 1))
    assert w_eps[-1].item() == 10.0  # SNR ~ 4e-5 at t=995: w_x0 / SNR is huge, clamped
    # a smaller clamp_max bounds every weight
    _, w_small = strategy("dysigma", clamp_max=1e-3)(dysigma_ctx(t, var_values, "x0"))
    torch.testing.assert_close(w_small, w_x0.clamp(max=1e-3))
    assert w_small.max().item() == pytest.approx(1e-3)


def test_dysigma_at_snr_zero():
    """SNR = 0: the x0 weight is Sigma, the v weight Sigma/(0+1) = Sigma, the eps weight
    Sigma/0 = inf, clamped to clamp_max."""
    t = torch.tensor([999, 999])
    ctx = dysigma_ctx(t, torch.ones(2, 2, 2, 2))
    beta = DIFFUSION.betas[999].item()
    for target, expected in [("x0", beta), ("v", beta), ("eps", 10.0)]:
        ctx.snr = torch.zeros(2)
        ctx.target = prediction_of(target)
        _, w = strategy("dysigma")(ctx)
        torch.testing.assert_close(w, torch.full((2, 1), expected), rtol=1e-5, atol=0)


@pytest.mark.parametrize("target", TARGETS)
def test_dysigma_vlb_trains_only_the_variance(target):
    k = 2
    t = torch.tensor([0, 3, 200, 800])
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(4, 2 * k, 4, 4, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    x_t = DIFFUSION.q_sample(x0, t, noise)
    truth = prediction_of(target).target(DIFFUSION, x0, noise, x_t, t)
    prediction = (truth + 0.3 * torch.randn(x0.shape, generator=g)).requires_grad_()
    var_values = (torch.rand(x0.shape, generator=g) * 2 - 1).requires_grad_()
    mse = (truth - prediction).pow(2).reshape(4, k, -1).mean(2)
    ctx = LossContext(t=t, snr=DIFFUSION.snr(t), target=target, mse=mse, diffusion=DIFFUSION, x0=x0, x_t=x_t,
                      prediction=prediction, var_values=var_values)
    loss, w = strategy("dysigma", k)(ctx)
    assert not w.requires_grad
    grad_pred, grad_var = torch.autograd.grad(loss.sum(), [prediction, var_values], retain_graph=True)
    # prediction: exactly the gradient of w * MSE alone (the VLB sees a frozen mean)
    (ref_pred,) = torch.autograd.grad((w * mse).sum(), [prediction])
    torch.testing.assert_close(grad_pred, ref_pred)
    # variance: exactly the gradient of the VLB on the frozen mean (w is detached)
    x0_hat = prediction_of(target).x0(DIFFUSION, x_t, t, prediction.detach())
    frozen_mean, _, _ = DIFFUSION.q_posterior(x0_hat, x_t, t)
    vlb = DIFFUSION.vlb_terms(x0, x_t, t, frozen_mean, DIFFUSION.learned_range_log_variance(var_values, t))
    (ref_var,) = torch.autograd.grad(vlb.sum(), [var_values])
    torch.testing.assert_close(grad_var, ref_var)
    assert grad_var.abs().sum() > 0
    torch.testing.assert_close(loss, (w * mse).sum(1) + vlb)


def test_dysigma_vlb_value_with_known_mean_error():
    """x0 error delta with v = -1 (true posterior variance): KL = (coef1 delta)^2 / (2 var) nats."""
    t = torch.tensor([1, 100, 700])
    delta = 0.05
    x0 = torch.zeros(3, 2, 4, 4)
    ctx = dysigma_ctx(t, -torch.ones(3, 2, 4, 4), "x0", x0=x0, prediction=x0 + delta)
    loss, w = strategy("dysigma")(ctx)
    coef1 = DIFFUSION.posterior_mean_coef1[t].float()
    var = DIFFUSION.posterior_variance[t].float()
    kl_bits = (coef1 * delta) ** 2 / (2 * var) / math.log(2)
    torch.testing.assert_close(loss - (w * ctx.mse).sum(1), kl_bits, rtol=1e-3, atol=1e-7)
    torch.testing.assert_close(ctx.mse, torch.full((3, 1), delta ** 2))


def test_dysigma_needs_the_variance_channels():
    with pytest.raises(ValueError, match="learn_sigma"):
        strategy("dysigma")(ctx_for([1.0, 2.0], "x0"))


# ------------------------------------------------------------------ learnable weights
@pytest.mark.parametrize("name", ["learned", "dysigma_min_snr"])
def test_learnable_weights_get_gradients_and_are_per_subspace(name):
    k = 3
    s = strategy(name, k)
    assert isinstance(s, Learned)
    t = torch.tensor([0, 300, 600, 999])
    u = s.log_variance(t, T)
    assert u.shape == (4, k) and torch.all(u == 0)
    mse = torch.rand(4, k, generator=torch.Generator().manual_seed(0)) + 0.5
    ctx = LossContext(t=t, snr=DIFFUSION.snr(t), target="x0", mse=mse, diffusion=DIFFUSION)
    loss, _ = s(ctx)
    loss.sum().backward()
    assert s.linear.weight.grad is not None and s.linear.weight.grad.abs().sum() > 0
    assert s.linear.bias.grad.shape == (k,) and torch.all(s.linear.bias.grad != 0)
    # the Fourier features are fixed buffers, not trained
    assert [n for n, p in s.named_parameters()] == ["linear.weight", "linear.bias"]
    # d/du [w exp(-u) L + u] at u = 0 is 1 - w L, summed over the batch, per subspace
    prior = s.prior(ctx)
    torch.testing.assert_close(s.linear.bias.grad, (1 - prior.unsqueeze(1) * mse).sum(0))


def test_learned_u_converges_to_log_of_each_subspace_loss():
    """exp(-u) L + u is minimised at u = log L: u must find it separately per subspace."""
    torch.manual_seed(0)
    k = 3
    s = strategy("learned", k, fourier_features=16)
    target_l = torch.tensor([0.5, 2.0, 4.0])
    opt = torch.optim.Adam(s.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    for _ in range(600):
        t = torch.randint(0, T, (32,), generator=g)
        loss, _ = s(LossContext(t=t, snr=DIFFUSION.snr(t), target="x0", mse=target_l.expand(32, k),
                                diffusion=DIFFUSION))
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
    with torch.no_grad():
        u = s.log_variance(torch.tensor([0, 250, 500, 999]), T)
    torch.testing.assert_close(u, target_l.log().expand(4, k), atol=0.1, rtol=0)


# ------------------------------------------------------------------ registry and logging
def test_unknown_strategy_lists_valid_choices():
    with pytest.raises(ValueError) as err:
        strategy("min_snr_7")
    msg = str(err.value)
    assert "weighting.strategy" in msg and "min_snr_7" in msg
    for name in STRATEGIES:
        assert name in msg
    with pytest.raises(ValueError, match="const"):
        strategy_learns_variance("nope")


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_configured_strategy_builds(name):
    s = strategy(name, subspaces=3)
    assert isinstance(s, WeightingStrategy) and s.name == name and s.subspaces == 3
    assert strategy_learns_variance(name) == (name == "dysigma") == s.learns_variance


def test_build_strategy_refuses_zero_subspaces():
    with pytest.raises(ValueError, match="subspaces"):
        strategy("const", subspaces=0)


def test_weight_log_bucket_means():
    log = WeightLog(timesteps=1000, buckets=5)
    # buckets of 200 steps: t=0,100 -> 0; 300 -> 1; 500 -> 2; 999 -> 4; bucket 3 unseen
    t = torch.tensor([0, 100, 300, 999, 500])
    w = torch.tensor([[1.0, 3.0], [4.0, 4.0], [0.5, 0.5], [9.0, 7.0], [2.0, 0.0]])  # per-sample mean over K
    log.add(t, w)
    means = log.means()
    assert means[:3] == pytest.approx([3.0, 0.5, 1.0]) and means[4] == pytest.approx(8.0)
    assert math.isnan(means[3])
    log.add(torch.tensor([699, 200]), torch.tensor([[6.0, 6.0], [1.5, 1.5]]))
    assert log.means() == pytest.approx([3.0, 1.0, 1.0, 6.0, 8.0])
    log.reset()
    assert all(math.isnan(m) for m in log.means())


# ------------------------------------------------------------------------ diffusion loss
class Recorder(torch.nn.Module):
    """Returns a fixed multiple of its input and remembers what it was called with."""

    def __init__(self, out_factor: int = 1):
        super().__init__()
        self.out_factor = out_factor
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append((x, t, y))
        return torch.zeros(x.shape[0], x.shape[1] * self.out_factor, *x.shape[2:])


def test_diffusion_loss_mse_per_subspace_and_label_dropout():
    k = 3
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 2 * k, 4, 4, generator=g)
    labels = torch.arange(8)
    model = Recorder()
    fn = DiffusionLoss(DIFFUSION, strategy("const", k), target="x0", subspaces=k, label_dropout=1.0, null_class=10)
    out = fn(model, x0, labels, generator=torch.Generator().manual_seed(1))
    # a zero output: the x0 MSE of subspace j is the mean square of its 2 channels
    torch.testing.assert_close(out.mse, x0.pow(2).reshape(8, k, -1).mean(2))
    torch.testing.assert_close(out.per_sample, out.mse.sum(1))
    assert out.loss.item() == pytest.approx(out.per_sample.mean().item())
    assert torch.all(out.weights == 1)
    # t and noise come from the generator: the same draws reproduce x_t
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, T, (8,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    x_t, t_seen, y_seen = model.calls[0]
    assert torch.equal(t_seen, t) and torch.equal(out.t, t)
    torch.testing.assert_close(x_t, DIFFUSION.q_sample(x0, t, noise))
    assert torch.all(y_seen == 10)  # p = 1: every label dropped to the null class
    DiffusionLoss(DIFFUSION, strategy("const", k), target="x0", subspaces=k, label_dropout=0.0,
                  null_class=10)(model, x0, labels)
    assert torch.equal(model.calls[-1][2], labels)


def test_diffusion_loss_eps_target_and_variance_split():
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(4, 4, 2, 2, generator=g)
    fn = DiffusionLoss(DIFFUSION, strategy("dysigma", 2), target="eps", subspaces=2, label_dropout=0.0,
                       null_class=None)
    out = fn(Recorder(out_factor=2), x0, None, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    torch.randint(0, T, (4,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    # only the first C channels are the prediction; the zero variance channels give v = 0
    torch.testing.assert_close(out.mse, noise.pow(2).reshape(4, 2, -1).mean(2))
    with pytest.raises(ValueError, match="not divisible"):
        fn(Recorder(2), torch.randn(2, 5, 2, 2), None)


# ----------------------------------------------------------------------- real training
TRAIN_STEPS = 250
WINDOW = 20


def train_fixed_batch(name: str, target: str, steps: int = TRAIN_STEPS):
    """Train a small ViT on one fixed batch; return per-step (objective, weighted MSE, MSE, t, mse)."""
    torch.manual_seed(0)
    k, classes = 3, 16
    x0 = torch.randn(16, 12, 8, 8)
    labels = torch.arange(16)  # one class per latent: the model can memorise the batch
    model = ViT(in_channels=12, image_size=8, patch_size=2, dim=32, depth=2, heads=2, num_classes=classes,
                learn_sigma=strategy_learns_variance(name))
    weighting = strategy(name, k)
    fn = DiffusionLoss(DIFFUSION, weighting, target=target, subspaces=k, label_dropout=0.15, null_class=classes)
    opt = torch.optim.Adam([*model.parameters(), *weighting.parameters()], lr=3e-3)
    history = []
    g = torch.Generator()
    for step in range(steps):
        # The last window replays the first window's t, noise and label drops, so the
        # comparison is paired: only the model (and u) changed in between.
        g.manual_seed(step if step < steps - WINDOW else step - (steps - WINDOW))
        out = fn(model, x0, labels, generator=g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        history.append((out.loss.item(), (out.weights * out.mse).sum(1).mean().item(), out.mse.mean().item(),
                        out.t, out.mse.mean(1)))
    return history


def window_means(history, column):
    first = sum(h[column] for h in history[:WINDOW]) / WINDOW
    last = sum(h[column] for h in history[-WINDOW:]) / WINDOW
    return first, last


@pytest.mark.parametrize("name", STRATEGIES)
def test_training_lowers_the_loss(name):
    history = train_fixed_batch(name, "x0")
    assert all(math.isfinite(h[0]) and math.isfinite(h[2]) for h in history)
    obj0, obj1 = window_means(history, 0)
    assert obj1 < obj0, (name, obj0, obj1)  # for learned u this objective may go below 0
    mse0, mse1 = window_means(history, 2)
    if name == "dysigma":
        # w = Sigma ~ beta_t is ~1e-3 for most t, so on the x0 target the short run spends
        # itself on the VLB (huge at low t, where beta~_t ~ 1e-5); the x0 MSE barely moves
        # (measured 1.00 -> 1.02 over 400 steps). Its MSE part is checked on eps below.
        return
    assert mse1 < 0.85 * mse0, (name, mse0, mse1)
    if name not in ("learned", "dysigma_min_snr"):  # exp(-u) grows as u -> log L: not comparable
        wm0, wm1 = window_means(history, 1)
        assert wm1 < wm0, (name, wm0, wm1)


def test_dysigma_trains_the_mean_where_its_weight_is_large():
    """On eps, Dy-Sigma's weight Sigma/SNR is large (up to clamp_max) at high t: there the
    prediction channels must learn; the weighted MSE and the VLB both go down."""
    history = train_fixed_batch("dysigma", "eps")
    wm0, wm1 = window_means(history, 1)
    assert wm1 < 0.8 * wm0, (wm0, wm1)
    vlb0 = sum(h[0] - h[1] for h in history[:WINDOW])
    vlb1 = sum(h[0] - h[1] for h in history[-WINDOW:])
    assert vlb1 < vlb0

    def high_t_mse(rows):
        t = torch.cat([h[3] for h in rows])
        mse = torch.cat([h[4] for h in rows])
        return mse[t >= 800].mean().item()

    assert high_t_mse(history[-WINDOW:]) < 0.8 * high_t_mse(history[:WINDOW])
