"""Pilot: EMA-FID curve of one weighting strategy on the real latents, without Ray or DVC.

    python benchmarks/strategy_pilot.py STRATEGY [--steps 3000] [--preset vit-tiny] [--batch 64]
        [--lr 3e-4] [--ema 0.999] [--threads 1] [--samples 500]

Needs the outputs of the encode, autoencoder, featurenet and fid_ref stages. Prints one row
per evaluation (step, loss, EMA-FID under the configured extractor, x0-MSE of subspace 0) and
writes results/pilot/STRATEGY.csv. This produced the README's pilot table.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msdm.config import replace, update  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from msdm.diffusion_training import TrainHooks  # noqa: E402
from pipeline.ray_train import run_worker  # noqa: E402
from pipeline.spec import RunSpec, repo_paths  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("strategy")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--preset", default="vit-tiny")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--ema", type=float, default=0.999)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--samples", type=int, default=500)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    p = load_params()
    p = replace(p, "weighting", strategy=a.strategy)
    p = update(p, {"train": {"batch_size": a.batch, "lr": a.lr, "ema_decay": a.ema, "checkpoint_every": 10**9,
                             "steps": a.steps},
                   "eval": {"every": max(1, a.steps // 6), "num_samples": a.samples}, "model": {"preset": a.preset}})
    out = Path("results/pilot") / f"{a.strategy}.csv"
    spec = RunSpec(params=p, paths=repo_paths(curve=out), name=f"pilot-{a.strategy}", storage="")
    start = time.perf_counter()
    result = run_worker(spec, TrainHooks(), progress=False)
    print(f"{a.strategy} {a.preset} batch {a.batch} lr {a.lr} ema {a.ema}: {time.perf_counter() - start:.0f}s, "
          f"{result.images_per_second:.0f} img/s")
    for row in result.curve:
        print(row["step"], f"loss {row['loss']:.4f}", f"{row.get('metric', 'fid')} {row.get('fid', float('nan')):.1f}",
              f"mse0 {row['mse_space0']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
