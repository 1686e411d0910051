"""A plain ViT denoiser in the Min-SNR / U-ViT style.

Time and class enter as two extra tokens in front of the patch tokens; attention is
`F.scaled_dot_product_attention`; a linear layer unpatchifies. With `learn_sigma` the
output has twice the input channels (prediction, then iDDPM variance values).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import PRESETS


@dataclass(frozen=True)
class ViTPreset:
    dim: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0


VIT_PRESETS = {
    "vit-tiny": ViTPreset(dim=128, depth=4, heads=4),
    "vit-small": ViTPreset(dim=256, depth=6, heads=4),
    "vit-b": ViTPreset(dim=768, depth=12, heads=12),
    "vit-l": ViTPreset(dim=1024, depth=24, heads=16),
    "vit-xl": ViTPreset(dim=1152, depth=28, heads=16),
}
assert set(VIT_PRESETS) == set(PRESETS)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"model dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if x.device.type == "cpu" and torch.is_grad_enabled() and q.dtype == torch.bfloat16:
            # CPU's bf16 flash-attention backward is slow (23% of a vit-small step); fp32
            # attention trains ~30% faster there (benchmarks/cpubench). CUDA keeps bf16 SDPA.
            with torch.autocast("cpu", enabled=False):
                x = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        else:
            x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, *, in_channels: int, image_size: int, patch_size: int, dim: int, depth: int,
                 heads: int, mlp_ratio: float = 4.0, num_classes: int = 0, learn_sigma: bool = False):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"patch_size {patch_size} does not divide the input size {image_size}")
        self.in_channels = in_channels
        self.out_channels = in_channels * (2 if learn_sigma else 1)
        self.image_size, self.patch_size = image_size, patch_size
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        self.grid = image_size // patch_size
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.time_embed = nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))
        # index num_classes is the null class used for classifier-free guidance
        self.class_embed = nn.Embedding(num_classes + 1, dim) if num_classes > 0 else None
        self.extras = 2 if num_classes > 0 else 1
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + self.grid ** 2, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, patch_size ** 2 * self.out_channels)
        self.apply(self._init)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @property
    def null_class(self) -> int:
        return self.num_classes

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        b = x.shape[0]
        if x.shape[1:] != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(f"ViT input: got shape {tuple(x.shape)}, expected [B, {self.in_channels}, "
                             f"{self.image_size}, {self.image_size}]")
        h = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = [self.time_embed(timestep_embedding(t, h.shape[-1]).to(h.dtype)).unsqueeze(1)]
        if self.class_embed is not None:
            if y is None:
                y = torch.full((b,), self.null_class, device=x.device, dtype=torch.long)
            tokens.append(self.class_embed(y).unsqueeze(1))
        h = torch.cat(tokens + [h], dim=1) + self.pos_embed
        for block in self.blocks:
            h = block(h)
        h = self.head(self.norm(h[:, self.extras:]))
        p, g, c = self.patch_size, self.grid, self.out_channels
        h = h.view(b, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(b, c, g * p, g * p)


def build_vit(preset: str, *, in_channels: int, image_size: int, patch_size: int, num_classes: int,
              learn_sigma: bool) -> ViT:
    if preset not in VIT_PRESETS:
        raise ValueError(f"model.preset: got {preset!r}, expected one of {', '.join(VIT_PRESETS)}")
    p = VIT_PRESETS[preset]
    return ViT(in_channels=in_channels, image_size=image_size, patch_size=patch_size, dim=p.dim,
               depth=p.depth, heads=p.heads, mlp_ratio=p.mlp_ratio, num_classes=num_classes,
               learn_sigma=learn_sigma)
