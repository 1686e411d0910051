"""Ray Tune sweep over weighting strategies x prediction targets x seeds: every trial is a `train` run.

Ray's Train-in-Tune pattern: each trial is a Tune function trainable that derives its
`RunSpec` from the train stage's (`trial_spec`) and fits the same `TorchTrainer` the train
stage fits, with the sweep's workers, CPUs and GPUs per trial. Rank 0's reports reach Tune
through `TuneReportCallback`. The sweep resumes with `Tuner.restore` after an interruption;
an unfinished trial's Train run resumes from its own last checkpoint (same name, same
storage), and a finished trial is not run again.
"""
from __future__ import annotations

import csv
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from ray.tune.search.basic_variant import BasicVariantGenerator

from msdm.config import to_dict
from msdm.io import atomic_path, atomic_write_json

from .errors import PipelineError
from .live import read_curve
from .tracking import check_tracking, sweep_callbacks
from .spec import RunSpec, run_digest, trial_name, trial_params, trial_resources, trial_spec


TRIAL_DRIVER_MEMORY = 256 * 1024 ** 2  # bytes: a Tune trial's process, which builds and waits on its trainer


class SweepFailedError(PipelineError):
    pass


def trial_dir(out_dir: Path, strategy: str, target: str, seed: int) -> Path:
    return out_dir / "trials" / trial_name(strategy, target, seed)


def sweep_name(spec: RunSpec) -> str:
    """The Tune experiment's name: a hash of what defines its trials (the grid included).

    Hashed from a trial's params, so train fields that every trial overrides (train.steps,
    train.seed, ...) do not rename the experiment: it is restored, not restarted.
    """
    params = trial_params(spec.params, "const", spec.params.sweep.targets[0], 0)
    return f"sweep-{run_digest(params, Path(spec.paths.latents), extra={'sweep': to_dict(params)['sweep']})}"


def one_trial(spec: RunSpec, out_dir: Path, runs: str, strategy: str, target: str, seed: int) -> RunSpec:
    live = trial_dir(out_dir, strategy, target, seed) / "live"
    return trial_spec(spec, strategy, target, seed, live=str(live), storage=runs)


def trial_specs(spec: RunSpec, out_dir: Path, runs: str) -> list[RunSpec]:
    """Every trial's spec, validated on the driver before Tune starts anything."""
    s = spec.params.sweep
    return [one_trial(spec, out_dir, runs, strategy, target, seed)
            for strategy in s.strategies for target in s.targets for seed in s.seeds]


FINISHED_FILE = "finished.json"  # in a trial's folder: the Train run that completed there, and its last metrics


def run_identity(spec: RunSpec) -> str:
    """A hash of everything that defines a trial's run (params, paths, resources)."""
    return hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True, default=str).encode()).hexdigest()


def read_finished(path: Path) -> dict:
    """A trial's completion record ({} when there is none, or it cannot be read)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def finished_earlier(path: Path, spec: RunSpec) -> dict | None:
    """The last metrics of this trial's run if it completed before (the record carries the
    run's identity: a changed trial does not match), else None."""
    record = read_finished(path)
    if record.get("run") != run_identity(spec) or not isinstance(record.get("metrics"), dict):
        return None
    return {**record["metrics"], "seconds": record.get("seconds")}


def run_seconds(record: dict, fallback: float) -> float:
    """The run's wall time from its completion record, else `fallback` (Tune's time)."""
    try:
        return round(float(record["seconds"]), 1)
    except (KeyError, TypeError, ValueError):
        return round(float(fallback), 1)


def _trial(config: dict, worker_hooks=None) -> dict | None:
    """Tune function trainable: build and fit this trial's TorchTrainer.

    A trial whose run completed before (the sweep was killed before Tune recorded it as done)
    is not trained again: its curve is in its folder, and its last metrics go to Tune as the
    trial's result.
    """
    from ray.tune.integration.ray_train import TuneReportCallback

    from .ray_train import fit

    spec = one_trial(RunSpec.from_dict(config["spec"]), Path(config["out_dir"]), config["runs"], config["strategy"],
                     config["target"], config["seed"])
    record = trial_dir(Path(config["out_dir"]), config["strategy"], config["target"], config["seed"]) / FINISHED_FILE
    earlier = finished_earlier(record, spec)
    if earlier is not None:
        print(f"sweep: {spec.name} completed before the interruption; kept, not trained again")
        return {**earlier, "finished_earlier": True}
    start = time.perf_counter()
    # W&B, when on, logs the trial from Tune (sweep_callbacks), not from its workers
    summary = fit(spec, progress=False, callbacks=[TuneReportCallback()], worker_hooks=worker_hooks,
                  log_to_wandb=False)
    atomic_write_json({"run": run_identity(spec), "name": spec.name, "metrics": summary.metrics,
                       "seconds": round(time.perf_counter() - start, 1),
                       "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, record)
    return None


def trials_that_fit(per_trial: dict[str, float]) -> int:
    """How many trials the cluster's resources hold at once (at least 1)."""
    import ray

    total = ray.cluster_resources()
    return max(1, min(int(total.get(k, 0) // v) for k, v in per_trial.items() if v > 0))


class ResourceBoundTrials(BasicVariantGenerator):
    """Tune's grid generator, starting a trial only while the cluster has room for one more.

    A trial's driver holds no resources (its Train workers do), so Tune alone would start
    every trial at once and leave most of them waiting, each with its processes. The limit
    is read from the cluster before each new trial, so a cluster that grows runs more.
    """

    def __init__(self, per_trial: dict[str, float]):
        super().__init__()
        self.per_trial = dict(per_trial)

    @property
    def max_concurrent(self) -> int:
        return trials_that_fit(self.per_trial)

    @max_concurrent.setter
    def max_concurrent(self, value: int) -> None:  # BasicVariantGenerator's constructor sets it
        pass


def progress_table(total: int, extractor: str):
    """A line per trial that starts, ends or fails, a status line a minute, and Tune's table
    (strategy, target, seed, last step and FID per trial) at the end."""
    from msdm.metrics import metric_name

    from .sweep_progress import SweepProgress

    return SweepProgress(total, metric_name(extractor))


@dataclass
class SweepOutputs:
    curves: Path
    trials: Path


def run_sweep(spec: RunSpec, out_dir: Path, *, worker_hooks=None) -> SweepOutputs:
    """Run (or resume) every trial; `worker_hooks` reaches each trial's workers (see `build_trainer`)."""
    from ray import tune

    check_tracking(spec.params)  # a missing wandb fails here, before Tune starts
    out_dir = out_dir.resolve()
    s = spec.params.sweep
    name = sweep_name(spec)
    runs = f"{spec.storage}/{name}-runs"
    trials = trial_specs(spec, out_dir, runs)
    # The Train workers hold the trial's CPUs and GPUs; its driver only waits on them, but Tune
    # needs every trial to hold something, and memory is what the driver does use.
    trainable = tune.with_resources(tune.with_parameters(_trial, worker_hooks=worker_hooks),
                                    {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY})
    space = {"strategy": tune.grid_search(list(s.strategies)), "target": tune.grid_search(list(s.targets)),
             "seed": tune.grid_search(list(s.seeds)), "spec": spec.to_dict(), "out_dir": str(out_dir),
             "runs": runs}
    experiment = f"{spec.storage}/{name}"
    start = time.perf_counter()
    if tune.Tuner.can_restore(experiment):
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True, param_space=space)
    else:
        tuner = tune.Tuner(
            trainable, param_space=space,
            # reuse_actors: the next trial runs in a finished trial's process instead of a new one
            tune_config=tune.TuneConfig(search_alg=ResourceBoundTrials(trial_resources(spec.params).per_run()),
                                        reuse_actors=True),
            # Ray Train restarts failed workers (train.max_failures); a trial that still fails is final
            run_config=tune.RunConfig(name=name, storage_path=spec.storage, verbose=1,
                                      progress_reporter=progress_table(len(trials), spec.params.fid.extractor),
                                      callbacks=sweep_callbacks(spec.params, group=name),
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
    grid = tuner.fit()
    print(f"sweep: {len(trials)} trials in {time.perf_counter() - start:.0f}s")
    if grid.errors:
        first = grid.errors[0]
        raise SweepFailedError(f"{len(grid.errors)} sweep trial(s) failed; first error: "
                               f"{type(first).__name__}: {first}") from first
    return collect(grid, out_dir)


def collect(grid, out_dir: Path) -> SweepOutputs:
    """Merge every trial's curve into curves.csv and summarise trials into trials.csv.

    `grid` is Tune's ResultGrid: its results, and its `experiment_path` for the error below."""
    frames, rows = [], []
    folders = [trial_dir(out_dir, r.config["strategy"], r.config["target"], r.config["seed"]) for r in grid]
    logged = [read_curve(folder / "live") for folder in folders]
    missing = [folder for folder, curve in zip(folders, logged) if not curve]
    if missing:
        # Tune's record says these trials finished, so a restore does not run them again; their
        # folders were deleted (by hand: DVC keeps persistent outputs). Nothing is written.
        raise SweepFailedError(
            f"sweep: {len(missing)} trial(s) finished in Ray Tune's record but have no curve: "
            f"{', '.join(str(m) for m in missing[:3])}{' ...' if len(missing) > 3 else ''}. Delete the Tune "
            f"experiment {grid.experiment_path} and rerun the sweep: the trials whose "
            f"folders hold {FINISHED_FILE} are kept, the others train again")
    for result, curve_rows in zip(grid, logged):
        cfg = result.config
        strategy, target, seed = cfg["strategy"], cfg["target"], cfg["seed"]
        curve = pd.DataFrame(curve_rows)
        curve.insert(0, "seed", seed)
        curve.insert(0, "target", target)
        curve.insert(0, "strategy", strategy)
        frames.append(curve)
        last = curve.iloc[-1]
        reported = result.metrics or {}
        record = read_finished(trial_dir(out_dir, strategy, target, seed) / FINISHED_FILE)
        rows.append({"strategy": strategy, "target": target, "seed": seed, "status": "ok",
                     "final_fid": float(last.get("fid", float("nan"))), "metric": str(last.get("metric", "fid")),
                     "steps": int(last["step"]),
                     # the run's wall time, from its completion record (also for a trial kept
                     # from before an interruption)
                     "seconds": run_seconds(record, reported.get("time_total_s", float("nan"))),
                     "finished_at": str(record.get("finished_at", "")),  # UTC; the report's sweep time
                     "world_size": int(reported.get("world_size", 0)),
                     # where the last attempt picked the run up (0: it ran straight through)
                     "resumed_from_step": int(reported.get("resumed_from_step", 0)),
                     "torch_threads": int(reported.get("torch_threads", 0)),
                     "precision": reported.get("precision", ""), "error": ""})
    curves = pd.concat(frames, ignore_index=True).sort_values(["target", "strategy", "seed", "step"])
    outputs = SweepOutputs(curves=out_dir / "curves.csv", trials=out_dir / "trials.csv")
    with atomic_path(outputs.curves) as tmp:
        curves.to_csv(tmp, index=False)
    with atomic_path(outputs.trials) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(sorted(rows, key=lambda r: (r["target"], r["strategy"], r["seed"])))
    return outputs
