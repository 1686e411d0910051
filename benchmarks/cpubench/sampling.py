"""Benchmark 5: sampling throughput and FID evaluation time, through the evaluation code.

sampling: msdm.evaluation.SampleGenerator.images with the configured sampler (eval.sampler,
eval.sampling_steps, eval.batch_size, cfg, precision), decode included. It uses the real
stage-1 decoder and latent store when they exist (models/autoencoder.pt, data/latents),
else a random-init decoder and a synthetic store; the diffusion model is always randomly
initialised (the cost does not depend on its weights).

fid: msdm.metrics.compute_fid with the FeatureNet extractor on N random uint8 images,
against results/fid_ref/stats.npz with models/featurenet.pt when both exist, else against
temporary ones made by benchmarks/gpu_check.py's bench_fid. The first call (which builds
and caches the extractor) is not timed.
"""
from __future__ import annotations

import time

import torch

from msdm.config import replace
from msdm.data import image_channels, to_uint8

from .common import Context, Figure, latent_info, write_store

BENCHMARK_SAMPLING = "sampling"
BENCHMARK_FID = "fid"


def _decoder_path(ctx: Context, params) -> tuple[str, str]:
    """(checkpoint path, what it is): the real autoencoder if it loads under params, else a random one."""
    from msdm.codec import load_codec
    from msdm.multispace import build_autoencoder, save_autoencoder

    real = ctx.repo / "models" / "autoencoder.pt"
    if real.is_file():
        try:
            load_codec(params.autoencoder, real)
            return str(real), "models/autoencoder.pt"
        except Exception as e:  # noqa: BLE001 - an outdated checkpoint: time a random one instead
            reason = f"models/autoencoder.pt not usable ({type(e).__name__}); random init"
    else:
        reason = "random init (models/autoencoder.pt absent)"
    path = ctx.tmp / "autoencoder.pt"
    torch.manual_seed(0)
    save_autoencoder(build_autoencoder(params.autoencoder, image_channels(params.data)), path)
    return str(path), reason


def _store(ctx: Context, params):
    from msdm.latents import LatentStore

    real = ctx.repo / "data" / "latents"
    if (real / "meta.json").is_file():
        return LatentStore(real), "data/latents"
    return LatentStore(write_store(ctx.tmp / "sampling-latents", 64, latent_info(params))), "synthetic store"


def run_sampling(ctx: Context) -> list[Figure]:
    from msdm.evaluation import SampleGenerator
    from msdm.diffusion_training import build_model
    from msdm.diffusion_training import latent_info as store_latent_info

    params = ctx.params
    if ctx.quick:
        params = replace(params, "eval", sampling_steps=2, batch_size=8)
    n = 8 if ctx.quick else params.eval.num_samples
    ev = params.eval
    store, store_what = _store(ctx, params)
    decoder, decoder_what = _decoder_path(ctx, params)
    info = store_latent_info(store.meta)
    torch.manual_seed(0)
    backbone = build_model(params, info).backbone.eval()
    generator = SampleGenerator(params, store, decoder, info)

    ctx.log(f"{n} samples, {ev.sampler} {ev.sampling_steps} steps")
    start = time.perf_counter()
    images = generator.images(backbone, n, seed=ev.seed)
    total = time.perf_counter() - start
    z = torch.randn(n, info.channels, info.size, info.size, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    with torch.inference_mode():
        for chunk in store.denormalize(z).split(ev.batch_size):
            to_uint8(generator.codec.decode(chunk).float())
    decode = time.perf_counter() - start

    settings = {"num_samples": n, "sampler": ev.sampler, "sampling_steps": ev.sampling_steps, "eta": ev.eta,
                "cfg_scale": ev.cfg_scale, "eval_batch_size": ev.batch_size, "preset": params.model.preset,
                "weighting": params.weighting.strategy, "learn_sigma": generator.learn_sigma,
                "latent": [info.channels, info.size, info.size], "decoder": decoder_what, "store": store_what,
                "diffusion_model": "random init", "images": list(images.shape)}
    used = generator.precision.name
    dtype = f"{'fp32' if used == 'fp32' else used + ' autocast'} (denoiser), fp32 decoder"
    per_image = total / n
    return [
        ctx.figure(BENCHMARK_SAMPLING, "sampling + decode (SampleGenerator.images)", n / total, "images/s",
                   dtype=dtype, settings=settings, note="one timed run; no warm-up (its cost is in the figure)"),
        ctx.figure(BENCHMARK_SAMPLING, "decode only (codec.decode)", n / decode, "images/s", dtype="fp32",
                   settings=settings),
        ctx.figure(BENCHMARK_SAMPLING, "denoiser evaluations",
                   n * ev.sampling_steps / (total - decode) if total > decode else None,
                   "image-steps/s", dtype=dtype, settings=settings,
                   note="(sampling time - decode time) spread over num_samples x sampling_steps"),
        ctx.figure(BENCHMARK_SAMPLING, f"samples for one evaluation (eval.num_samples={params.eval.num_samples})",
                   per_image * params.eval.num_samples, "s", dtype=dtype, settings=settings,
                   note="at the measured rate; every eval.every training steps"),
        ctx.figure(BENCHMARK_SAMPLING, f"samples for the final evaluation (eval.final_num_samples="
                   f"{params.eval.final_num_samples})", per_image * params.eval.final_num_samples, "s",
                   dtype=dtype, settings=settings, note="estimate at the measured rate"),
    ]


def run_fid(ctx: Context) -> list[Figure]:
    from msdm.metrics import compute_fid

    counts = (64, 128) if ctx.quick else (1000, 5000)
    channels, size = image_channels(ctx.params.data), ctx.params.data.image_size
    weights = ctx.repo / "models" / "featurenet.pt"
    ref = ctx.repo / "results" / "fid_ref" / "stats.npz"
    figures = []
    if weights.is_file() and ref.is_file():
        g = torch.Generator().manual_seed(0)
        compute_fid(torch.randint(0, 256, (64, channels, size, size), dtype=torch.uint8, generator=g), ref,
                    "featurenet", str(weights), device="cpu")  # builds and caches the extractor
        for n in counts:
            samples = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)
            start = time.perf_counter()
            result = compute_fid(samples, ref, "featurenet", str(weights), device="cpu")
            seconds = time.perf_counter() - start
            figures.append(_fid_figure(ctx, n, seconds, result["name"], "models/featurenet.pt + "
                                       "results/fid_ref/stats.npz", [channels, size, size]))
    else:
        from gpu_check import bench_fid  # a temporary FeatureNet and reference stats

        for n in counts:
            r = bench_fid(torch.device("cpu"), n)
            figures.append(_fid_figure(ctx, n, r["seconds"], r["metric"],
                                       "temporary FeatureNet + stats (gpu_check.bench_fid)", [1, 32, 32]))
    return figures


def _fid_figure(ctx: Context, n: int, seconds: float, metric: str, source: str, image: list[int]) -> Figure:
    return ctx.figure(BENCHMARK_FID, f"FID of {n} samples ({metric})", seconds, "s", dtype="fp32",
                      settings={"num_samples": n, "extractor": "featurenet", "weights_and_reference": source,
                                "image": image, "batch_size": 500, "samples": "random uint8"},
                      note="feature extraction + Frechet distance; extractor already built")
