"""Benchmark 2: the same training through Ray Train (pipeline.trainer.build_trainer(...).fit()).

Steady-state throughput is read from the loop itself, not from the fit's wall time: the run
logs a row with DVCLive (ArtefactPaths.live) every `eval_every` = chunk steps, and DVCLive
rewrites its summary metrics.json after each, so each new version of that file carries the
step the run reached and the time it was written in its mtime. A driver thread polls the file
(every 10 ms, a stat per poll) and
keeps (step, mtime) pairs; seconds per step come from those stamps exactly as for the
in-process loop. No FID runs (RunPaths(fid_ref=None)).

Fixed costs are measured separately: ray.init, then per fit the seconds from fit() to the
end of the warm-up chunk in excess of its steady-state compute ("start-up"), and from the
last step to fit() returning (final checkpoint, report, worker shutdown).
"""
from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from msdm.config import replace

from .common import (auto_precision, dtype_label, Context, Figure, bench_params, latent_info, median_timing, synthetic_latents, threads,
                     time_bare, timing_from_stamps, write_store)

BENCHMARK = "ray"


def sizes(quick: bool, params) -> dict:
    if quick:
        return {"preset": "vit-tiny", "batch": 8, "examples": 64, "warmup": 2, "steps": 4, "chunk": 2}
    # 300 steps (~20 s per layout): with 40 the 2-thread bare loop varied by 50% between runs
    return {"preset": params.model.preset, "batch": params.train.batch_size, "examples": 4096,
            "warmup": 20, "steps": 300, "chunk": 50}


class CurvePoller(threading.Thread):
    """Collects (step, write time) of each version of a run's DVCLive summary (`<live>/metrics.json`,
    rewritten after every logged row)."""

    def __init__(self, path: Path, interval: float = 0.01):
        super().__init__(daemon=True)
        self.path, self.interval = path, interval
        self.stamps: dict[int, float] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        seen = None
        while not self._halt.is_set():
            seen = self.poll_once(seen)
            self._halt.wait(self.interval)
        self.poll_once(seen)

    def poll_once(self, seen_mtime: int | None) -> int | None:
        """Record the file's version if it is new; return the mtime of the last version recorded."""
        try:
            before = os.stat(self.path)
            if before.st_mtime_ns == seen_mtime:
                return seen_mtime
            step = int(json.loads(self.path.read_text())["step"])
            after = os.stat(self.path)
        except (FileNotFoundError, ValueError, KeyError):  # not there yet, or caught mid-write
            return seen_mtime
        if (before.st_ino, before.st_mtime_ns) != (after.st_ino, after.st_mtime_ns):
            return seen_mtime  # rewritten while reading: the next poll reads the new version
        # mtime has the kernel's coarse clock resolution (a few ms): small against a chunk of steps
        self.stamps.setdefault(step, after.st_mtime_ns / 1e9)
        return after.st_mtime_ns

    def stop(self) -> list[tuple[int, float]]:
        self._halt.set()
        self.join()
        return sorted(self.stamps.items())


def fit(ctx: Context, params, store: Path, name: str, size: dict) -> dict:
    from msdm.config import update
    from pipeline.ray_train import build_trainer
    from pipeline.spec import ArtefactPaths, RunSpec

    total = size["warmup"] + size["steps"]
    live = ctx.tmp / name
    poller = CurvePoller(live / "metrics.json")
    poller.start()
    t0 = time.time()
    spec = RunSpec(params=update(params, {"train": {"steps": total}, "eval": {"every": size["chunk"]}}),
                   paths=ArtefactPaths(latents=str(store), live=str(live)).resolved(), name=name,
                   storage=str((ctx.tmp / "ray").resolve()))
    result = build_trainer(spec).fit()
    t1 = time.time()
    stamps = poller.stop()
    if result.error is not None:
        raise RuntimeError(f"Ray Train fit {name} failed: {result.error!r}")
    timing = timing_from_stamps(stamps, size["warmup"])
    first_step, first_time = stamps[0]
    _, last_time = stamps[-1]
    return {"timing": timing, "fit_seconds": t1 - t0,
            "startup_seconds": first_time - t0 - first_step * timing.seconds_per_step,
            "teardown_seconds": t1 - last_time,
            "stamped_steps": [s for s, _ in stamps]}


def run(ctx: Context) -> list[Figure]:
    from pipeline.cluster import init_ray, shutdown_ray

    size = sizes(ctx.quick, ctx.params)
    base = bench_params(ctx.params, preset=size["preset"], batch=size["batch"], precision=auto_precision(), strategy="const")
    info = latent_info(base)
    store = write_store(ctx.tmp / "latents", max(size["examples"], size["batch"]), info)
    latents, labels = synthetic_latents(max(size["examples"], size["batch"]), info)
    timing_kw = {k: size[k] for k in ("warmup", "steps", "chunk")}
    # Ray sets OMP_NUM_THREADS = floor(assigned CPUs) in each worker unless the driver's
    # environment already sets it (ray._private.utils.set_omp_num_threads_if_unset), and
    # torch's intra-op thread count follows it: so a worker's threads = cpus_per_worker.
    settings = {"driver_OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"), "preset": size["preset"],
                "batch_global": size["batch"], "latent": [info.channels, info.size, info.size], "weighting": "const",
                **timing_kw, "ray_storage": "local temp dir", "fid": "off (fid_ref=None)"}

    shutdown_ray()  # a fresh local cluster, so its start is what is timed
    t0 = time.perf_counter()
    init_ray(base.ray)
    init_seconds = time.perf_counter() - t0
    figures = [ctx.figure(BENCHMARK, "ray.init (local cluster, dashboard on 127.0.0.1)", init_seconds, "s",
                          settings={"num_cpus": base.ray.num_cpus or "all"})]
    layouts = [("1 worker x 2 CPUs", 1, 2), ("1 worker x 1 CPU", 1, 1), ("2 workers x 1 CPU", 2, 1)]
    fits = {}
    try:
        for label, workers, cpus in layouts:
            ctx.log(f"Ray Train fit, {label}")
            p = replace(base, "train", num_workers=workers, cpus_per_worker=cpus, checkpoint_every=10 ** 9)
            fits[label] = fit(ctx, p, store, f"bench-{workers}x{cpus}", size)
    finally:
        shutdown_ray()
    bare = {}
    for n_threads in (2, 1):
        ctx.log(f"bare loop, {n_threads} thread(s)")
        with threads(n_threads):
            runs = [time_bare(base, info, latents, labels, **timing_kw) for _ in range(ctx.repeats)]
        bare[n_threads] = median_timing(runs)[0]

    batch = size["batch"]
    for label, workers, cpus in layouts:
        f = fits[label]
        s = {**settings, "num_workers": workers, "cpus_per_worker": cpus, "stamped_steps": f["stamped_steps"]}
        figures += [
            ctx.figure(BENCHMARK, f"Ray Train {label}", f["timing"].images_per_second(batch), "images/s",
                       dtype=dtype_label(base.train.precision), torch_threads=cpus, settings=s,
                       spread=f["timing"].spread_images_per_second(batch),
                       note="steady state, from the curve CSV's write times"),
            ctx.figure(BENCHMARK, f"start-up {label}", f["startup_seconds"], "s", torch_threads=cpus, settings=s,
                       note="fit() call to the first stamped step, minus those steps' steady-state time"),
            ctx.figure(BENCHMARK, f"end of run {label}", f["teardown_seconds"], "s", torch_threads=cpus,
                       settings=s, note="last step to fit() returning: final checkpoint, report, shutdown"),
        ]
    one_by_two, one_by_one, two_by_one = (fits[label]["timing"].seconds_per_step for label, _, _ in layouts)
    figures += [
        ctx.figure(BENCHMARK, "bare PyTorch loop, 2 threads", batch / bare[2], "images/s", dtype=dtype_label(base.train.precision),
                   torch_threads=2, settings={**settings, "repeats": ctx.repeats}),
        ctx.figure(BENCHMARK, "bare PyTorch loop, 1 thread", batch / bare[1], "images/s", dtype=dtype_label(base.train.precision),
                   torch_threads=1, settings={**settings, "repeats": ctx.repeats}),
        ctx.figure(BENCHMARK, "Ray overhead, 1 worker x 2 CPUs vs bare 2 threads",
                   100.0 * (one_by_two / bare[2] - 1.0), "%", dtype=dtype_label(base.train.precision), torch_threads=2,
                   settings=settings, note="includes our loop's own overhead (see training)"),
        ctx.figure(BENCHMARK, "Ray overhead, 1 worker x 1 CPU vs bare 1 thread",
                   100.0 * (one_by_one / bare[1] - 1.0), "%", dtype=dtype_label(base.train.precision), torch_threads=1,
                   settings=settings),
        ctx.figure(BENCHMARK, "scaling efficiency, 2 workers x 1 CPU", one_by_one / (2.0 * two_by_one), "fraction",
                   dtype=dtype_label(base.train.precision), torch_threads=1, settings=settings,
                   note="throughput(2 x 1) / (2 x throughput(1 x 1)); DDP over gloo"),
        ctx.figure(BENCHMARK, "2 workers x 1 CPU vs 1 worker x 2 CPUs", one_by_two / two_by_one, "ratio",
                   dtype=dtype_label(base.train.precision), settings=settings,
                   note="same cores: > 1 means data parallel beats intra-op threads"),
    ]
    return figures
