"""Sampler study: FID of each timestep spacing, x0 clamp and solver, for x0, eps and v models.

    python benchmarks/sampler_study.py WORKSPACE [--train-steps 800] [--samples 500]
        [--targets x0 eps v] [--checkpoint models/diffusion.pt] [--out FILE]
    python benchmarks/sampler_study.py --table RECORD   # the markdown table of docs/sampling.md

WORKSPACE is a directory where `make repro` has run (data/latents, models/autoencoder.pt,
models/featurenet.pt, results/fid_ref/stats.npz, params.yaml). For each target the script
trains a `const` model at the sweep's settings (params' sweep.preset, train.batch_size, lr,
EMA), then measures, on the same EMA weights and the same noise seed, the FID of every
sampler variant below. `--checkpoint` adds the workspace's trained model (its own target).
The FID noise of `--samples` samples is measured as the spread over three sampling seeds of
the reference variant. Writes a JSON record (benchmarks/records/) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

from cpubench.machine import describe_machine  # noqa: E402
from msdm.config import replace, update  # noqa: E402
from pipeline.config import load_params  # noqa: E402

# (label, sampler, steps, spacing, clip_x0)
VARIANTS = [
    ("ddim50 linspace (before)", "ddim", 50, "linspace", False),
    ("ddim50 leading", "ddim", 50, "leading", False),
    ("ddim50 linspace clip", "ddim", 50, "linspace", True),
    ("ddim50 leading clip", "ddim", 50, "leading", True),
    ("ddim50 trailing clip", "ddim", 50, "trailing", True),
    ("ddpm50 leading clip", "ddpm", 50, "leading", True),
    ("dpmpp_2m10 leading clip", "dpmpp_2m", 10, "leading", True),
    ("dpmpp_2m15 leading clip", "dpmpp_2m", 15, "leading", True),
    ("dpmpp_2m20 leading clip", "dpmpp_2m", 20, "leading", True),
    ("dpmpp_2m20 leading", "dpmpp_2m", 20, "leading", False),
    ("dpmpp_2m10 trailing clip", "dpmpp_2m", 10, "trailing", True),
    ("dpmpp_2m15 trailing clip", "dpmpp_2m", 15, "trailing", True),
    ("dpmpp_2m20 trailing clip", "dpmpp_2m", 20, "trailing", True),
    ("dpmpp_2m20 linspace clip", "dpmpp_2m", 20, "linspace", True),
    ("ddim50 karras clip", "ddim", 50, "karras", True),
    ("dpmpp_2m10 karras clip", "dpmpp_2m", 10, "karras", True),
    ("dpmpp_2m15 karras clip", "dpmpp_2m", 15, "karras", True),
    ("dpmpp_2m20 karras clip", "dpmpp_2m", 20, "karras", True),
]
REFERENCE = "ddim50 leading clip"
NOISE_SEEDS = (1234, 1235, 1236)


def fid_of(params, store, info, model, variant, samples: int, seed: int, ws: Path) -> tuple[float, float, float]:
    """(FID, seconds of sampling + decoding + FID, std of the latent samples)."""
    from msdm.evaluation import SampleGenerator
    from msdm.metrics import compute_fid

    _, sampler, steps, spacing, clip = variant
    p = replace(params, "eval", sampler=sampler, sampling_steps=steps, spacing=spacing, clip_x0=clip, eta=0.0)
    gen = SampleGenerator(p, store, str(ws / "models/autoencoder.pt"), info)
    start = time.perf_counter()
    z = gen.latents(model, samples, seed=seed)
    images = gen.decode(z)
    fid = compute_fid(images, str(ws / "results/fid_ref/stats.npz"), extractor="featurenet",
                      weights_path=str(ws / "models/featurenet.pt"))["value"]
    seconds = time.perf_counter() - start
    return fid, seconds, float(z.float().std())


def train_const(params, latents, labels, info, target: str, steps: int):
    """EMA backbone of a const-weighted model of `target`, trained in-process."""
    from msdm.diffusion_training import train_loop

    p = replace(params, "diffusion", target=target)
    p = replace(p, "weighting", strategy="const")
    p = update(p, {"train": {"checkpoint_every": 10 ** 9, "steps": steps, "seed": 0},
                   "eval": {"every": steps}, "model": {"preset": params.sweep.preset}})
    captured = {}

    def keep(ema_model, step):
        if step == steps:
            captured["state"] = {k: v.clone() for k, v in ema_model.state_dict().items()}
        return {}

    train_loop(p, latents, labels, info, evaluate=keep, progress=False)
    return p, captured["state"]


def study(p, store, info, state, label: str, samples: int, ws: Path, only: list[str]) -> dict:
    """FID of every variant on one model, trained with params `p`."""
    from msdm.diffusion_training import build_model

    model = build_model(p, info).backbone.eval()
    model.load_state_dict(state)
    rows = {}
    for v in VARIANTS:
        if only and not any(o in v[0] for o in only) and v[0] != REFERENCE:
            continue
        fid, sec, std = fid_of(p, store, info, model, v, samples, NOISE_SEEDS[0], ws)
        rows[v[0]] = {"fid": fid, "seconds": sec, "latent_std": std}
        print(f"  {label:28s} {v[0]:26s} FID {fid:9.2f}  {sec:6.1f}s  latent std {std:.3g}", flush=True)
    if only:
        return {"variants": rows}
    ref = next(v for v in VARIANTS if v[0] == REFERENCE)
    seeds = [rows[REFERENCE]["fid"]] + [fid_of(p, store, info, model, ref, samples, s, ws)[0] for s in NOISE_SEEDS[1:]]
    noise = {"seeds": list(NOISE_SEEDS), "fid": seeds, "std": statistics.stdev(seeds)}
    print(f"  {label:28s} FID noise of {REFERENCE} over 3 seeds: std {noise['std']:.2f}", flush=True)
    return {"variants": rows, "noise": noise}


def table(record_path: Path) -> str:
    r = json.loads(record_path.read_text())
    labels = list(r["models"])
    head = "| sampler | " + " | ".join(labels) + " |"
    lines = [head, "|---" * (len(labels) + 1) + "|"]
    for v in VARIANTS:
        cells = []
        for label in labels:
            row = r["models"][label]["variants"].get(v[0])
            ref = r["models"][label]["variants"][REFERENCE]["fid"]
            cells.append("" if row is None else
                         f"{row['fid']:.1f}" + ("" if v[0] == REFERENCE else f" ({row['fid'] - ref:+.1f})"))
        lines.append(f"| {v[0]} | " + " | ".join(cells) + " |")
    noise = [r["models"][label].get("noise", {}).get("std") for label in labels]
    lines.append(f"| FID noise: std of {REFERENCE} over 3 sampling seeds | "
                 + " | ".join("" if n is None else f"{n:.2f}" for n in noise) + " |")
    return "\n".join(lines)


def main() -> int:
    if sys.argv[1:2] == ["--table"]:
        print(table(Path(sys.argv[2])))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("workspace", type=Path)
    ap.add_argument("--train-steps", type=int, default=800)
    ap.add_argument("--samples", type=int, default=500)
    ap.add_argument("--targets", nargs="*", default=["x0", "eps", "v"])
    ap.add_argument("--checkpoint", default="", help="also study this trained model (relative to WORKSPACE)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--only", nargs="*", default=[], help="run only variants whose label contains one of these")
    ap.add_argument("--cache", type=Path, default=None, help="keep/reuse the trained const models here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from msdm.io import DIFFUSION_MODEL_ARTEFACT, load_artefact
    from msdm.latents import LatentStore
    from msdm.diffusion_training import latent_info

    ws = a.workspace.resolve()
    params = load_params(ws / "params.yaml")
    params = replace(params, "train", precision="fp32")  # one precision for every row
    store = LatentStore(ws / "data/latents")
    info = latent_info(store.meta)
    latents, labels = store.load("train")
    machine = describe_machine()
    record = {"machine": machine.to_dict(), "samples": a.samples, "train_steps": a.train_steps,
              "settings": {"preset": params.sweep.preset, "batch_size": params.train.batch_size,
                           "lr": params.train.lr, "ema_decay": params.train.ema_decay, "strategy": "const",
                           "precision": "fp32", "threads": a.threads},
              "models": {}}
    start = time.perf_counter()
    if a.checkpoint:
        state = load_artefact(ws / a.checkpoint, DIFFUSION_MODEL_ARTEFACT)
        label = f"{params.weighting.strategy} {params.diffusion.target} step {int(state['step'])}"
        record["models"][label] = study(params, store, info, state["ema"], label, a.samples, ws, a.only)
    for target in a.targets:
        t0 = time.perf_counter()
        cached = a.cache / f"const-{target}-{a.train_steps}.pt" if a.cache else None
        if cached is not None and cached.is_file():
            p = replace(replace(params, "diffusion", target=target), "weighting", strategy="const")
            state = torch.load(cached, weights_only=True)
        else:
            p, state = train_const(params, latents, labels, info, target, a.train_steps)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                torch.save(state, cached)
        print(f"trained const/{target} for {a.train_steps} steps in {time.perf_counter() - t0:.0f}s", flush=True)
        label = f"const {target} step {a.train_steps}"
        record["models"][label] = study(p, store, info, state, label, a.samples, ws, a.only)
    record["seconds"] = time.perf_counter() - start
    out = a.out or Path(__file__).parent / "records" / f"sampler-study-{machine.microarchitecture}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out} ({record['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
