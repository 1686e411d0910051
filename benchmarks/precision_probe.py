"""Does bf16 pay on this CPU? One training step in fp32 and in bf16 autocast, one thread.

    .venv/bin/python benchmarks/precision_probe.py                 # measure, write a record
    .venv/bin/python benchmarks/precision_probe.py --table         # the per-machine table of all records

The two steps are the ones that dominate the default pipeline's time: the stage-1
autoencoder at batch 32 (as msdm.autoencoder_training runs it) and the vit-tiny/2 diffusion step at
batch 64 on 12x8x8 latents (the bare step of benchmarks/cpubench). One thread, so machines
with different core counts compare. fp32 and bf16 run interleaved (A B, B A, A B) and the
median over repeats is kept. The record names the CPU's ISA flags and what
`precision: auto` (msdm.precision) chooses there, so the table says whether the choice is
right on each machine: bf16 should be chosen exactly where it is faster.

Records: benchmarks/records/precision-probe-<microarchitecture>-<flags>.json, one per machine kind.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

from cpubench.common import (BareTrainer, EpochBatches, bench_params, interleaved, latent_info,  # noqa: E402
                             synthetic_latents, time_steps)
from cpubench.machine import describe_machine  # noqa: E402
from cpubench.precision import autoencoder_step  # noqa: E402
from pipeline.config import load_params  # noqa: E402
from msdm.data import image_channels  # noqa: E402

RECORDS = REPO / "benchmarks" / "records"
AE_BATCH, VIT_BATCH = 32, 64
TIMING = {"warmup": 3, "steps": 12, "chunk": 4}


def ae_step(params, precision: str):
    channels, size = image_channels(params.data), params.data.image_size
    images = torch.randint(0, 256, (512, channels, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    return autoencoder_step(params, images, AE_BATCH, memory_format=torch.channels_last, precision=precision)


def vit_step(params, precision: str):
    p = bench_params(params, preset="vit-tiny", batch=VIT_BATCH, precision=precision, strategy="const")
    info = latent_info(p)
    latents, labels = synthetic_latents(1024, info)
    trainer, batches = BareTrainer(p, info), EpochBatches(latents, labels, VIT_BATCH)
    return lambda: trainer.step(*batches())


def measure(repeats: int) -> dict:
    params = load_params(REPO / "params.yaml")
    torch.set_num_threads(1)
    machine = describe_machine()
    steps = {"autoencoder": ae_step, "vit-tiny/2": vit_step}
    rows = {}
    for name, build in steps.items():
        def timed(precision: str, build=build) -> float:
            return time_steps(build(params, precision), **TIMING).seconds_per_step

        print(f"{name}: fp32 and bf16, {repeats} interleaved repeats ...", flush=True)
        runs = interleaved({"fp32": lambda: timed("fp32"), "bf16": lambda: timed("bf16")}, repeats)
        fp32, bf16 = statistics.median(runs["fp32"]), statistics.median(runs["bf16"])
        rows[name] = {"batch": AE_BATCH if name == "autoencoder" else VIT_BATCH,
                      "fp32_s_per_step": fp32, "bf16_s_per_step": bf16, "bf16_over_fp32_time": bf16 / fp32,
                      "fp32_runs": runs["fp32"], "bf16_runs": runs["bf16"]}
        print(f"  fp32 {fp32:.3f} s/step, bf16 {bf16:.3f} s/step: bf16 takes {bf16 / fp32:.2f}x the time")
    faster = all(r["bf16_over_fp32_time"] < 1 for r in rows.values())
    return {"probe": "precision", "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "benchmarks/precision_probe.py", "threads": 1, "timing": TIMING, "repeats": repeats,
            "machine": machine.to_dict(), "steps": rows,
            "auto_choice": machine.precision_auto, "auto_reason": machine.precision_auto_reason,
            "bf16_faster_on_both": faster,
            "auto_choice_is_the_faster": (machine.precision_auto == "bf16") == faster}


def record_path(record: dict) -> Path:
    m = record["machine"]
    flags = "+".join(f for f in ("avx512_bf16", "amx_bf16") if m["flags"].get(f)) or "no-bf16-isa"
    return RECORDS / f"precision-probe-{m['microarchitecture']}-{flags}.json"


def table() -> str:
    lines = ["| machine | ISA flags | auto picks | autoencoder b32 fp32 / bf16 s | vit-tiny b64 fp32 / bf16 s "
             "| auto is the faster | record |",
             "|---|---|---|---|---|---|---|"]
    for path in sorted(RECORDS.glob("precision-probe-*.json")):
        r = json.loads(path.read_text())
        m = r["machine"]
        flags = ", ".join(f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if m["flags"].get(f))
        ae, vit = r["steps"]["autoencoder"], r["steps"]["vit-tiny/2"]
        lines.append(f"| {m['model_name']} ({m['microarchitecture']}), {r['when']} | {flags} | {r['auto_choice']} "
                     f"| {ae['fp32_s_per_step']:.3f} / {ae['bf16_s_per_step']:.3f} "
                     f"| {vit['fp32_s_per_step']:.3f} / {vit['bf16_s_per_step']:.3f} "
                     f"| {'yes' if r['auto_choice_is_the_faster'] else '**no**'} | `{path.relative_to(REPO)}` |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true", help="print the table of all records and exit")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.table:
        print(table())
        return 0
    record = measure(args.repeats)
    out = record_path(record)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"auto picks {record['auto_choice']} ({record['auto_reason']}); "
          f"the faster on both steps: {'bf16' if record['bf16_faster_on_both'] else 'fp32'} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
