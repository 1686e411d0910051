"""What one Ray Train run costs before it trains: the processes it starts, and their CPU time.

    .venv/bin/python benchmarks/ray_processes.py [--fits 3]

On the pipeline's local cluster (pipeline.cluster.init_ray), fits `--fits` single-worker
TorchTrainers whose train function does nothing but look around: it waits 2 s, so every
helper actor of the run has started, then reads the CPU time (user + system, /proc/PID/stat)
of every `ray::` process of this machine. A run's fixed cost is then:
  - seconds from `fit()` to the train function's first line, and from its return to `fit()`'s;
  - CPU seconds of the processes each run starts (pids not alive in the fit before), by kind:
    TrainController, RayTrainWorker, and the helper actors Ray Train starts for every run.
Every sweep trial and every `train` stage pays this; so does each Ray test of the suite.
Record: benchmarks/records/ray-processes-<microarchitecture>-<N>cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))

from cpubench.machine import describe_machine  # noqa: E402


def ray_process_cpu() -> dict[str, dict[str, float]]:
    """CPU seconds of each live `ray::<Name>` process: {Name: {pid: seconds}}."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: dict[str, dict[str, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if cmd.startswith("ray::"):
            kind = cmd[len("ray::"):].split(".")[0].strip()
            out.setdefault(kind, {})[entry.name] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def look_around(config: dict) -> None:
    """The train function: wait for the run's helpers, then record when it started and the CPU table."""
    started = time.time()
    time.sleep(2.0)
    Path(config["out"]).write_text(json.dumps({"started": started, "cpu": ray_process_cpu(),
                                               "ended": time.time()}))


def one_fit(storage: Path, index: int) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    out = storage / f"fit{index}.json"
    trainer = TorchTrainer(look_around, train_loop_config={"out": str(out)},
                           scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                           run_config=ray.train.RunConfig(name=f"fit{index}", storage_path=str(storage)))
    begin = time.time()
    trainer.fit()
    end = time.time()
    seen = json.loads(out.read_text())
    return {"to_first_line_s": round(seen["started"] - begin, 2), "after_return_s": round(end - seen["ended"], 2),
            "cpu_s_by_pid": seen["cpu"]}


def split_new(fits: list[dict]) -> None:
    """Per fit: the CPU seconds of the processes it started (pids absent from the fit before), by
    kind, and the names of the kinds that outlive a run (started once per cluster)."""
    before: set[str] = set()
    for fit in fits:
        pids = {pid for by_pid in fit["cpu_s_by_pid"].values() for pid in by_pid}
        fit["new_processes_cpu_s"] = {k: round(sum(v for pid, v in by_pid.items() if pid not in before), 2)
                                      for k, by_pid in sorted(fit["cpu_s_by_pid"].items())
                                      if set(by_pid) - before}
        fit["long_lived"] = sorted(k for k, by_pid in fit["cpu_s_by_pid"].items() if not set(by_pid) - before)
        before = pids


def main(argv: list[str] | None = None) -> int:
    import tempfile

    from pipeline.cluster import init_ray, shutdown_ray
    from pipeline.config import RayConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fits", type=int, default=3)
    ap.add_argument("--records", type=Path, default=REPO / "benchmarks" / "records")
    args = ap.parse_args(argv)
    machine = describe_machine()
    print(f"machine: {machine.short()}")
    begin = time.time()
    init_ray(RayConfig())
    init_s = time.time() - begin
    with tempfile.TemporaryDirectory(prefix="msdm-ray-processes-") as tmp:
        fits = [one_fit(Path(tmp), i) for i in range(args.fits)]
    shutdown_ray()
    # the first fit also starts cluster-wide helpers: the later fits are what each further run costs
    split_new(fits)
    later = fits[1:] or fits
    per_kind = {k: statistics.median(f["new_processes_cpu_s"].get(k, 0.0) for f in later)
                for k in sorted({k for f in later for k in f["new_processes_cpu_s"]})}
    record = {"probe": "ray-processes", "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": "benchmarks/ray_processes.py", "machine": machine.to_dict(),
              "ray_init_s": round(init_s, 2), "fits": fits,
              "median_after_first": {"to_first_line_s": statistics.median(f["to_first_line_s"] for f in later),
                                     "after_return_s": statistics.median(f["after_return_s"] for f in later),
                                     "new_processes_cpu_s": per_kind,
                                     "new_processes_cpu_s_total": round(sum(per_kind.values()), 2)}}
    args.records.mkdir(parents=True, exist_ok=True)
    m = record["machine"]
    path = args.records / f"ray-processes-{m['microarchitecture']}-{m.get('logical_cpus', os.cpu_count())}cpu.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    m = record["median_after_first"]
    print(f"ray.init {init_s:.1f} s; per fit (median of fits 2..{args.fits}): {m['to_first_line_s']:.1f} s from fit() "
          f"to the train function, {m['after_return_s']:.1f} s after it returns")
    print("processes each run starts, with their CPU time up to the train function's first line + 2 s:")
    for kind, cpu in sorted(per_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<34} {cpu:5.2f} CPU-s")
    print(f"  {'total':<34} {sum(per_kind.values()):5.2f} CPU-s")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
