"""Stage-1 multi-space autoencoder (docs/method.md).

The encoder maps an image to K*C channels at 1/f resolution: K subspaces of C channels.
The decoder fuses the subspaces with multi-head cross-attention (query = subspace 0,
keys/values = the other subspaces' tokens, each tagged with a learned subspace embedding)
and decodes the fused map back to an image with convolutions. With K = 1 there is nothing
to attend to and the model is a plain convolutional autoencoder.

Layout of `widths`: each entry is one resolution stage; the first log2(f) stages each
start with a stride-2 convolution (the first one is the stem), so `widths=[32, 64], f=4`
gives 32 channels at 1/2 and 64 at 1/4 resolution. Every stage after the first holds one
residual block in the encoder and one in the decoder; the first (highest-resolution)
stage holds none unless it is the only one, because there a block costs as much as all
the others together. Nothing runs at full resolution except the stem and a sub-pixel
output conv. Measured on Fashion-MNIST (600 steps, K=3): blocks at stage 0 cost 40% more
time for +0.009 SSIM.

No normalisation layers in the conv path: the network is shallow, each residual block
starts as the identity (zero-initialised last conv), and GroupNorm cost a quarter of the
CPU step time while ending 0.008 SSIM *lower* after 600 steps. The attention fusion keeps
its LayerNorms (cheap on 64 tokens).

The decoder output is unbounded (no tanh). Fashion-MNIST is mostly background at exactly
-1, which a tanh only reaches with exploding pre-activations and vanishing gradients; a
linear output reaches it exactly. Consumers that need valid images clamp to [-1, 1]
(`msdm.codec.MultiSpaceCodec.decode`, the reconstruction metrics).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from msdm.io import AUTOENCODER_ARTEFACT, CorruptFileError, load_artefact, save_artefact

CHECKPOINT_FORMAT = 1


class ResBlock(nn.Module):
    """x + conv(silu(conv(silu(x)))), starting as the identity (normalisation-free)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


def sincos_positions_2d(height: int, width: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """Fixed 2-D sine/cosine position embedding [height*width, dim] (row-major tokens).

    Attention is permutation invariant; without positions a query token could not find
    the keys at its own location. Fixed (not learned) so any latent size works. Half the
    features encode the row, half the column; when 4 does not divide `dim` the last
    `dim % 4` features are zero.
    """
    quarter = dim // 4
    freqs = torch.exp(-math.log(10000.0) * torch.arange(quarter, device=device, dtype=torch.float32) / quarter)
    ys = torch.arange(height, device=device, dtype=torch.float32)[:, None] * freqs  # [H, q]
    xs = torch.arange(width, device=device, dtype=torch.float32)[:, None] * freqs  # [W, q]
    ys = torch.cat([ys.sin(), ys.cos()], dim=1)[:, None, :].expand(height, width, 2 * quarter)
    xs = torch.cat([xs.sin(), xs.cos()], dim=1)[None, :, :].expand(height, width, 2 * quarter)
    pos = torch.cat([ys, xs], dim=2).reshape(height * width, 4 * quarter)
    return F.pad(pos, (0, dim - 4 * quarter)).to(dtype or torch.float32)


class SubspaceCrossAttention(nn.Module):
    """Multi-head cross-attention from query tokens to context tokens, pre-norm."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(
                f"autoencoder.attn_heads: {heads} does not divide the attention width {dim} "
                f"(the last entry of autoencoder.widths); pick a divisor of {dim}"
            )
        self.heads = heads
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, d = query.shape
        q = self.to_q(self.norm_q(query))
        k, v = self.to_kv(self.norm_kv(context)).chunk(2, dim=-1)
        q, k, v = (t.reshape(b, -1, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))
        # Attention core in fp32 even under autocast: on CPU the bf16 flash-attention
        # backward is ~3x slower than fp32 here, and the softmax is better conditioned.
        with torch.autocast(q.device.type, enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        return self.proj_out(out.to(query.dtype).transpose(1, 2).reshape(b, n, d))


class SubspaceFusion(nn.Module):
    """Fuse K >= 2 projected subspaces into one map: subspace 0 attends to subspaces 1..K-1.

    The MSDM authors use K = 3 with query = subspace 0, key = subspace 1, value = subspace 2.
    For any K this generalises to keys = values = all of subspaces 1..K-1 (for K = 3 each
    key token comes from subspace 1 or 2 and carries its own value).

    query = subspace-0 tokens + positions; keys/values = the concatenated tokens of the
    other subspaces + positions + a learned per-subspace embedding (so a head can tell
    which subspace a key came from). Output = query + attention, then a residual MLP.
    """

    def __init__(self, dim: int, heads: int, subspaces: int, mlp_ratio: int = 2):
        super().__init__()
        if subspaces < 2:
            raise ValueError("SubspaceFusion needs at least two subspaces; K = 1 uses no fusion")
        self.attn = SubspaceCrossAttention(dim, heads)
        self.subspace_embed = nn.Parameter(torch.randn(subspaces - 1, dim) * 0.02)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, projected: list[torch.Tensor]) -> torch.Tensor:
        b, d, h, w = projected[0].shape
        pos = sincos_positions_2d(h, w, d, device=projected[0].device, dtype=projected[0].dtype)

        def tokens(t: torch.Tensor) -> torch.Tensor:
            return t.flatten(2).transpose(1, 2) + pos  # [B, h*w, d]

        query = tokens(projected[0])
        context = torch.cat([tokens(t) + self.subspace_embed[i] for i, t in enumerate(projected[1:])], dim=1)
        fused = query + self.attn(query, context)
        fused = fused + self.mlp(self.norm_mlp(fused))
        return fused.transpose(1, 2).reshape(b, d, h, w)


def _stage_plan(widths: list[int], downsample: int) -> tuple[list[int], int]:
    if downsample < 1 or downsample & (downsample - 1):
        raise ValueError(f"autoencoder.downsample: got {downsample}, expected a power of two")
    n_down = int(math.log2(downsample))
    if not widths or any(int(w) != w or w < 1 for w in widths):
        raise ValueError(f"autoencoder.widths: got {widths!r}, expected a non-empty list of positive integers")
    if n_down > len(widths):
        raise ValueError(
            f"autoencoder.widths: {len(widths)} stage(s) cannot downsample by {downsample} "
            f"(one stride-2 stage per factor of 2); give at least {n_down} widths"
        )
    return [int(w) for w in widths], n_down


class SubspaceProjection(nn.Module):
    """Project each of the K subspaces from C to `dim` channels with its own 1x1 weights.

    An einsum rather than a grouped 1x1 conv: the grouped conv's CPU backward is ~5x slower.
    """

    def __init__(self, subspaces: int, channels: int, dim: int):
        super().__init__()
        self.subspaces, self.channels = subspaces, channels
        self.weight = nn.Parameter(torch.randn(subspaces, dim, channels) / math.sqrt(channels))
        self.bias = nn.Parameter(torch.zeros(subspaces, dim))

    def forward(self, z: torch.Tensor) -> list[torch.Tensor]:
        b, _, h, w = z.shape
        zk = z.reshape(b, self.subspaces, self.channels, h, w)
        out = torch.einsum("bkchw,kdc->bkdhw", zk, self.weight.to(zk.dtype)) + self.bias.to(zk.dtype)[:, :, None, None]
        return list(out.unbind(1))


class MultiSpaceAutoencoder(nn.Module):
    """Image [B, in_channels, S, S] <-> latent [B, K*C, S/f, S/f] split into K subspaces."""

    def __init__(self, in_channels: int, subspaces: int, channels: int, downsample: int,
                 widths: list[int], attn_heads: int):
        super().__init__()
        widths, n_down = _stage_plan(list(widths), downsample)
        if subspaces < 1 or channels < 1 or in_channels < 1:
            raise ValueError(f"in_channels, subspaces and channels must be >= 1, got "
                             f"{in_channels}, {subspaces}, {channels}")
        self.config = {
            "in_channels": int(in_channels), "subspaces": int(subspaces), "channels": int(channels),
            "downsample": int(downsample), "widths": widths, "attn_heads": int(attn_heads),
        }
        self.subspaces, self.channels, self.downsample = subspaces, channels, downsample
        strides = [2 if i < n_down else 1 for i in range(len(widths))]
        latent_channels = subspaces * channels
        dim = widths[-1]

        stage0_block = len(widths) == 1

        # Encoder: stem -> per later stage: entry conv + ResBlock -> latent conv.
        enc: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, stride=strides[0], padding=1)]
        if stage0_block:
            enc.append(ResBlock(widths[0]))
        for i in range(1, len(widths)):
            enc += [nn.Conv2d(widths[i - 1], widths[i], 3, stride=strides[i], padding=1), ResBlock(widths[i])]
        enc += [nn.SiLU(), nn.Conv2d(dim, latent_channels, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)

        # Decoder: per-subspace C -> dim projection, fusion, then the stages in reverse,
        # each leaving through a transposed conv where the encoder strode.
        self.project = SubspaceProjection(subspaces, channels, dim)
        self.fusion = SubspaceFusion(dim, attn_heads, subspaces) if subspaces > 1 else None
        dec: list[nn.Module] = []
        for i in range(len(widths) - 1, 0, -1):
            dec.append(ResBlock(widths[i]))
            dec.append(_up_or_same(widths[i], widths[i - 1], strides[i]))
        # Output: a sub-pixel conv (conv to 4x channels at half resolution + pixel shuffle)
        # where the stem strode. A full-resolution conv with 1 output channel costs 5x more
        # CPU time than its MACs suggest (oneDNN is poor at tiny channel counts).
        scale = strides[0]
        if stage0_block:
            dec.append(ResBlock(widths[0]))
        dec += [nn.SiLU(), nn.Conv2d(widths[0], in_channels * scale * scale, 3, padding=1), nn.PixelShuffle(scale)]
        self.decoder = nn.Sequential(*dec)

    @property
    def latent_channels(self) -> int:
        return self.subspaces * self.channels

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def split(self, z: torch.Tensor) -> list[torch.Tensor]:
        """The K subspaces of a latent, each [B, C, h, w]."""
        if z.shape[1] != self.latent_channels:
            raise ValueError(f"latent has {z.shape[1]} channels, expected K*C = {self.latent_channels}")
        return list(z.split(self.channels, dim=1))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self.split(z)  # shape check
        projected = self.project(z)
        fused = projected[0] if self.fusion is None else self.fusion(projected)
        return self.decoder(fused)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def _up_or_same(c_in: int, c_out: int, stride: int) -> nn.Module:
    if stride == 2:
        # Transposed 4x4/2 conv: the cheapest learned x2 upsampling (a quarter of the
        # MACs of nearest-upsample + 3x3 conv at the output resolution).
        return nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1)
    return nn.Conv2d(c_in, c_out, 3, padding=1)


def build_autoencoder(cfg, in_channels: int) -> MultiSpaceAutoencoder:
    """From an `msdm.config.AutoencoderConfig`, initialised from `cfg.seed`.

    The initial weights depend on the seed alone, not on whatever used the global RNG
    before; the process's default RNG is not fixed either (torch.initial_seed() differs
    from run to run here), so without this two runs start from different weights. The
    global RNG state is left untouched.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return MultiSpaceAutoencoder(in_channels, cfg.subspaces, cfg.channels, cfg.downsample,
                                     list(cfg.widths), cfg.attn_heads)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_autoencoder(model: MultiSpaceAutoencoder, path: str | Path, extra: dict | None = None) -> None:
    """Atomically write {format, kind, config, state_dict[, extra]} (weights_only-loadable)."""
    payload = {"format": CHECKPOINT_FORMAT, "kind": "multispace", "config": dict(model.config),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    if extra:
        payload["extra"] = extra
    save_artefact(payload, path, AUTOENCODER_ARTEFACT)


def load_autoencoder(path: str | Path) -> MultiSpaceAutoencoder:
    """Rebuild the model from its stored config and load its weights, in eval mode."""
    payload = load_artefact(path, AUTOENCODER_ARTEFACT)
    if payload.get("kind") != "multispace" or "config" not in payload:
        raise CorruptFileError(f"{path}: not a multi-space autoencoder checkpoint (no kind/config)")
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise CorruptFileError(f"{path}: checkpoint format {payload.get('format')!r}, expected "
                               f"{CHECKPOINT_FORMAT}")
    try:
        model = MultiSpaceAutoencoder(**payload["config"])
        model.load_state_dict(payload["state_dict"])
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise CorruptFileError(f"{path}: config and weights do not fit together "
                               f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return model.eval()
