"""CPU benchmarks of the project's own code; prints a table and writes results/bench/cpu.json.

    python benchmarks/run_all.py [--quick] [--only NAME[,NAME]] [--out PATH] [--threads N]
                                 [--repeats R] [--params params.yaml]

Benchmarks (names for --only):
  training   our train_loop vs a bare PyTorch loop (vit-tiny/vit-small, batch 64/128): overhead
  ray        Ray Train fit (1 worker x 2 CPUs, 1 x 1, 2 x 1) vs the bare loop; start-up seconds
  encode     pre-encoded latents vs encoding each image batch with the stage-1 encoder
  precision  bf16 autocast vs fp32, torch.compile on/off, fused AdamW, autoencoder channels_last
  sampling   DDIM sampling + decode through msdm.evaluation.SampleGenerator (images/s)
  fid        FeatureNet FID time for 1000 and 5000 samples (msdm.metrics.compute_fid)
  flops      FLOPs of a training step / step time, vs theoretical and measured-matmul peaks
  dvc        `dvc repro` with nothing changed

Every figure carries the machine, torch threads, dtype and settings (see docs/performance.md).
--quick runs every benchmark at tiny sizes (a smoke test, seconds each; Ray takes ~1 min) and
writes results/bench/cpu-quick.json unless --out is given, so it never replaces real numbers.
With --only, sections of an earlier run on the same machine are kept in the output file.
"""
from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # msdm, pipeline (also installed editable; this keeps a bare checkout working)
sys.path.insert(0, str(Path(__file__).resolve().parent))  # cpubench, gpu_check

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

import torch  # noqa: E402

from cpubench import report  # noqa: E402
from cpubench.common import Context  # noqa: E402
from cpubench.machine import describe_machine, load_average  # noqa: E402
from msdm.config import ConfigError  # noqa: E402
from pipeline.config import load_params  # noqa: E402

# name -> (module under cpubench, function); imported only when run (Ray is slow to import)
BENCHMARKS = {
    "training": ("training", "run"),
    "ray": ("ray_train", "run"),
    "encode": ("latents_vs_encode", "run"),
    "precision": ("precision", "run"),
    "sampling": ("sampling", "run_sampling"),
    "fid": ("sampling", "run_fid"),
    "flops": ("flops", "run"),
    "dvc": ("dvc_repro", "run"),
}


def benchmark_function(name: str):
    import importlib

    module, function = BENCHMARKS[name]
    return getattr(importlib.import_module(f"cpubench.{module}"), function)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a measurement")
    ap.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    ap.add_argument("--out", default=None,
                    help="JSON output (default results/bench/cpu.json, or cpu-quick.json with --quick)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="interleaved repeats per comparison (default 3, or 1 with --quick)")
    ap.add_argument("--params", default=None, help="the config every benchmark starts from (default: the "
                                                    "repository's params.yaml)")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        ap.error(f"--only: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    if args.threads < 0 or (args.repeats is not None and args.repeats < 1):
        ap.error("--threads must be >= 0 and --repeats >= 1")
    args.names = names
    return args


def _finite(obj):
    """JSON has no NaN/inf: non-finite floats become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    default_out = REPO / "results" / "bench" / ("cpu-quick.json" if args.quick else "cpu.json")
    out = Path(args.out).resolve() if args.out else default_out
    params_path = Path(args.params).resolve() if args.params else REPO / "params.yaml"
    os.chdir(REPO)  # params.yaml's relative paths (data/, models/, results/) are repo-relative
    try:
        params = load_params(params_path)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = describe_machine()
    sections: dict[str, dict] = {}
    tmp = Path(tempfile.mkdtemp(prefix="msdm-bench-"))
    try:
        ctx = Context(params=params, machine=machine, quick=args.quick,
                      repeats=args.repeats or (1 if args.quick else 3), tmp=tmp, repo=REPO)
        for name in args.names:
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            load_before, start = load_average(), time.perf_counter()
            section = {"measured_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                       "load_average_before": load_before, "quick": args.quick, "repeats": ctx.repeats,
                       "torch_threads": torch.get_num_threads(), "figures": [], "error": None}
            try:
                section["figures"] = [f.to_dict() for f in benchmark_function(name)(ctx)]
            except Exception as e:  # noqa: BLE001 - one failing benchmark must not hide the others
                section["error"] = f"{type(e).__name__}: {e}"
                section["traceback"] = traceback.format_exc(limit=8)
                print(section["traceback"], file=sys.stderr)
            section["seconds"] = time.perf_counter() - start
            section["load_average_after"] = load_average()
            sections[name] = section
            print(f"[bench] {name} done in {section['seconds']:.1f}s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = _finite({"schema": report.SCHEMA, "quick": args.quick, "command": [sys.executable, *sys.argv],
                      "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                      "machine": machine.to_dict(), "params": str(params_path), "benchmarks": sections})
    report.merge_and_write(out, result)
    print(f"machine: {machine.short()}")
    print(report.table(sections))
    print(f"\nwrote {out}")
    return 1 if any(s["error"] for s in sections.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
