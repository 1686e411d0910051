"""GPU check: bf16 training throughput and MFU of vit-b/2, a Ray Train fit with use_gpu, and
a short FID evaluation on the GPU. Falls back to tiny CPU settings when no GPU is present
(that path runs in the test suite).

    python benchmarks/gpu_check.py [--out results/bench/gpu_check.json] [--skip-ray]

Prints a table and writes JSON with the machine, dtype and settings next to every figure.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from msdm.config import replace  # noqa: E402
from pipeline.config import PipelineParams  # noqa: E402
from msdm.diffusion import GaussianDiffusion  # noqa: E402
from msdm.diffusion_loss import DiffusionLoss  # noqa: E402
from msdm.models.vit import build_vit  # noqa: E402
from msdm.weighting import build_strategy  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, in FLOP/s.
BF16_PEAK = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12}


def gpu_peak(name: str) -> float | None:
    return next((v for k, v in BF16_PEAK.items() if k in name), None)


def train_step_flops(model, loss_fn, x, y) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = loss_fn(model, x, y)
        out.loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def bench_vit(device: torch.device, preset: str, batch: int, size: int, channels: int, steps: int,
              compile_model: bool) -> dict:
    torch.manual_seed(0)
    strategy = build_strategy(PipelineParams().weighting.__class__(strategy="min_snr"), 1)
    model = build_vit(preset, in_channels=channels, image_size=size, patch_size=2, num_classes=1000,
                      learn_sigma=False).to(device)
    diffusion = GaussianDiffusion(1000)
    loss_fn = DiffusionLoss(diffusion, strategy, target="x0", subspaces=1, label_dropout=0.15, null_class=1000)
    x = torch.randn(batch, channels, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    flops = train_step_flops(model, loss_fn, x, y)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.99, 0.99), weight_decay=0.03,
                            fused=device.type == "cuda" or None)
    run = torch.compile(model) if compile_model else model
    ac = torch.autocast(device.type, dtype=torch.bfloat16)

    def step():
        out = loss_fn(run, x, y, autocast=ac)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    for _ in range(3):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / steps
    achieved = flops / dt
    peak = gpu_peak(torch.cuda.get_device_name()) if device.type == "cuda" else None
    return {"preset": preset, "patch": 2, "latent": [channels, size, size], "batch": batch, "dtype": "bf16 autocast",
            "compile": compile_model, "steps_timed": steps, "seconds_per_step": dt, "images_per_second": batch / dt,
            "flops_per_step": flops, "achieved_tflops": achieved / 1e12,
            "peak_tflops": peak / 1e12 if peak else None, "mfu": achieved / peak if peak else None}


def bench_fid(device: torch.device, n: int) -> dict:
    """FeatureNet FID of n random images against the stats of n others, on `device`."""
    from msdm.metrics import compute_fid, reference_statistics, save_stats
    from msdm.models.featurenet import FeatureNet, save_featurenet

    with tempfile.TemporaryDirectory() as tmp:
        net = FeatureNet(1, 10)
        save_featurenet(net, Path(tmp) / "fn.pt")
        g = torch.Generator().manual_seed(0)
        ref = torch.randint(0, 256, (n, 1, 32, 32), generator=g, dtype=torch.uint8)
        stats = reference_statistics(ref, "featurenet", str(Path(tmp) / "fn.pt"), device=str(device))
        save_stats(Path(tmp) / "s.npz", stats, extractor="featurenet")
        samples = torch.randint(0, 256, (n, 1, 32, 32), generator=g, dtype=torch.uint8)
        compute_fid(samples[:64], Path(tmp) / "s.npz", "featurenet", str(Path(tmp) / "fn.pt"), device=str(device))
        t0 = time.perf_counter()
        res = compute_fid(samples, Path(tmp) / "s.npz", "featurenet", str(Path(tmp) / "fn.pt"), device=str(device))
        return {"num_samples": n, "seconds": time.perf_counter() - t0, "metric": res["name"], "value": res["value"],
                "device": str(device)}


def synthetic_store(store: Path) -> Path:
    """512 random 12x8x8 latents in 3 subspaces, 10 classes: a store to train on without data."""
    import numpy as np

    from msdm.latents import LatentStoreWriter

    with LatentStoreWriter(store, subspaces=3, channels=4, num_classes=10, codec_kind="synthetic") as w:
        rng = np.random.default_rng(0)
        w.write_split("train", [rng.standard_normal((512, 12, 8, 8)).astype("float32")], rng.integers(0, 10, 512))
    return store


def bench_ray(use_gpu: bool, steps: int) -> dict:
    """A real Ray Train fit of the training loop on synthetic latents (one worker)."""
    from pipeline.cluster import init_ray
    from pipeline.ray_train import build_trainer
    from pipeline.spec import ArtefactPaths, RunSpec

    with tempfile.TemporaryDirectory() as tmp:
        store = synthetic_store(Path(tmp) / "latents")
        p = replace(PipelineParams(), "train", steps=steps, batch_size=64, use_gpu=use_gpu, num_workers=1,
                    cpus_per_worker=1, checkpoint_every=steps, precision="bf16")
        p = replace(p, "model", preset="vit-small")
        init_ray(p.ray)
        t0 = time.perf_counter()
        spec = RunSpec(params=p, paths=ArtefactPaths(latents=str(store)).resolved(), name="gpu-check",
                       storage=str(Path(tmp) / "ray"))
        result = build_trainer(spec).fit()
        return {"use_gpu": use_gpu, "steps": steps, "seconds": time.perf_counter() - t0,
                "error": repr(result.error) if result.error else None, "metrics": dict(result.metrics or {})}


def bench_sweep(use_gpu: bool, steps: int) -> dict:
    """A real 2-trial Tune sweep (const, dysigma) whose trials are Ray Train runs, on GPUs when asked."""
    import csv

    from msdm.config import update
    from pipeline.cluster import init_ray
    from pipeline.spec import ArtefactPaths, train_spec
    from pipeline.sweep import run_sweep

    with tempfile.TemporaryDirectory() as tmp:
        store = synthetic_store(Path(tmp) / "latents")
        p = update(PipelineParams(), {
            "train": {"batch_size": 64, "precision": "auto"},
            "sweep": {"strategies": ["const", "dysigma"], "targets": ["x0"], "seeds": [0], "steps": steps,
                      "eval_every": steps // 2, "preset": "vit-small", "num_workers": 1, "cpus_per_worker": 1,
                      "use_gpu": use_gpu}})
        init_ray(p.ray)
        t0 = time.perf_counter()
        try:
            out = run_sweep(train_spec(p, ArtefactPaths(latents=str(store)), str(Path(tmp) / "ray")),
                            Path(tmp) / "sweep")
        except Exception as e:  # noqa: BLE001 - the record says what failed
            return {"use_gpu": use_gpu, "steps": steps, "seconds": time.perf_counter() - t0, "error": repr(e)[:500]}
        with open(out.trials, newline="") as fh:
            trials = list(csv.DictReader(fh))
        return {"use_gpu": use_gpu, "steps": steps, "seconds": time.perf_counter() - t0, "error": None,
                "trials": [{k: t[k] for k in ("strategy", "world_size", "steps", "seconds", "precision")}
                           for t in trials]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/bench/gpu_check.json")
    ap.add_argument("--skip-ray", action="store_true")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    report = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__, "device": torch.cuda.get_device_name() if cuda else "cpu",
                          "cpu_threads": torch.get_num_threads()}}
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        report["vit_b2"] = bench_vit(device, "vit-b", 256, 32, 4, 20, compile_model=False)
        try:
            report["vit_b2_compiled"] = bench_vit(device, "vit-b", 256, 32, 4, 20, compile_model=True)
        except Exception as e:  # noqa: BLE001 - report, do not hide, a compile failure
            report["vit_b2_compiled"] = {"error": repr(e)[:500]}
        report["fid"] = bench_fid(device, 10000)
    else:  # CPU fallback: the same code paths at a size this machine can run in seconds
        report["vit_b2"] = bench_vit(device, "vit-tiny", 8, 8, 4, 2, compile_model=False)
        report["fid"] = bench_fid(device, 256)
    if not args.skip_ray:
        report["ray_train"] = bench_ray(cuda, 40 if cuda else 4)
        report["sweep"] = bench_sweep(cuda, 200 if cuda else 4)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str))
    v = report["vit_b2"]
    print(f"device: {report['machine']['device']}")
    print(f"{v['preset']}/2 {v['latent']} batch {v['batch']} bf16: {v['images_per_second']:.0f} img/s, "
          f"{v['achieved_tflops']:.1f} TFLOP/s" + (f", MFU {v['mfu']:.1%}" if v["mfu"] else ""))
    if "vit_b2_compiled" in report and "images_per_second" in report["vit_b2_compiled"]:
        c = report["vit_b2_compiled"]
        print(f"  torch.compile: {c['images_per_second']:.0f} img/s, MFU {c['mfu']:.1%}")
    f = report["fid"]
    print(f"FID ({f['metric']}) of {f['num_samples']} samples on {f['device']}: {f['seconds']:.2f}s")
    if "ray_train" in report:
        r = report["ray_train"]
        print(f"Ray Train fit use_gpu={r['use_gpu']}: {r['steps']} steps in {r['seconds']:.1f}s, error={r['error']}")
    if "sweep" in report:
        s = report["sweep"]
        print(f"Tune sweep, 2 Ray Train trials, use_gpu={s['use_gpu']}: {s['steps']} steps each in "
              f"{s['seconds']:.1f}s, error={s['error']}, trials={s.get('trials')}")
    failed = report.get("ray_train", {}).get("error") or report.get("sweep", {}).get("error")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
