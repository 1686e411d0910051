"""FeatureNet: a small CNN classifier whose penultimate layer is an offline FID feature space.

MNIST-family papers report FID with a classifier trained on the dataset itself, because
Inception-V3 features of 28x28 grey clothes say little. The network is deliberately small
(~0.16M parameters, ~2.6 MMAC per 32x32 image) so that it trains to >= 90% test accuracy on
Fashion-MNIST in a couple of minutes on two CPU cores.

Architecture: `len(widths)` blocks of conv3x3-BN-ReLU + 2x2 max-pool, flatten, a linear
`features` layer (the FID feature layer, taken before its activation so that no unit is
clamped to zero and the covariance stays full rank), ReLU, linear `logits`.

Input: float images in [-1, 1], [N, C, S, S], S divisible by 2**len(widths).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from msdm.data import from_uint8
from msdm.io import FEATURENET_ARTEFACT, CorruptFileError, load_artefact, save_artefact
from msdm.precision import Precision, as_precision

DEFAULT_WIDTHS = (16, 32, 64)


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class FeatureNet(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, image_size: int = 32, feature_dim: int = 128,
                 widths: tuple[int, ...] | list[int] = DEFAULT_WIDTHS):
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if in_channels < 1 or num_classes < 2 or feature_dim < 1 or not widths:
            raise ValueError(f"FeatureNet: in_channels={in_channels}, num_classes={num_classes}, "
                             f"feature_dim={feature_dim}, widths={widths}: expected in_channels >= 1, "
                             f"num_classes >= 2, feature_dim >= 1 and at least one width")
        reduction = 2 ** len(widths)
        if image_size % reduction != 0:
            raise ValueError(f"FeatureNet: image_size {image_size} is not divisible by {reduction} "
                             f"(2 ** number of conv blocks)")
        self.config = {"in_channels": in_channels, "num_classes": num_classes, "image_size": image_size,
                       "feature_dim": feature_dim, "widths": list(widths)}
        channels = (in_channels, *widths)
        self.trunk = nn.Sequential(*(_conv_block(a, b) for a, b in zip(channels[:-1], channels[1:])))
        # Flatten rather than global-average-pool: where on the 32x32 canvas a shape sits is
        # informative for clothes, and at 4x4 the flattened map is cheap.
        self.features = nn.Linear(widths[-1] * (image_size // reduction) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)

    @property
    def in_channels(self) -> int:
        return self.config["in_channels"]

    @property
    def image_size(self) -> int:
        return self.config["image_size"]

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.features(self.trunk(x).flatten(1))
        return features, self.head(F.relu(features))

    def forward(self, x: Tensor) -> Tensor:
        return self.features_and_logits(x)[1]


def _check_training_data(images_u8: Tensor, labels: Tensor) -> None:
    if not (torch.is_tensor(images_u8) and images_u8.dtype == torch.uint8 and images_u8.ndim == 4):
        raise ValueError(f"train_featurenet: images must be a uint8 tensor [N, C, H, W], got "
                         f"{getattr(images_u8, 'dtype', type(images_u8).__name__)} "
                         f"{tuple(getattr(images_u8, 'shape', ()))}")
    if images_u8.shape[2] != images_u8.shape[3]:
        raise ValueError(f"train_featurenet: images must be square, got {tuple(images_u8.shape)}")
    if not (torch.is_tensor(labels) and labels.ndim == 1 and len(labels) == len(images_u8)
            and not labels.is_floating_point()):
        raise ValueError(f"train_featurenet: labels must be an integer tensor [N] with N = {len(images_u8)}, "
                         f"got {getattr(labels, 'dtype', type(labels).__name__)} "
                         f"{tuple(getattr(labels, 'shape', ()))}")


def _random_hflip(x: Tensor, generator: torch.Generator) -> Tensor:
    flip = torch.rand(x.shape[0], generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def train_featurenet(images_u8: Tensor, labels: Tensor, steps: int, batch_size: int, lr: float, seed: int,
                     feature_dim: int = 128, *, num_classes: int | None = None,
                     widths: tuple[int, ...] = DEFAULT_WIDTHS, augment: bool = False,
                     weight_decay: float = 1e-4, device: str | torch.device = "cpu",
                     precision: Precision | str = "auto") -> FeatureNet:
    """Train a FeatureNet with AdamW and a one-cycle learning rate; returns it in eval mode.

    `num_classes` defaults to max(label) + 1. `precision` is resolved for `device` (see
    msdm.precision): `auto` gives bf16 autocast where the hardware computes bf16 (about 1.8x
    faster than fp32 on an AVX512-BF16 CPU) and fp32 where bf16 would be emulated (8-10x
    slower on an AVX2-only CPU). BatchNorm statistics stay fp32.
    `augment` adds random horizontal flips (off by default).
    """
    _check_training_data(images_u8, labels)
    if steps < 0 or batch_size < 1 or not lr > 0:
        raise ValueError(f"train_featurenet: steps={steps}, batch_size={batch_size}, lr={lr}: "
                         f"expected steps >= 0, batch_size >= 1, lr > 0")
    labels = labels.to(torch.int64)
    if num_classes is None:
        num_classes = max(int(labels.max()) + 1, 2)
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise ValueError(f"train_featurenet: labels span [{int(labels.min())}, {int(labels.max())}], "
                         f"expected [0, {num_classes - 1}]")
    device = torch.device(device)
    autocast = as_precision(precision, device, key="featurenet.precision").autocast(device)
    torch.manual_seed(seed)
    model = FeatureNet(images_u8.shape[1], num_classes, images_u8.shape[-1], feature_dim, widths).to(device)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = None
    if steps > 1:
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    generator = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, len(images_u8))
    with tqdm(range(steps), desc="featurenet", disable=None) as bar:
        for step in bar:
            index = torch.randint(0, len(images_u8), (batch_size,), generator=generator)
            x = from_uint8(images_u8[index])
            if augment:
                x = _random_hflip(x, generator)
            x, y = x.to(device), labels[index].to(device)
            with autocast:
                loss = F.cross_entropy(model(x), y)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"train_featurenet: loss became {loss.item()} at step {step}; "
                                         f"lower featurenet.lr (now {lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
            if step % 50 == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}")
    return model.eval()


@torch.no_grad()
def predict(model: FeatureNet, images_u8: Tensor, batch_size: int = 1000) -> Tensor:
    """Predicted class per image, int64 [N], in fp32."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = [model(from_uint8(images_u8[i:i + batch_size]).to(device)).argmax(1).cpu()
           for i in range(0, len(images_u8), batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


def evaluate_accuracy(model: FeatureNet, images_u8: Tensor, labels: Tensor, batch_size: int = 1000) -> float:
    """Fraction of `images_u8` whose predicted class equals `labels`."""
    if len(images_u8) == 0 or len(images_u8) != len(labels):
        raise ValueError(f"evaluate_accuracy: got {len(images_u8)} images and {len(labels)} labels; "
                         f"expected the same non-zero number")
    return float((predict(model, images_u8, batch_size) == labels.cpu()).float().mean())


def save_featurenet(model: FeatureNet, path: str | Path) -> None:
    state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    save_artefact({"config": dict(model.config), "state_dict": state_dict}, path, FEATURENET_ARTEFACT)


def load_featurenet(path: str | Path, device: str | torch.device = "cpu") -> FeatureNet:
    """Load a FeatureNet written by `save_featurenet` (weights-only), in eval mode."""
    payload = load_artefact(path, FEATURENET_ARTEFACT)
    if not (isinstance(payload.get("config"), dict)
            and isinstance(payload.get("state_dict"), dict)):
        raise CorruptFileError(f"{path}: not a FeatureNet checkpoint (expected a dict with 'config' and "
                               f"'state_dict')")
    try:
        model = FeatureNet(**payload["config"])
        model.load_state_dict(payload["state_dict"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise CorruptFileError(f"{path}: FeatureNet checkpoint does not match the architecture "
                               f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return model.to(device).eval()

