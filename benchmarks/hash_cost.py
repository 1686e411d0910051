"""What the artefact hashes cost: SHA-256 throughput here, and its share of the stages that read.

Every latent shard and labels file is hashed by the reader before use (msdm.latents), and every
model and training checkpoint carries a content digest checked on load and computed on save
(msdm.io.save_artefact / load_artefact). This measures both throughputs on this machine
(median of ROUNDS), then prices the default run's artefacts: the Fashion-MNIST latent store, a
vit-tiny training checkpoint (model, EMA, Adam moments) and the exported EMA model, against the
default stage times in docs/performance.md (pass --train-s / --evaluate-s for another run).

    .venv/bin/python benchmarks/hash_cost.py [--rounds 5] [--train-s 499] [--evaluate-s 76]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cpubench.machine import describe_machine  # noqa: E402
from msdm.config import Params  # noqa: E402
from msdm.diffusion_training import LatentInfo, build_model  # noqa: E402
from msdm.io import content_digest, file_sha256  # noqa: E402

MIB = 1 << 20


def median_seconds(fn, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--train-s", type=float, default=499.1, help="train stage seconds (default run 2, AVX2 VM)")
    ap.add_argument("--evaluate-s", type=float, default=75.9, help="evaluate stage seconds (same run)")
    args = ap.parse_args()
    torch.set_num_threads(1)

    blob = torch.randn(64 * MIB // 4)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "blob.bin"
        path.write_bytes(blob.numpy().tobytes())
        file_s = median_seconds(lambda: file_sha256(path), args.rounds)
    digest_s = median_seconds(lambda: content_digest({"w": blob}), args.rounds)
    file_bps, digest_bps = 64 * MIB / file_s, 64 * MIB / digest_s

    # the default run's artefacts
    latents = (60_000 + 10_000) * 12 * 8 * 8 * 4 + (60_000 + 10_000) * 8  # float32 shards + int64 labels
    model = build_model(Params(), LatentInfo(channels=12, size=8, subspaces=3, num_classes=10))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    checkpoint = 4 * weights  # model, EMA, Adam's two moments
    reads_in_train = latents / file_bps + 4 * 2 * checkpoint / digest_bps  # 4 checkpoints: saved, and checked on export/resume
    reads_in_evaluate = latents / file_bps + weights / digest_bps

    machine = describe_machine()
    print(f"machine: {machine.short()}; flags {' '.join(f for f, on in machine.flags.items() if on)}; "
          f"1 torch thread")
    print(f"file SHA-256 (latent shards): {file_bps / MIB:.0f} MiB/s; content digest (torch payloads): "
          f"{digest_bps / MIB:.0f} MiB/s (median of {args.rounds} over 64 MiB)")
    print("| artefact | bytes | hash s |")
    print("|---|---|---|")
    print(f"| latent store (Fashion-MNIST, 12x8x8) | {latents / MIB:.1f} MiB | {latents / file_bps:.3f} |")
    print(f"| vit-tiny training checkpoint | {checkpoint / MIB:.1f} MiB | {checkpoint / digest_bps:.3f} |")
    print(f"| exported EMA model | {weights / MIB:.1f} MiB | {weights / digest_bps:.3f} |")
    print(f"train stage: {reads_in_train:.2f} s of hashing in {args.train_s:.0f} s = "
          f"{100 * reads_in_train / args.train_s:.2f}%")
    print(f"evaluate stage: {reads_in_evaluate:.2f} s of hashing in {args.evaluate_s:.0f} s = "
          f"{100 * reads_in_evaluate / args.evaluate_s:.2f}%")


if __name__ == "__main__":
    main()
