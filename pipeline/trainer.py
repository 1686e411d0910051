"""Ray Train (V2) around the framework-free loop in `msdm.train`.

`build_trainer` turns params into a `TorchTrainer` whose `RunConfig(storage_path, name)`
is stable, so re-running the same stage resumes from the latest reported checkpoint.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from msdm.config import Params, params_from_dict, to_dict
from msdm.tracking import DEFAULT_DIR as DEFAULT_TRACKING_DIR
from msdm.tracking import TrackedHooks, Tracker, build_tracker, check_tracking, tracked_evaluate
from msdm.train import TrainHooks, TrainResult


@dataclass
class RunPaths:
    """Absolute paths a training run reads and writes (Ray workers may run elsewhere)."""

    latents: str
    curve: str | None = None
    autoencoder: str | None = None
    featurenet: str | None = None
    fid_ref: str | None = None

    def resolved(self) -> "RunPaths":
        return RunPaths(**{k: str(Path(v).resolve()) if v else v for k, v in self.__dict__.items()})


@dataclass
class RunOverrides:
    """What a sweep trial changes relative to the `train` stage; None keeps params."""

    steps: int | None = None
    eval_every: int | None = None
    preset: str | None = None
    seed: int | None = None
    num_samples: int | None = None
    extra: dict = field(default_factory=dict)


class RayTrainHooks(TrainHooks):
    def __init__(self):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self._tmp = tempfile.TemporaryDirectory(prefix="msdm-resume-")

    def wrap_model(self, model):
        import ray.train.torch

        if self.world_size == 1:
            return model
        return ray.train.torch.prepare_model(model, move_to_device=False)

    def resume_checkpoint(self):
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        return Path(ckpt.to_directory(self._tmp.name))

    def report(self, metrics, checkpoint_dir):
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)


def run_worker(params: Params, paths: RunPaths, overrides: RunOverrides, hooks: TrainHooks,
               progress: bool = True, tracker: Tracker | None = None) -> TrainResult:
    """Load the latents and evaluator, then run the loop. Shared by Ray, Tune and local runs.

    `tracker` (msdm.tracking, rank 0): logs each checkpoint report and each evaluation.
    """
    from msdm.evaluation import build_evaluator
    from msdm.latents import LatentStore
    from msdm.train import latent_info, train_loop

    store = LatentStore(paths.latents)
    latents, labels = store.load("train", normalized=True)
    info = latent_info(store.meta)
    evaluate = None
    if hooks.rank == 0 and paths.fid_ref:
        evaluate = build_evaluator(params, store, paths, num_samples=overrides.num_samples,
                                   device=hooks.device, info=info)
    if tracker is not None and tracker.enabled:
        hooks = TrackedHooks(hooks, tracker)
        evaluate = tracked_evaluate(evaluate, tracker) if evaluate is not None else None
    return train_loop(params, latents, labels, info, hooks=hooks, evaluate=evaluate,
                      curve_path=Path(paths.curve) if paths.curve else None, steps=overrides.steps,
                      eval_every=overrides.eval_every, preset=overrides.preset, seed=overrides.seed,
                      progress=progress)


def _train_fn(config: dict) -> None:
    """Ray Train's per-worker entry point."""
    from .cluster import assigned_cpu_threads

    torch.set_num_threads(assigned_cpu_threads())  # train.cpus_per_worker, as Ray assigned them
    params = params_from_dict(config["params"])
    hooks = RayTrainHooks()
    tracking = config.get("tracking", {})
    tracker = build_tracker(params, rank=hooks.rank, run_name=tracking.get("run_name", ""),
                            config={**config["params"], "world_size": hooks.world_size},
                            directory=tracking.get("dir", DEFAULT_TRACKING_DIR))
    failed = True
    try:
        run_worker(params, RunPaths(**config["paths"]), RunOverrides(**config["overrides"]), hooks, tracker=tracker)
        failed = False
    finally:
        tracker.finish(failed=failed)


def build_trainer(params: Params, paths: RunPaths, *, name: str, overrides: RunOverrides | None = None,
                  storage_path: str | None = None):
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    check_tracking(params)  # a missing wandb fails here, before any worker starts
    tc = params.train
    storage = storage_path or params.ray.storage_path
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    overrides = overrides or RunOverrides()
    return TorchTrainer(
        _train_fn,
        train_loop_config={"params": to_dict(params), "paths": paths.resolved().__dict__,
                           "overrides": overrides.__dict__,
                           # absolute: Ray workers do not run in the repository directory
                           "tracking": {"run_name": name, "dir": str(DEFAULT_TRACKING_DIR.resolve())}},
        scaling_config=ray.train.ScalingConfig(
            num_workers=tc.num_workers, use_gpu=tc.use_gpu,
            resources_per_worker={"CPU": tc.cpus_per_worker, **({"GPU": 1} if tc.use_gpu else {})},
        ),
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage,
            failure_config=ray.train.FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
