"""DVC stage `encode`: encode the train and test splits once into latent shards.

Reads the `data`, `autoencoder` and `encode` sections and the autoencoder (--autoencoder: the
trained multi-space one, or the SD VAE the autoencoder stage imported); writes the latent
store (--latents, msdm.latents format: float32 shards, labels, meta.json with the train
split's per-channel mean/std). How each dataset is read and encoded: msdm.encoding.
"""
from __future__ import annotations

import sys

import torch

from msdm.config import ConfigError
from pipeline.config import PipelineParams
from stages._cli import InputMissingError, require, run_stage

PATHS = {"autoencoder": "models/autoencoder.pt", "latents": "data/latents"}


def body(params: PipelineParams, args) -> None:
    from msdm import data
    from msdm.codec import load_codec
    from msdm.encoding import encode_split
    from msdm.io import file_sha256
    from msdm.latents import LatentStoreWriter

    require(args.autoencoder, "autoencoder")  # both kinds: sd-vae weights are imported there too
    try:
        codec = load_codec(params.autoencoder, args.autoencoder)
    except (ValueError, NotImplementedError) as e:
        raise ConfigError(str(e)) from None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    codec.to(device)
    # the autoencoder's hash in meta.json: latents from another autoencoder never look the same
    extra = {"dataset": params.data.dataset, "image_size": params.data.image_size,
             "autoencoder_sha256": file_sha256(args.autoencoder)}
    with LatentStoreWriter(args.latents, subspaces=codec.subspaces, channels=codec.channels,
                           num_classes=data.num_classes(params.data), codec_kind=codec.kind,
                           shard_size=params.encode.shard_size, extra=extra) as writer:
        for split in ("train", "test"):
            try:
                latents, labels = encode_split(codec, params.data, split, params.encode.batch_size, device)
            except data.DatasetError as e:
                raise InputMissingError(str(e)) from None
            writer.write_split(split, latents, labels)
    sizes = ", ".join(f"{split} {info['n']}" for split, info in writer.splits.items())
    print(f"encode: {sizes} latents of shape {codec.subspaces * codec.channels}x{writer.latent_hw[0]}x"
          f"{writer.latent_hw[1]} ({codec.subspaces} subspaces) -> {args.latents}")


def main(argv: list[str] | None = None) -> int:
    return run_stage("encode", body, argv=argv, paths=PATHS, description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
