"""Schedules, forward process, targets, posterior and VLB pieces against their closed forms
. Every expected value below is computed independently of msdm.diffusion."""
from __future__ import annotations

import math

import pytest
import torch

from msdm.diffusion import (
    GaussianDiffusion,
    cosine_betas,
    discretized_gaussian_log_likelihood,
    linear_betas,
    normal_kl,
    prediction,
)

S = 0.008  # Nichol & Dhariwal's offset


def cosine_f(t: float, T: int) -> float:
    return math.cos(((t / T) + S) / (1 + S) * math.pi / 2) ** 2


def closed_form_alpha_bar(t: int, T: int) -> float:
    """Cosine alpha_bar_t = f(t+1)/f(0) before any beta clipping."""
    return cosine_f(t + 1, T) / cosine_f(0, T)


def closed_form_snr(t: int, T: int) -> float:
    ab = closed_form_alpha_bar(t, T)
    return ab / (1 - ab)


# ----------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("T", [1000, 50, 7])
def test_cosine_alpha_bar_matches_closed_form_until_clipping(T):
    d = GaussianDiffusion(T, "cosine")
    unclipped_betas = [1 - cosine_f(i + 1, T) / cosine_f(i, T) for i in range(T)]
    # Clipping at step i changes alpha_bar for every t >= i, so compare up to the first clip.
    first_clip = next((i for i, b in enumerate(unclipped_betas) if b >= 0.999), T)
    assert first_clip > 0
    for t in range(first_clip):
        assert d.alphas_cumprod[t].item() == pytest.approx(closed_form_alpha_bar(t, T), rel=1e-9)
        assert d.betas[t].item() == pytest.approx(unclipped_betas[t], rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("T", [1000, 50])
def test_cosine_betas_clip_at_0999(T):
    betas = cosine_betas(T)
    assert betas.dtype == torch.float64
    unclipped = torch.tensor([1 - cosine_f(i + 1, T) / cosine_f(i, T) for i in range(T)], dtype=torch.float64)
    clipped_idx = (unclipped > 0.999).nonzero().flatten()
    # The final step's f(T) = cos(pi/2)^2 ~ 0 makes its beta ~1: it must be clipped.
    assert (T - 1) in clipped_idx.tolist()
    assert torch.all(betas[clipped_idx] == 0.999)
    assert betas.max().item() == 0.999
    keep = unclipped <= 0.999
    torch.testing.assert_close(betas[keep], unclipped[keep])
    # alpha_bar stays strictly positive and decreasing, so SNR is finite everywhere
    ab = GaussianDiffusion(T).alphas_cumprod
    assert torch.all(ab > 0) and torch.all(ab[1:] < ab[:-1])
    # at T = 1000 the last alpha_bar is the second-to-last times (1 - 0.999)
    if T == 1000:
        assert ab[-1].item() == pytest.approx(ab[-2].item() * 1e-3, rel=1e-12)


@pytest.mark.parametrize("T,lo,hi", [(1000, 1e-4, 0.02), (500, 2e-4, 0.04), (2000, 5e-5, 0.01)])
def test_linear_betas_scaled_by_1000_over_T(T, lo, hi):
    betas = linear_betas(T)
    assert betas.shape == (T,)
    assert betas[0].item() == pytest.approx(lo, rel=1e-12)
    assert betas[-1].item() == pytest.approx(hi, rel=1e-12)
    steps = betas[1:] - betas[:-1]
    torch.testing.assert_close(steps, torch.full_like(steps, (hi - lo) / (T - 1)))
    d = GaussianDiffusion(T, "linear")
    expected_ab = torch.cumprod(1 - torch.linspace(lo, hi, T, dtype=torch.float64), 0)
    torch.testing.assert_close(d.alphas_cumprod, expected_ab)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="cosine.*linear"):
        GaussianDiffusion(10, "sigmoid")


def test_snr_is_alpha_bar_over_one_minus_alpha_bar():
    T = 1000
    d = GaussianDiffusion(T)
    ts = [0, 1, 100, 500, 900, 998]
    snr = d.snr(torch.tensor(ts))
    assert snr.dtype == torch.float32 and snr.shape == (len(ts),)
    for value, t in zip(snr.tolist(), ts):
        assert value == pytest.approx(closed_form_snr(t, T), rel=1e-6)
    # SNR at t = 0 is ~ 1/beta_0 (huge), at the last step ~ 2.4e-9: both finite and positive
    last = d.snr(torch.tensor([T - 1])).item()
    assert 0 < last < 1e-8


# ------------------------------------------------------------------------- forward process
def test_q_sample_matches_closed_form():
    T = 1000
    d = GaussianDiffusion(T)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 5, 5, generator=g)
    noise = torch.randn(4, 3, 5, 5, generator=g)
    ts = [0, 10, 500, 990]
    x_t = d.q_sample(x0, torch.tensor(ts), noise)
    for i, t in enumerate(ts):
        ab = closed_form_alpha_bar(t, T)
        expected = math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * noise[i]
        torch.testing.assert_close(x_t[i], expected, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------------------------- targets
@pytest.fixture
def sample_batch():
    d = GaussianDiffusion(1000)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 2, 4, 4, generator=g)
    noise = torch.randn(5, 2, 4, 4, generator=g)
    t = torch.tensor([0, 3, 250, 700, 999])
    return d, x0, noise, t, d.q_sample(x0, t, noise)


def test_v_target_has_documented_sign(sample_batch):
    d, x0, noise, t, x_t = sample_batch
    ab = d.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    v = prediction("v").target(d, x0, noise, x_t, t)
    torch.testing.assert_close(v, ab.sqrt() * noise - (1 - ab).sqrt() * x0, rtol=1e-4, atol=1e-4)
    # and the Min-SNR form it was written in (float32 cancellation over sqrt(1-ab) ~ 6e-3 at t=0)
    torch.testing.assert_close(v, (ab.sqrt() * x_t - x0) / (1 - ab).sqrt(), rtol=1e-3, atol=1e-3)
    assert prediction("x0").target(d, x0, noise, x_t, t) is x0
    assert prediction("eps").target(d, x0, noise, x_t, t) is noise


def test_target_round_trips(sample_batch):
    d, x0, noise, t, x_t = sample_batch
    torch.testing.assert_close(prediction("x0").x0(d, x_t, t, x0), x0)
    # eps -> x0 divides by sqrt(alpha_bar) ~ 5e-5 at t=999, so float32 loses digits there
    torch.testing.assert_close(prediction("eps").x0(d, x_t[:4], t[:4], noise[:4]), x0[:4], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(prediction("eps").x0(d, x_t, t, noise), x0, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(prediction("v").x0(d, x_t, t, d.v_from_x0(x_t, t, x0)), x0, rtol=1e-5, atol=1e-5)
    # x0 -> eps divides by sqrt(1 - alpha_bar) ~ 6e-3 at t=0
    torch.testing.assert_close(d.eps_from_x0(x_t, t, x0), noise, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(d.eps_from_x0(x_t[1:], t[1:], x0[1:]), noise[1:], rtol=1e-5, atol=1e-5)
    # eps -> x0 -> v equals the v target
    v_via_eps = d.v_from_x0(x_t[:4], t[:4], prediction("eps").x0(d, x_t[:4], t[:4], noise[:4]))
    torch.testing.assert_close(v_via_eps, prediction("v").target(d, x0, noise, x_t, t)[:4], rtol=1e-4, atol=1e-4)


def test_unknown_target_is_refused():
    with pytest.raises(ValueError, match="diffusion.target: got 'score', expected one of x0, eps, v"):
        prediction("score")


# ------------------------------------------------------------------------------ posterior
def test_posterior_matches_gaussian_conditioning():
    """q(x_{t-1} | x_t, x0) derived from q(x_{t-1}|x0) = N(sqrt(ab') x0, 1-ab') and
    q(x_t|x_{t-1}) = N(sqrt(1-beta) x_{t-1}, beta) by completing the square."""
    T = 1000
    d = GaussianDiffusion(T)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(4, 1, 3, 3, generator=g)
    x_t = torch.randn(4, 1, 3, 3, generator=g)
    ts = [1, 20, 500, 998]
    mean, var, logvar = d.q_posterior(x0, x_t, torch.tensor(ts))
    for i, t in enumerate(ts):
        ab, ab_prev = closed_form_alpha_bar(t, T), closed_form_alpha_bar(t - 1, T)
        beta = 1 - ab / ab_prev
        precision = 1 / (1 - ab_prev) + (1 - beta) / beta
        post_var = 1 / precision
        post_mean = post_var * (math.sqrt(ab_prev) / (1 - ab_prev) * x0[i] + math.sqrt(1 - beta) / beta * x_t[i])
        torch.testing.assert_close(mean[i], post_mean, rtol=1e-4, atol=1e-5)
        assert torch.allclose(var[i], torch.tensor(post_var, dtype=torch.float32), rtol=1e-5)
        assert torch.allclose(logvar[i], torch.tensor(math.log(post_var), dtype=torch.float32), rtol=1e-5)
        # iDDPM's textbook form: beta * (1 - ab_prev) / (1 - ab)
        assert post_var == pytest.approx(beta * (1 - ab_prev) / (1 - ab), rel=1e-9)


def test_posterior_at_t0_is_x0_with_clipped_log_variance():
    d = GaussianDiffusion(1000)
    x0, x_t = torch.randn(2, 1, 2, 2), torch.randn(2, 1, 2, 2)
    mean, var, logvar = d.q_posterior(x0, x_t, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(mean, x0)  # alpha_bar_{-1} = 1: nothing left to denoise
    assert torch.all(var == 0)
    # the log of the zero variance is replaced by the log of the t=1 posterior variance
    assert torch.allclose(logvar, torch.log(d.posterior_variance[1]).float().expand_as(logvar))


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_learned_range_log_variance_endpoints(schedule):
    d = GaussianDiffusion(1000, schedule)
    t = torch.tensor([0, 1, 400, 999])
    ones = torch.ones(4, 2, 3, 3)
    lo = d.learned_range_log_variance(-ones, t)
    hi = d.learned_range_log_variance(ones, t)
    mid = d.learned_range_log_variance(0 * ones, t)
    beta = d.betas[t]
    beta_tilde = d.posterior_variance[t].clone()
    beta_tilde[0] = d.posterior_variance[1]  # clipped at t = 0
    torch.testing.assert_close(lo, beta_tilde.log().float().view(-1, 1, 1, 1).expand_as(lo))
    torch.testing.assert_close(hi, beta.log().float().view(-1, 1, 1, 1).expand_as(hi))
    # v' = 1/2 is the geometric mean of the two variances
    torch.testing.assert_close(mid.exp(), (beta * beta_tilde).sqrt().float().view(-1, 1, 1, 1).expand_as(mid))
    assert torch.all(lo <= hi)


# -------------------------------------------------------------------------------- VLB parts
def test_normal_kl_is_zero_for_identical_gaussians():
    g = torch.Generator().manual_seed(3)
    mean, logvar = torch.randn(10, generator=g), torch.randn(10, generator=g)
    torch.testing.assert_close(normal_kl(mean, logvar, mean, logvar), torch.zeros(10))


def test_normal_kl_hand_value():
    # KL(N(0,1) || N(1,4)) = 0.5 * (log 4 - 1 + 1/4 + 1/4) = 0.5 * (log 4 - 0.5)
    kl = normal_kl(torch.tensor(0.0), torch.tensor(0.0), torch.tensor(1.0), torch.tensor(math.log(4.0)))
    assert kl.item() == pytest.approx(0.5 * (math.log(4.0) - 0.5), rel=1e-6)
    assert kl.item() == pytest.approx(0.4431472, rel=1e-6)
    p = torch.distributions.Normal(torch.tensor([0.3, -1.0]), torch.tensor([0.5, 2.0]))
    q = torch.distributions.Normal(torch.tensor([-0.2, 1.0]), torch.tensor([1.5, 0.7]))
    ours = normal_kl(p.loc, 2 * p.scale.log(), q.loc, 2 * q.scale.log())
    torch.testing.assert_close(ours, torch.distributions.kl_divergence(p, q))


def test_vlb_terms_zero_when_model_equals_posterior():
    d = GaussianDiffusion(1000)
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(4, 2, 3, 3, generator=g)
    t = torch.tensor([1, 50, 500, 999])
    x_t = d.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    true_mean, _, true_logvar = d.q_posterior(x0, x_t, t)
    vlb = d.vlb_terms(x0, x_t, t, true_mean, true_logvar)
    assert vlb.shape == (4,)
    torch.testing.assert_close(vlb, torch.zeros(4), atol=1e-6, rtol=0)
    # a mean off by delta with the true variance costs delta^2 / (2 var) nats per element
    delta = 0.01
    shifted = d.vlb_terms(x0, x_t, t, true_mean + delta, true_logvar)
    expected = delta ** 2 / (2 * d.posterior_variance[t].float()) / math.log(2.0)
    torch.testing.assert_close(shifted, expected, rtol=1e-3, atol=0)


def test_vlb_terms_at_t0_is_decoder_nll_in_bits():
    d = GaussianDiffusion(1000)
    x0 = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0]).view(1, 1, 1, 5)
    t = torch.zeros(1, dtype=torch.long)
    logvar = torch.full_like(x0, math.log(0.01))
    vlb = d.vlb_terms(x0, x0, t, x0, logvar)
    nll = -discretized_gaussian_log_likelihood(x0, x0, 0.5 * logvar).mean() / math.log(2.0)
    assert vlb.item() == pytest.approx(nll.item(), rel=1e-6)
    # interior bins with the mean at their centre: P = Phi(1/(255*0.1)) - Phi(-1/(255*0.1))
    width = 1 / 255 / 0.1
    p_interior = torch.special.ndtr(torch.tensor(width)) - torch.special.ndtr(torch.tensor(-width))
    # edge bins: P = Phi(1/(255 sigma)) (everything beyond the edge is in the bin)
    p_edge = torch.special.ndtr(torch.tensor(width))
    expected = -(3 * p_interior.log() + 2 * p_edge.log()) / 5 / math.log(2.0)
    assert vlb.item() == pytest.approx(expected.item(), rel=1e-3)
    assert vlb.item() > 0


@pytest.mark.parametrize("mean,scale", [(0.1, 0.3), (-0.7, 0.05), (0.95, 1.0), (0.0, 2.0 / 255)])
def test_discretized_gaussian_sums_to_one_over_256_bins(mean, scale):
    bins = torch.linspace(-1.0, 1.0, 256, dtype=torch.float64)
    ll = discretized_gaussian_log_likelihood(
        bins, torch.full_like(bins, mean), torch.full_like(bins, math.log(scale)))
    probs = ll.exp()
    assert probs.sum().item() == pytest.approx(1.0, abs=1e-4)
    assert torch.all(probs <= 1.0)
    if scale < 0.1:  # a narrow Gaussian puts most mass in the bin nearest its mean
        assert bins[probs.argmax()].item() == pytest.approx(mean, abs=1 / 255 + 1e-9)
    else:  # a wide one still peaks there among the interior bins (the edges collect the tails)
        assert bins[1:-1][probs[1:-1].argmax()].item() == pytest.approx(min(mean, bins[-2].item()),
                                                                        abs=1 / 255 + 1e-9)
    # and the tanh approximation of the normal CDF is close to the exact one
    exact = torch.special.ndtr((bins[1:-1] + 1 / 255 - mean) / scale) - torch.special.ndtr(
        (bins[1:-1] - 1 / 255 - mean) / scale)
    assert (probs[1:-1] - exact).abs().max().item() < 1e-3
