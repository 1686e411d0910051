"""Stage-1 ablation: K=1 x C=12 vs K=3 x C=4 (same 12 latent channels), hybrid vs L2 loss.

    python benchmarks/ablation_autoencoder.py [--params params.yaml] [--steps N] [--threads T]
        [--out results/ablation/autoencoder.json]

Every variant starts from params.yaml's `autoencoder` section with only the ablated
fields changed, trains with the same seed, and is scored on the whole test split
(SSIM, PSNR, L1 of the fp32 reconstructions). Writes one JSON with a row per variant,
rewritten after every variant; `--resume` keeps the rows of an interrupted run with the
same settings and trains only the missing variants.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from msdm import data
from msdm.autoencoder_training import reconstruction_metrics, train_autoencoder
from msdm.config import replace
from pipeline.config import load_params
from msdm.io import atomic_write_json
from msdm.losses import ReconstructionLoss
from msdm.multispace import build_autoencoder, count_parameters

VARIANTS = [  # name, subspaces, channels, recon_loss
    ("K3xC4-hybrid", 3, 4, "hybrid"),
    ("K1xC12-hybrid", 1, 12, "hybrid"),
    ("K3xC4-l2", 3, 4, "l2"),
    ("K1xC12-l2", 1, 12, "l2"),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--steps", type=int, default=None, help="training steps per variant (default: autoencoder.steps)")
    parser.add_argument("--out", default="results/ablation/autoencoder.json")
    parser.add_argument("--only", nargs="*", help="run only these variant names")
    parser.add_argument("--resume", action="store_true", help="keep finished rows of an earlier run")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default). On cores shared with other jobs, 1 is "
                             "several times faster than 2: OpenMP barriers wait for descheduled threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    params = load_params(args.params)
    steps = args.steps if args.steps is not None else params.autoencoder.steps
    device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = {"steps": steps, "batch_size": params.autoencoder.batch_size, "lr": params.autoencoder.lr,
                "seed": params.autoencoder.seed, "device": device, "torch_threads": torch.get_num_threads()}
    out = Path(args.out)
    rows = _resumable_rows(out, settings) if args.resume else []
    done = {row["variant"] for row in rows}
    train_images, _ = data.load_arrays(params.data, "train")
    test_images, _ = data.load_arrays(params.data, "test")
    for name, k, c, loss in VARIANTS:
        if (args.only and name not in args.only) or name in done:
            continue
        cfg = replace(params, "autoencoder", subspaces=k, channels=c, recon_loss=loss, steps=steps).autoencoder
        model = build_autoencoder(cfg, data.image_channels(params.data))
        start = time.perf_counter()
        result = train_autoencoder(model, train_images, steps=steps, batch_size=cfg.batch_size, lr=cfg.lr,
                                   loss_fn=ReconstructionLoss.from_config(cfg), precision=cfg.precision,
                                   seed=cfg.seed, device=device)
        metrics = reconstruction_metrics(model, test_images, device=device)
        rows.append({"variant": name, "subspaces": k, "channels": c, "recon_loss": loss,
                     "params": count_parameters(model), "train_seconds": round(time.perf_counter() - start, 1),
                     "final_train_loss": result.final_loss, **metrics})
        atomic_write_json({**settings, "variants": rows}, out)
        print(f"{name}: ssim {metrics['ssim']:.4f} psnr {metrics['psnr']:.2f} l1 {metrics['l1']:.4f} "
              f"({rows[-1]['train_seconds']:.0f}s) -> {out}", flush=True)
    return 0


def _resumable_rows(out: Path, settings: dict) -> list[dict]:
    """Rows of an earlier run at `out` made with the same settings; none otherwise."""
    if not out.is_file():
        return []
    earlier = json.loads(out.read_text())
    if any(earlier.get(key) != value for key, value in settings.items()):
        print(f"{out}: earlier run used other settings; starting over", flush=True)
        return []
    return list(earlier.get("variants", []))


if __name__ == "__main__":
    sys.exit(main())
