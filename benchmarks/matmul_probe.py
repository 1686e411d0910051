"""Fp32 matmul throughput of this CPU through torch (MKL on x86), at the default ViT's sizes and at 1024^3.

    .venv/bin/python benchmarks/matmul_probe.py [--threads 2] [--repeats 50]

Prints GFLOP/s per shape (2 FLOPs per multiply-add; 5 warm-up calls, then the mean of
`--repeats`). On a shared VM the numbers move by tens of percent between runs: compare machines
or settings in one interleaved session, never across days.
"""
from __future__ import annotations

import argparse
import time

import torch

# (rows, inner, cols): vit-tiny/2's token batch (64 images x 18 tokens) through its 128-wide
# projections and 4x MLP, its attention-sized product, and a large square for reference
SHAPES = [(1152, 128, 128), (1152, 128, 512), (1152, 512, 128), (128, 1152, 128), (1024, 1024, 1024)]


def gflops(rows: int, inner: int, cols: int, repeats: int) -> float:
    a, b = torch.randn(rows, inner), torch.randn(inner, cols)
    for _ in range(5):
        a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * rows * inner * cols * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {torch.backends.cpu.get_cpu_capability()}")
    for shape in SHAPES:
        print(f"{'x'.join(map(str, shape)):>16}: {gflops(*shape, args.repeats):6.1f} GFLOP/s")


if __name__ == "__main__":
    main()
