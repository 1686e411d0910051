"""Stage-1 multi-space autoencoder: fusion, shapes, checkpoints, hybrid loss, training."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pytorch_msssim import ssim as reference_ssim

from msdm.autoencoder_training import reconstruction_metrics, train_autoencoder
from msdm.codec import MultiSpaceCodec, load_codec
from msdm.config import AutoencoderConfig
from msdm.io import CorruptFileError, atomic_torch_save
from msdm.losses import ReconstructionLoss, hybrid_recon_loss, hybrid_recon_terms, l2_recon_loss, ssim
from msdm.multispace import (MultiSpaceAutoencoder, SubspaceCrossAttention, SubspaceFusion, build_autoencoder,
                             load_autoencoder, save_autoencoder, sincos_positions_2d)

TINY = dict(widths=[8, 16], attn_heads=2)


def tiny_model(k: int, c: int = 2, f: int = 4, in_channels: int = 1, seed: int = 0, **kw) -> MultiSpaceAutoencoder:
    torch.manual_seed(seed)
    return MultiSpaceAutoencoder(in_channels, k, c, f, **{**TINY, **kw}).eval()


def images(n: int = 2, c: int = 1, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ----------------------------------------------------------------------------- fusion


@pytest.mark.parametrize("k", [1, 2, 3])
def test_fusion_shapes_and_attention_presence(k):
    model = tiny_model(k)
    z = model.encode(images())
    assert z.shape == (2, 2 * k, 4, 4)
    assert [s.shape for s in model.split(z)] == [(2, 2, 4, 4)] * k
    assert model.decode(z).shape == (2, 1, 16, 16)
    attention = [m for m in model.modules() if isinstance(m, (SubspaceCrossAttention, SubspaceFusion,
                                                               torch.nn.MultiheadAttention))]
    if k == 1:
        assert model.fusion is None and attention == []  # plain autoencoder
    else:
        assert isinstance(model.fusion, SubspaceFusion)
        assert model.fusion.subspace_embed.shape == (k - 1, 16)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("changed", [1, "last"])
def test_decoder_output_depends_on_key_value_subspaces(k, changed):
    model = tiny_model(k)
    z = model.encode(images())
    index = k - 1 if changed == "last" else changed
    z2 = z.clone()
    z2[:, index * 2:(index + 1) * 2] += torch.randn_like(z2[:, index * 2:(index + 1) * 2])
    with torch.no_grad():
        diff = (model.decode(z) - model.decode(z2)).abs().max().item()
    assert diff > 1e-4, "changing a key/value subspace did not change the decoded image"


def test_decoder_output_depends_on_query_subspace_for_k1():
    model = tiny_model(1)
    z = model.encode(images())
    with torch.no_grad():
        assert (model.decode(z) - model.decode(z + 1)).abs().max().item() > 1e-4


def test_subspace_embedding_tells_key_subspaces_apart():
    # Swapping subspaces 1 and 2 must change the output: keys carry which subspace they came from.
    model = tiny_model(3)
    z = model.encode(images())
    swapped = torch.cat([z[:, 0:2], z[:, 4:6], z[:, 2:4]], dim=1)
    with torch.no_grad():
        assert (model.decode(z) - model.decode(swapped)).abs().max().item() > 1e-5


@pytest.mark.parametrize("dim", [16, 30])
def test_positions_tell_every_latent_location_apart(dim):
    pos = sincos_positions_2d(8, 8, dim)
    assert pos.shape == (64, dim)
    assert torch.cdist(pos, pos).add(torch.eye(64) * 1e3).min() > 1e-3  # 64 distinct tokens


def test_attention_heads_must_divide_width():
    with pytest.raises(ValueError, match="autoencoder.attn_heads"):
        MultiSpaceAutoencoder(1, 2, 2, 4, widths=[8, 16], attn_heads=3)


def test_widths_must_cover_downsampling():
    with pytest.raises(ValueError, match="autoencoder.widths"):
        MultiSpaceAutoencoder(1, 2, 2, 8, widths=[8, 16], attn_heads=2)


# ----------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("k,c,f,widths,in_channels", [
    (1, 4, 1, [8], 1),
    (2, 3, 2, [8, 16], 3),
    (3, 4, 4, [8, 16], 1),
    (2, 2, 8, [8, 16, 16], 3),
    (4, 1, 4, [8, 16, 16], 1),  # more widths than downsamplings: the last stage keeps 1/4 resolution
])
def test_encode_decode_shapes(k, c, f, widths, in_channels):
    model = tiny_model(k, c, f, in_channels=in_channels, widths=widths)
    x = images(3, in_channels, 16)
    z = model.encode(x)
    assert z.shape == (3, k * c, 16 // f, 16 // f)
    assert len(model.split(z)) == k
    assert model.decode(z).shape == x.shape
    assert model(x).shape == x.shape


def test_split_refuses_wrong_channel_count():
    model = tiny_model(3)
    with pytest.raises(ValueError, match="K\\*C = 6"):
        model.decode(torch.zeros(1, 5, 4, 4))


# ----------------------------------------------------------------------------- checkpoints


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    model = tiny_model(3, seed=3)
    with torch.no_grad():  # move weights off their init so a fresh model would differ
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "ae.pt"
    save_autoencoder(model, path)
    loaded = load_autoencoder(path)
    assert loaded.config == model.config
    x = images(4)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        assert torch.equal(loaded.encode(x), model.encode(x))
    # What is stored is weights_only-safe: plain containers of tensors, ints, strs.
    payload = torch.load(path, weights_only=True)
    assert set(payload) == {"format", "kind", "config", "state_dict", "artefact"}
    assert payload["artefact"]["kind"] == "autoencoder" and len(payload["artefact"]["sha256"]) == 64


def test_load_refuses_foreign_and_truncated_files(tmp_path):
    foreign = tmp_path / "foreign.pt"
    atomic_torch_save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(CorruptFileError, match="foreign.pt: not a pipeline artefact of kind 'autoencoder'"):
        load_autoencoder(foreign)
    good = tmp_path / "good.pt"
    save_autoencoder(tiny_model(2), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(CorruptFileError, match="truncated.pt"):
        load_autoencoder(truncated)


def test_codec_checks_architecture_against_params(tmp_path):
    path = tmp_path / "ae.pt"
    save_autoencoder(tiny_model(2, c=2), path)
    cfg = AutoencoderConfig(subspaces=2, channels=2, downsample=4, widths=[8, 16], attn_heads=2)
    codec = load_codec(cfg, path)
    assert isinstance(codec, MultiSpaceCodec) and codec.kind == "multispace"
    z = codec.encode(images())
    assert z.shape == (2, 4, 4, 4)
    out = codec.decode(z * 100)  # far outside the training range: still valid images
    assert out.min() >= -1 and out.max() <= 1
    with pytest.raises(ValueError, match="autoencoder.subspaces = 3 but the checkpoint has 2"):
        load_codec(AutoencoderConfig(subspaces=3, channels=2, downsample=4, widths=[8, 16], attn_heads=2), path)
    with pytest.raises(ValueError, match="holds a .multispace. autoencoder, but autoencoder.kind is .sd-vae."):
        load_codec(AutoencoderConfig(kind="sd-vae"), path)


# ----------------------------------------------------------------------------- losses


def test_hybrid_loss_is_zero_for_identical_images():
    x = images(2, 1, 32)
    assert hybrid_recon_loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    assert l2_recon_loss(x, x).item() == 0.0


@pytest.mark.parametrize("channels", [1, 3])
def test_ssim_term_matches_pytorch_msssim(channels):
    x, y = images(3, channels, 32, seed=1), images(3, channels, 32, seed=2)
    y = 0.5 * x + 0.5 * y  # partly similar, so SSIM is away from 0
    expected = reference_ssim((x + 1) / 2, (y + 1) / 2, data_range=1.0, win_size=11, win_sigma=1.5)
    assert ssim(x, y).item() == pytest.approx(expected.item(), abs=1e-6)
    per_image = reference_ssim((x + 1) / 2, (y + 1) / 2, data_range=1.0, size_average=False)
    assert torch.allclose(ssim(x, y, reduction="none"), per_image, atol=1e-6)
    assert per_image.std() > 1e-3  # the images differ, so a per-image mix-up would show
    ssim_term, _ = hybrid_recon_terms(x, y)
    assert ssim_term.item() == pytest.approx(1 - expected.item(), abs=1e-6)
    # Gaussian window 11 / sigma 1.5 matters: another window gives another value.
    other = reference_ssim((x + 1) / 2, (y + 1) / 2, data_range=1.0, win_size=7, win_sigma=1.0)
    assert abs(other.item() - expected.item()) > 1e-3


def test_huber_term_matches_closed_form():
    x = torch.full((1, 1, 16, 16), -1.0)
    y = x.clone()
    y[0, 0, 0, 0] += 0.05  # inside delta: 0.5 d^2
    y[0, 0, 0, 1] += 0.5  # outside delta: delta * (|d| - delta / 2)
    delta = 0.1
    expected = (0.5 * 0.05 ** 2 + delta * (0.5 - delta / 2)) / 256
    _, huber_term = hybrid_recon_terms(x, y, huber_delta=delta)
    assert huber_term.item() == pytest.approx(expected, rel=1e-5)
    # delta matters: a large delta makes it 0.5 * MSE
    _, wide = hybrid_recon_terms(x, y, huber_delta=10.0)
    assert wide.item() == pytest.approx(0.5 * (0.05 ** 2 + 0.5 ** 2) / 256, rel=1e-5)


def test_hybrid_loss_endpoints_and_mix():
    x, y = images(2, 1, 32, seed=3), images(2, 1, 32, seed=4)
    ssim_term, huber_term = hybrid_recon_terms(x, y, huber_delta=0.1)
    assert hybrid_recon_loss(x, y, ssim_weight=1.0).item() == pytest.approx(ssim_term.item(), rel=1e-6)
    assert hybrid_recon_loss(x, y, ssim_weight=0.0).item() == pytest.approx(
        F.huber_loss(y, x, delta=0.1).item(), rel=1e-6)
    assert hybrid_recon_loss(x, y, ssim_weight=0.3).item() == pytest.approx(
        0.3 * ssim_term.item() + 0.7 * huber_term.item(), rel=1e-6)
    with pytest.raises(ValueError, match="ssim_weight"):
        hybrid_recon_loss(x, y, ssim_weight=1.5)


def test_loss_is_fp32_under_bf16_autocast():
    x, y = images(2, 1, 32, seed=5), images(2, 1, 32, seed=6)
    reference = hybrid_recon_loss(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = hybrid_recon_loss(x.bfloat16(), y)
    assert under_autocast.dtype == torch.float32
    assert under_autocast.item() == pytest.approx(reference.item(), rel=1e-2)


def test_reconstruction_loss_selects_kind():
    x, y = images(2, 1, 32, seed=7), images(2, 1, 32, seed=8)
    loss, parts = ReconstructionLoss("l2")(x, y)
    assert loss.item() == pytest.approx(F.mse_loss(y, x).item()) and set(parts) == {"l2"}
    loss, parts = ReconstructionLoss("hybrid", 0.3, 0.1)(x, y)
    assert loss.item() == pytest.approx(hybrid_recon_loss(x, y).item()) and set(parts) == {"one_minus_ssim", "huber"}
    with pytest.raises(ValueError, match="autoencoder.recon_loss"):
        ReconstructionLoss("l1")


# ----------------------------------------------------------------------------- training


def _striped_images(n: int = 16, size: int = 16) -> torch.Tensor:
    """uint8 images with structure (stripes, blobs) an autoencoder can learn quickly."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    out = []
    for _ in range(n):
        period = int(torch.randint(3, 8, (1,), generator=g))
        cy, cx = torch.randint(0, size, (2,), generator=g).tolist()
        img = 0.5 * (torch.sin(2 * torch.pi * xx / period) > 0).float()
        img += 0.5 * ((yy - cy) ** 2 + (xx - cx) ** 2 < 12).float()
        out.append(img)
    return (torch.stack(out)[:, None] * 255).round().to(torch.uint8)


@pytest.mark.parametrize("k,kind,precision", [(3, "hybrid", "bf16"), (1, "l2", "fp32")])
def test_a_few_dozen_steps_lower_the_loss(k, kind, precision):
    data = _striped_images()
    model = tiny_model(k, c=2)
    loss_fn = ReconstructionLoss(kind)
    before = reconstruction_metrics(model, data, progress=False)
    result = train_autoencoder(model, data, steps=40, batch_size=8, lr=3e-3, loss_fn=loss_fn,
                               precision=precision, seed=0, progress=False, log_every=5)
    after = reconstruction_metrics(model, data, progress=False)
    first, last = result.losses[0][1], result.losses[-1][1]
    assert last < 0.7 * first, result.losses
    assert after["l1"] < before["l1"]
    assert not model.training


def test_build_initialises_from_the_config_seed_only():
    cfg = AutoencoderConfig(subspaces=2, channels=2, downsample=4, widths=[8, 16], attn_heads=2, seed=5)
    torch.manual_seed(123)
    a = build_autoencoder(cfg, 1).state_dict()
    state_after = torch.get_rng_state()
    torch.rand(10)  # whatever ran before must not matter
    b = build_autoencoder(cfg, 1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = build_autoencoder(AutoencoderConfig(**{**cfg.__dict__, "seed": 6}), 1).state_dict()
    assert not torch.equal(a["encoder.0.weight"], other["encoder.0.weight"])
    torch.manual_seed(123)
    assert torch.equal(torch.get_rng_state(), state_after)  # the global RNG was left alone


def test_training_is_reproducible_for_a_seed():
    data = _striped_images(8)
    runs = []
    for _ in range(2):
        model = tiny_model(2, seed=1)
        train_autoencoder(model, data, steps=5, batch_size=4, lr=1e-3, loss_fn=ReconstructionLoss("hybrid"),
                          precision="fp32", seed=7, progress=False)
        runs.append(model.encode(from_u8(data)).detach())
    assert torch.equal(runs[0], runs[1])


def from_u8(u8: torch.Tensor) -> torch.Tensor:
    return u8.float() / 127.5 - 1


def test_metrics_of_a_perfect_reconstruction():
    class Identity(torch.nn.Module):
        def forward(self, x):
            return x

    data = _striped_images(4)
    m = reconstruction_metrics(Identity(), data, progress=False)
    assert m["ssim"] == pytest.approx(1.0, abs=1e-6) and m["l1"] == 0.0 and m["psnr"] >= 100


def test_fp16_on_cpu_is_refused_before_training():
    with pytest.raises(ValueError, match="fp16"):
        train_autoencoder(tiny_model(1), _striped_images(4), steps=1, batch_size=2, lr=1e-3,
                          loss_fn=ReconstructionLoss(), precision="fp16", progress=False)
