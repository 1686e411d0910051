"""Ray Tune sweep over weighting strategies x prediction targets x seeds, one training recipe.

Each trial is a Tune driver function that runs the per-worker loop of the `train` stage
directly (single-worker trials), with only `weighting.strategy`, `diffusion.target` and the
seed changed. The
sweep resumes with `Tuner.restore` after an interruption; every trial resumes from its
last reported checkpoint.
"""
from __future__ import annotations

import csv
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from msdm.errors import PipelineError
from msdm.config import Params, params_from_dict, replace, to_dict
from msdm.io import atomic_path

from .runs import run_name, storage_for
from .trainer import RunOverrides, RunPaths, run_worker


class SweepFailedError(PipelineError):
    pass


def trial_params(params: Params, strategy: str, target: str) -> Params:
    """The train recipe with the sweep's strategy and target; the sweep's preset and budget apply."""
    p = replace(params, "weighting", strategy=strategy)
    p = replace(p, "diffusion", target=target)
    p = replace(p, "model", preset=params.sweep.preset)
    # report (and checkpoint) at every evaluation so an interrupted trial loses no eval
    return replace(p, "train", checkpoint_every=params.sweep.eval_every, num_workers=1, use_gpu=False)


def trial_overrides(params: Params, seed: int) -> RunOverrides:
    s = params.sweep
    return RunOverrides(steps=s.steps, eval_every=s.eval_every, preset=s.preset, seed=seed,
                        num_samples=s.num_samples)


def trial_dir(out_dir: Path, strategy: str, target: str, seed: int) -> Path:
    return out_dir / "trials" / f"{strategy}-{target}-seed{seed}"


class TuneHooks:
    """TrainHooks for a single-process Tune trial."""

    rank = 0
    world_size = 1

    def __init__(self):
        import torch

        self.device = torch.device("cpu")
        self._tmp = tempfile.TemporaryDirectory(prefix="msdm-trial-")

    def wrap_model(self, model):
        return model

    def resume_checkpoint(self):
        from ray import tune

        ckpt = tune.get_checkpoint()
        return Path(ckpt.to_directory(self._tmp.name)) if ckpt is not None else None

    def report(self, metrics, checkpoint_dir):
        from ray import tune

        checkpoint = tune.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        tune.report(metrics, checkpoint=checkpoint)

    def barrier(self):
        pass


def _trial(config: dict) -> None:
    """Tune driver function: one (strategy, seed) training run."""
    import os

    import torch

    if config["strategy"] in os.environ.get("MSDM_INJECT_TRIAL_ERROR", "").split(","):
        raise RuntimeError(f"injected failure in trial {config['strategy']} (MSDM_INJECT_TRIAL_ERROR)")
    from .cluster import assigned_cpu_threads

    torch.set_num_threads(assigned_cpu_threads())
    base = params_from_dict(config["params"])
    params = trial_params(base, config["strategy"], config["target"])
    out = trial_dir(Path(config["out_dir"]), config["strategy"], config["target"], config["seed"])
    paths = RunPaths(**{**config["paths"], "curve": str(out / "curve.csv")})
    run_worker(params, paths, trial_overrides(base, config["seed"]), TuneHooks(), progress=False)


def _max_concurrent(params: Params) -> int:
    import ray

    cpus = int(ray.available_resources().get("CPU", 1))
    return max(1, cpus // params.sweep.cpus_per_trial)


@dataclass
class SweepOutputs:
    curves: Path
    trials: Path


def run_sweep(params: Params, paths: RunPaths, out_dir: Path, latents_dir: Path) -> SweepOutputs:
    from ray import tune

    out_dir = out_dir.resolve()
    s = params.sweep
    name = run_name("sweep", replace(params, "weighting", strategy="const"), latents_dir,
                    RunOverrides(extra={"sweep": to_dict(params)["sweep"]}))
    storage = storage_for(params, "sweep")
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    trainable = tune.with_resources(_trial, {"cpu": s.cpus_per_trial})
    space = {"strategy": tune.grid_search(list(s.strategies)), "target": tune.grid_search(list(s.targets)),
             "seed": tune.grid_search(list(s.seeds)),
             "params": to_dict(params), "paths": paths.resolved().__dict__, "out_dir": str(out_dir)}
    experiment = f"{storage}/{name}"
    start = time.perf_counter()
    if tune.Tuner.can_restore(experiment):
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_errored=True, param_space=space)
    else:
        tuner = tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(max_concurrent_trials=_max_concurrent(params)),
            run_config=tune.RunConfig(name=name, storage_path=storage, verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=params.train.max_failures)),
        )
    grid = tuner.fit()
    print(f"sweep: {len(s.strategies) * len(s.targets) * len(s.seeds)} trials in {time.perf_counter() - start:.0f}s")
    if grid.errors:
        first = grid.errors[0]
        raise SweepFailedError(f"{len(grid.errors)} sweep trial(s) failed; first error: "
                               f"{type(first).__name__}: {first}") from first
    return collect(grid, out_dir)


def collect(grid, out_dir: Path) -> SweepOutputs:
    """Merge every trial's curve into curves.csv and summarise trials into trials.csv."""
    frames, rows = [], []
    for result in grid:
        cfg = result.config
        strategy, target, seed = cfg["strategy"], cfg["target"], cfg["seed"]
        curve_path = trial_dir(out_dir, strategy, target, seed) / "curve.csv"
        curve = pd.read_csv(curve_path)
        curve.insert(0, "seed", seed)
        curve.insert(0, "target", target)
        curve.insert(0, "strategy", strategy)
        frames.append(curve)
        last = curve.iloc[-1]
        reported = result.metrics or {}
        rows.append({"strategy": strategy, "target": target, "seed": seed, "status": "ok",
                     "final_fid": float(last["fid"]), "metric": str(last.get("metric", "fid")),
                     "steps": int(last["step"]),
                     "seconds": round(float(reported.get("time_total_s", float("nan"))), 1),
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

