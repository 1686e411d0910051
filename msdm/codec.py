"""Latent codecs: the one interface between images and the latents diffusion runs on.

A codec maps [-1, 1] images [B, C_img, S, S] to latents [B, K*C, S/f, S/f] and back.
The encode stage only ever talks to a codec, so every autoencoder plugs in by
implementing `LatentCodec` and a branch of `load_codec`; the latent shards and
everything downstream stay the same.

Two kinds (`autoencoder.kind`):

- ``multispace``: our stage-1 multi-space autoencoder, trained by the autoencoder stage.
- ``sd-vae``: diffusers' `AutoencoderKL`, e.g. ``stabilityai/sd-vae-ft-mse`` (f = 8, 4
  latent channels, scale 0.18215). Nothing is trained: the autoencoder stage imports the
  pretrained weights from `autoencoder.path` (a local diffusers folder or a hub id) into
  models/autoencoder.pt (`save_sd_vae`), so every later stage, and every Ray worker on
  any node, reads the same pinned, DVC-tracked weights and never the hub. The K-subspace
  split applies to the 4 latent channels: subspace k is channels [k*C, (k+1)*C) with
  C = 4 / K, exactly as for the multi-space latents.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from msdm.io import AUTOENCODER_ARTEFACT, CorruptFileError, load_artefact, save_artefact
from msdm.multispace import MultiSpaceAutoencoder, load_autoencoder

SD_VAE_KIND = "sd-vae"
SD_VAE_FORMAT = 1
SD_VAE_SCALE = 0.18215  # the SD-1.x VAE's latent scale, diffusers' default scaling_factor
# Encode/decode in chunks of this many images: an SD-VAE decode of a few hundred 512x512
# images at once needs tens of GB of activations.
SD_VAE_MICRO_BATCH = 32
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_DOWNLOAD_FIX = ("Fix: download it once where the network is reachable, e.g. "
                 "`huggingface-cli download stabilityai/sd-vae-ft-mse --local-dir models/sd-vae-ft-mse`, "
                 "and set autoencoder.path to that folder")


class CodecError(ValueError):
    """A codec that cannot be loaded as params.yaml describes it; the message says the fix."""


@runtime_checkable
class LatentCodec(Protocol):
    kind: str  # recorded in the latent store's meta.json
    subspaces: int  # K: the latent channels split into K equal subspaces
    channels: int  # C per subspace

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images -> raw (unnormalised) latents."""

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents -> images clamped to [-1, 1]."""

    def to(self, device: torch.device | str) -> "LatentCodec":
        ...


class MultiSpaceCodec:
    """The stage-1 multi-space autoencoder as a codec."""

    kind = "multispace"

    def __init__(self, model: MultiSpaceAutoencoder):
        self.model = model.eval()
        self.subspaces, self.channels = model.subspaces, model.channels

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        # The decoder's output is unbounded (see msdm.multispace); images are clamped here.
        return self.model.decode(z).clamp(-1, 1)

    def to(self, device: torch.device | str) -> "MultiSpaceCodec":
        self.model.to(device)
        return self


# ---------------------------------------------------------------------------- SD VAE


class SdVaeCodec(nn.Module):
    """diffusers' AutoencoderKL as a codec; an nn.Module whose forward is a round trip.

    encode: x -> scale * posterior mean. The mean, not a posterior sample: latents are
    encoded once and reused for every epoch, so one frozen sample draw would add fixed
    noise and no augmentation (DiT samples at pre-encoding; for sd-vae-ft-mse the
    posterior std is small and the two differ little). The scale (0.18215 for the SD-1.x
    VAE, `vae.config.scaling_factor`) only matters for comparing raw latents with other
    code, since the latent store normalises every channel anyway.

    decode: z -> vae.decode(z / scale), clamped to [-1, 1].

    Grey datasets (Fashion-MNIST): images are repeated to RGB before encoding and the
    decoded RGB is averaged back to one channel (`image_channels = 1`).
    """

    kind = SD_VAE_KIND

    def __init__(self, vae: nn.Module, subspaces: int, image_channels: int = 3, source: str = ""):
        super().__init__()
        latent_channels = int(vae.config.latent_channels)
        if subspaces < 1 or latent_channels % subspaces:
            raise CodecError(f"autoencoder.subspaces: {subspaces} does not divide the {latent_channels} latent "
                             f"channels of the SD VAE {source!r}; pick a divisor of {latent_channels}")
        if image_channels not in (1, 3):
            raise CodecError(f"the SD VAE takes RGB (or grey) images, not {image_channels} channels")
        self.vae = vae.eval().requires_grad_(False)
        self.subspaces, self.channels = subspaces, latent_channels // subspaces
        self.image_channels, self.source = image_channels, source
        self.scaling_factor = float(getattr(vae.config, "scaling_factor", None) or SD_VAE_SCALE)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = x.to(self.vae.dtype)
        means = [self.vae.encode(chunk).latent_dist.mean for chunk in x.split(SD_VAE_MICRO_BATCH)]
        return torch.cat(means) * self.scaling_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        z = z.to(self.vae.dtype) / self.scaling_factor
        images = torch.cat([self.vae.decode(chunk).sample for chunk in z.split(SD_VAE_MICRO_BATCH)])
        if self.image_channels == 1:
            images = images.mean(1, keepdim=True)
        return images.clamp(-1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction (for the autoencoder stage's SSIM/PSNR metrics)."""
        return self.decode(self.encode(x))


def _is_local_path(path: str) -> bool:
    """A filesystem path, not a hub id 'org/name' (a missing models/sd-vae counts as local: its parent exists)."""
    candidate = Path(path).expanduser()
    return (candidate.exists() or candidate.parent.is_dir() and str(candidate.parent) != "."
            or path.startswith(("/", "./", "../", "~")) or not _HUB_ID.fullmatch(path))


def load_pretrained_vae(path: str) -> nn.Module:
    """AutoencoderKL from a local diffusers folder (offline) or a hub id (downloaded once, cached).

    A local folder holds config.json + diffusion_pytorch_model.safetensors, or is a whole
    Stable Diffusion pipeline folder with the VAE in vae/.
    """
    from diffusers import AutoencoderKL

    if _is_local_path(path):
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise CodecError(f"autoencoder.path: {path} is not a folder. Point it at a diffusers AutoencoderKL "
                             f"folder (config.json + weights) or a hub id. {_DOWNLOAD_FIX}")
        subfolder = None
        if not (folder / "config.json").is_file() and (folder / "vae" / "config.json").is_file():
            subfolder = "vae"
        elif not (folder / "config.json").is_file():
            raise CodecError(f"autoencoder.path: {folder} has no config.json (nor vae/config.json): not a diffusers "
                             f"AutoencoderKL folder. {_DOWNLOAD_FIX}")
        try:
            return AutoencoderKL.from_pretrained(str(folder), subfolder=subfolder, local_files_only=True)
        except (OSError, ValueError, RuntimeError, TypeError) as e:
            raise CodecError(f"autoencoder.path: {folder} cannot be loaded as an AutoencoderKL "
                             f"({type(e).__name__}: {str(e).splitlines()[0]}). {_DOWNLOAD_FIX}") from None
    try:
        return AutoencoderKL.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - no network, unknown repo, HF_HUB_OFFLINE without a cached copy
        raise CodecError(f"autoencoder.path: the hub model {path!r} could not be loaded "
                         f"({type(e).__name__}: {str(e).splitlines()[0]}). {_DOWNLOAD_FIX}") from None


def _plain_config(vae: nn.Module) -> dict:
    """The VAE's constructor arguments as plain JSON types (loadable with weights_only=True)."""
    raw = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    return json.loads(json.dumps(raw))


def save_sd_vae(codec: SdVaeCodec, path: str | Path) -> None:
    """models/autoencoder.pt for kind sd-vae: {format, kind, source, image_channels, config, state_dict}."""
    payload = {"format": SD_VAE_FORMAT, "kind": SD_VAE_KIND, "source": codec.source,
               "image_channels": codec.image_channels, "config": _plain_config(codec.vae),
               "state_dict": {k: v.detach().cpu() for k, v in codec.vae.state_dict().items()}}
    save_artefact(payload, path, AUTOENCODER_ARTEFACT)


def _load_sd_vae_file(path: str | Path) -> tuple[nn.Module, dict]:
    from diffusers import AutoencoderKL

    payload = load_artefact(path, AUTOENCODER_ARTEFACT)
    if "kind" not in payload:
        raise CorruptFileError(f"{path}: not an autoencoder checkpoint (no kind)")
    if payload["kind"] != SD_VAE_KIND:
        raise CodecError(f"{path}: holds a {payload['kind']!r} autoencoder, but autoencoder.kind is "
                         f"{SD_VAE_KIND!r}")
    if payload.get("format") != SD_VAE_FORMAT or not {"config", "state_dict", "source"} <= set(payload):
        raise CorruptFileError(f"{path}: sd-vae checkpoint format {payload.get('format')!r} or keys "
                               f"{sorted(payload)} not understood")
    try:
        vae = AutoencoderKL.from_config(payload["config"])
        vae.load_state_dict(payload["state_dict"])
    except (TypeError, ValueError, RuntimeError, KeyError) as e:
        raise CorruptFileError(f"{path}: config and weights do not fit together "
                               f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return vae, payload


def sd_vae_codec(cfg, vae: nn.Module, image_channels: int, source: str) -> SdVaeCodec:
    """An SdVaeCodec checked against `cfg` (downsample f and C = latent channels / K)."""
    codec = SdVaeCodec(vae, cfg.subspaces, image_channels=image_channels, source=source)
    if codec.downsample != cfg.downsample:
        raise CodecError(f"autoencoder.downsample: {cfg.downsample}, but the SD VAE {source!r} downsamples by "
                         f"{codec.downsample}; set autoencoder.downsample: {codec.downsample}")
    if codec.channels != cfg.channels:
        raise CodecError(f"autoencoder.channels: {cfg.channels}, but the SD VAE's "
                         f"{codec.subspaces * codec.channels} latent channels split into "
                         f"{cfg.subspaces} subspaces give {codec.channels} each; set autoencoder.channels: "
                         f"{codec.channels}")
    return codec


# ---------------------------------------------------------------------------- loading


def load_codec(cfg, model_path: str | Path = "models/autoencoder.pt") -> LatentCodec:
    """The codec `cfg` (an `msdm.config.AutoencoderConfig`) names, checked against it.

    multispace: the checkpoint the autoencoder stage wrote; its stored architecture must
    match params.yaml, or the latents would silently come from another model.
    sd-vae: the weights the autoencoder stage imported into `model_path`; they must come
    from `autoencoder.path`, and f and C must match params.yaml.
    """
    if cfg.kind == "multispace":
        model = load_autoencoder(model_path)
        wanted = {"subspaces": cfg.subspaces, "channels": cfg.channels, "downsample": cfg.downsample,
                  "widths": list(cfg.widths), "attn_heads": cfg.attn_heads}
        differ = {k: (model.config[k], v) for k, v in wanted.items() if model.config[k] != v}
        if differ:
            detail = ", ".join(f"autoencoder.{k} = {v!r} but the checkpoint has {c!r}" for k, (c, v) in differ.items())
            raise CodecError(f"{model_path}: was trained with another architecture ({detail}). "
                             f"Retrain it with these params")
        return MultiSpaceCodec(model)
    if cfg.kind == SD_VAE_KIND:
        vae, payload = _load_sd_vae_file(model_path)
        if payload["source"] != cfg.path:
            raise CodecError(f"{model_path}: holds the SD VAE from {payload['source']!r}, but autoencoder.path is "
                             f"{cfg.path!r}. Re-import it from autoencoder.path")
        return sd_vae_codec(cfg, vae, int(payload.get("image_channels", 3)), payload["source"])
    raise NotImplementedError(f"autoencoder.kind: {cfg.kind!r} has no codec; implement LatentCodec for it in "
                              f"msdm/codec.py (available: 'multispace', 'sd-vae')")
