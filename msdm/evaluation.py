"""Sample latents with the EMA model, decode them with the stage-1 decoder, measure FID."""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor, nn

from .config import Params
from .diffusion import GaussianDiffusion, prediction
from .precision import resolve_precision
from .sampling import Denoiser, sample
from .weighting import strategy_learns_variance

if TYPE_CHECKING:
    from .latents import LatentStore
    from .diffusion_training import LatentInfo


def balanced_labels(n: int, num_classes: int, device="cpu") -> Tensor | None:
    """Class labels 0,1,..,K-1,0,1,.. so every class gets the same number of samples."""
    if num_classes <= 0:
        return None
    return torch.arange(n, device=device) % num_classes


class SampleGenerator:
    """Latent sampler + decoder, built once and reused for every evaluation."""

    def __init__(self, params: Params, store: "LatentStore", decoder_path: str, info: "LatentInfo",
                 device: torch.device | str = "cpu"):
        from .codec import load_codec

        self.params, self.store, self.info = params, store, info
        self.device = torch.device(device)
        self.codec = load_codec(params.autoencoder, decoder_path).to(self.device)
        self.diffusion = GaussianDiffusion(params.diffusion.timesteps, params.diffusion.schedule)
        self.learn_sigma = strategy_learns_variance(params.weighting.strategy)
        self.precision = resolve_precision(params.train.precision, self.device, key="train.precision")
        self.on_batch: Callable[[int, int], None] | None = None  # (samples done, samples asked) per batch

    @torch.inference_mode()
    def latents(self, model: nn.Module, n: int, *, seed: int, labels: Tensor | None = None) -> Tensor:
        ev = self.params.eval
        denoiser = Denoiser(model, self.diffusion, prediction(self.params.diffusion.target),
                            learn_sigma=self.learn_sigma, cfg_scale=ev.cfg_scale,
                            null_class=self.info.num_classes if self.info.num_classes > 0 else None,
                            autocast=self.precision.autocast(self.device),
                            x0_range=self.store.normalized_range() if ev.clip_x0 else None)
        if labels is None:
            labels = balanced_labels(n, self.info.num_classes, self.device)
        g = torch.Generator(device=self.device).manual_seed(seed)
        out = []
        was_training = model.training
        model.eval()
        for start in range(0, n, ev.batch_size):
            b = min(ev.batch_size, n - start)
            y = labels[start:start + b] if labels is not None else None
            out.append(sample(denoiser, (b, self.info.channels, self.info.size, self.info.size), labels=y,
                              steps=ev.sampling_steps, sampler=ev.sampler, eta=ev.eta, spacing=ev.spacing,
                              generator=g, device=self.device))
            if self.on_batch is not None:
                self.on_batch(start + b, n)
        model.train(was_training)
        return torch.cat(out)

    @torch.inference_mode()
    def images(self, model: nn.Module, n: int, *, seed: int, labels: Tensor | None = None) -> Tensor:
        """uint8 images [n, C, H, W]."""
        return self.decode(self.latents(model, n, seed=seed, labels=labels))

    @torch.inference_mode()
    def decode(self, z: Tensor) -> Tensor:
        """Normalised latents [n, K*C, h, w] -> uint8 images [n, C, H, W]."""
        from .data import to_uint8

        n = z.shape[0]
        z = self.store.denormalize(z.cpu()).to(self.device)
        images = []
        for start in range(0, n, self.params.eval.batch_size):
            images.append(self.codec.decode(z[start:start + self.params.eval.batch_size]).float().cpu())
        return to_uint8(torch.cat(images))


class FIDEvaluator:
    """`evaluate(ema_model, step) -> {"fid": ..., "metric": ...}` for the training loop."""

    def __init__(self, generator: SampleGenerator, ref_stats: str, extractor: str, weights_path: str,
                 num_samples: int, seed: int):
        self.generator, self.ref_stats = generator, ref_stats
        self.extractor, self.weights_path = extractor, weights_path
        self.num_samples, self.seed = num_samples, seed

    def __call__(self, model: nn.Module, step: int) -> dict:
        from .metrics import compute_fid

        images = self.generator.images(model, self.num_samples, seed=self.seed)
        result = compute_fid(images, self.ref_stats, extractor=self.extractor, weights_path=self.weights_path)
        return {"fid": result["value"], "metric": result["name"]}


def build_evaluator(params: Params, store: "LatentStore", *, autoencoder: str, featurenet: str, fid_ref: str,
                    device, info: "LatentInfo") -> FIDEvaluator:
    """FID of `eval.num_samples` samples against `fid_ref`, decoded by the `autoencoder` file."""
    gen = SampleGenerator(params, store, autoencoder, info, device=device)
    weights = featurenet if params.fid.extractor == "featurenet" else params.fid.weights_path
    return FIDEvaluator(gen, fid_ref, params.fid.extractor, weights, params.eval.num_samples, params.eval.seed)
