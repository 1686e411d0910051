"""Ray Train (V2) around the framework-free loop in `msdm.diffusion_training`: one `RunSpec` -> one `TorchTrainer`.

The `train` stage fits it directly; every sweep trial fits the same trainer from inside a
Tune function trainable (`pipeline.sweep`). `RunConfig(storage_path, name)` comes from the
spec and is stable, so fitting the same spec again resumes from its latest checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import torch

from msdm.codec import CodecError
from msdm.config import ConfigError, to_dict
from msdm.data import DatasetError
from msdm.io import (DIFFUSION_CHECKPOINT_ARTEFACT, DIFFUSION_MODEL_ARTEFACT, CorruptFileError, load_artefact,
                     save_artefact)
from msdm.diffusion_training import CHECKPOINT_FILE, DiffusionTrainResult, NonFiniteLossError, TrainHooks

from .errors import PipelineError
from .spec import RunSpec
from .tracking import DEFAULT_DIR as DEFAULT_TRACKING_DIR
from .tracking import check_tracking, log_row, wandb_run

if TYPE_CHECKING:
    import ray.train


class TrainingFailedError(PipelineError):
    pass


# Errors a restart cannot fix: the same params and files fail the same way on every attempt.
INPUT_ERRORS = (ConfigError, CorruptFileError, FileNotFoundError, DatasetError, CodecError, NonFiniteLossError)
INPUT_ERROR_FILE = "input_error.json"  # in the checkpoint by which a single-worker run hands its input error to fit()


@dataclass
class RunSummary:
    metrics: dict
    checkpoint: ray.train.Checkpoint  # the run's last checkpoint, where Ray stored it (not copied)

    def line(self, fid_metric: str) -> str:
        """'step 4000 (resumed from 3000), 1 worker x 2 threads, fp32; loss -7.369, fid_featurenet 56.59'."""
        m = self.metrics
        resumed = f" (resumed from {m['resumed_from_step']})" if m.get("resumed_from_step") else ""
        workers, threads = m.get("world_size", "?"), m.get("torch_threads", "?")
        values = [f"{key} {m[value]:.4g}" for key, value in (("loss", "loss"), (fid_metric, "fid"))
                  if isinstance(m.get(value), (int, float))]
        return (f"step {m.get('step', '?')}{resumed}, {workers} worker{'s' * (workers != 1)} x {threads} "
                f"thread{'s' * (threads != 1)}, {m.get('precision', '?')}; {', '.join(values)}")


class CheckpointDirs(Sequence):
    """`checkpoints` as local directories, each fetched (downloaded, for remote storage) the first
    time it is read: a resume that loads the latest checkpoint fetches no other."""

    def __init__(self, checkpoints: Sequence, fetch: Callable[[object], Path]):
        self._checkpoints, self._fetch, self._dirs = list(checkpoints), fetch, {}

    def __len__(self) -> int:
        return len(self._checkpoints)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        i = range(len(self))[i]  # IndexError past the end, which ends iteration
        if i not in self._dirs:
            self._dirs[i] = self._fetch(self._checkpoints[i])
        return self._dirs[i]


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

    def resume_checkpoints(self) -> Sequence[Path]:
        """The run's latest checkpoint, then the older ones Ray keeps (CheckpointConfig
        num_to_keep), newest first: the loop falls back past a damaged one. From remote storage
        each is downloaded only when the loop reads it: the latest is usually all it reads."""
        import ray.train

        latest = ray.train.get_checkpoint()
        if latest is None:
            return []
        try:
            reported = ray.train.get_all_reported_checkpoints()
        except Exception:  # noqa: BLE001 - no history to offer (e.g. none reported yet): the latest only
            reported = []
        step_of = {r.checkpoint.path: int((r.metrics or {}).get("step", -1)) for r in reported}
        older = sorted((r.checkpoint for r in reported if r.checkpoint.path != latest.path),
                       key=lambda c: -step_of[c.path])
        # a run stopped by a bad input reported a record (step -1), not a state: nothing to resume from there
        found = [c for c in (latest, *older) if step_of.get(c.path, 0) >= 0]
        return CheckpointDirs(found, self._readable)

    def _readable(self, checkpoint) -> Path:
        """On local storage the checkpoint is read where Ray keeps it, so an error names that
        path; from remote storage it is downloaded first."""
        if getattr(checkpoint.filesystem, "type_name", "") == "local":
            return Path(checkpoint.path)
        return Path(checkpoint.to_directory(tempfile.mkdtemp(dir=self._tmp.name)))

    def report(self, metrics, checkpoint_dir):
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)


def run_worker(spec: RunSpec, hooks: TrainHooks, progress: bool = True, wandb=None) -> DiffusionTrainResult:
    """Load the latents and evaluator the spec names, then run the loop. Ray workers and local runs.

    Rank 0 logs the loop's rows with DVCLive to `spec.paths.live`, and to `wandb` (a W&B run
    from `pipeline.tracking.wandb_run`) when given.
    """
    from msdm.evaluation import build_evaluator
    from msdm.latents import LatentStore
    from msdm.diffusion_training import latent_info, train_loop

    params, paths = spec.params, spec.paths
    store = LatentStore(paths.latents)
    latents, labels = store.load("train", normalized=True)
    info = latent_info(store.meta)
    evaluate = None
    if hooks.rank == 0 and paths.fid_ref:
        evaluate = build_evaluator(params, store, autoencoder=paths.autoencoder, featurenet=paths.featurenet,
                                   fid_ref=paths.fid_ref, device=hooks.device, info=info)
    curve = None
    if hooks.rank == 0 and (paths.live or wandb is not None):
        from .live import DVCLiveCurve

        curve = DVCLiveCurve(paths.live or None, on_row=(lambda row: log_row(wandb, row)) if wandb else None)
    return train_loop(params, latents, labels, info, hooks=hooks, evaluate=evaluate, curve=curve, progress=progress)


def quiet_report_lines() -> None:
    """Keep Ray Train's 'Reporting training result N: ... Checkpoint(...)' line, one per report,
    out of the console: it is logged at INFO by a logger named after its source file, which is
    outside the `ray.train` logger that `LoggingConfig(log_level=...)` sets."""
    import logging

    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _train_fn(config: dict) -> None:
    """Ray Train's per-worker entry point."""
    from .cluster import assigned_cpu_threads

    quiet_report_lines()
    torch.set_num_threads(assigned_cpu_threads())  # the CPUs per worker, as Ray assigned them
    spec = RunSpec.from_dict(config["spec"])
    hooks = RayTrainHooks()
    if config["worker_hooks"] is not None:
        hooks = config["worker_hooks"](hooks, spec)
    wandb = None
    if config["log_to_wandb"] and hooks.rank == 0:
        wandb = wandb_run(spec.params, run_name=spec.name,
                          config={**config["spec"]["params"], "world_size": hooks.world_size},
                          directory=Path(config["tracking_dir"]))
    failed = True
    try:
        run_worker(spec, hooks, progress=config["progress"], wandb=wandb)
        failed = False
    except INPUT_ERRORS as e:
        if hooks.world_size > 1:  # the other ranks may be inside a collective: only Ray can stop them
            raise
        # a bad input fails the same way on every attempt: end the run now with the reason,
        # instead of train.max_failures restarts, each printing a traceback. Ray Train hands a
        # run's result to the driver only with a checkpoint, so the reason travels in one.
        import ray.train

        with tempfile.TemporaryDirectory(prefix="msdm-input-error-") as tmp:
            (Path(tmp) / INPUT_ERROR_FILE).write_text(json.dumps({"error": f"{type(e).__name__}: {e}"}))
            ray.train.report({"step": -1}, checkpoint=ray.train.Checkpoint.from_directory(tmp))
    finally:
        if wandb is not None:
            wandb.finish(exit_code=1 if failed else 0)


WorkerHooks = Callable[[TrainHooks, RunSpec], TrainHooks]


def build_trainer(spec: RunSpec, *, progress: bool = True, callbacks: Sequence = (),
                  worker_hooks: WorkerHooks | None = None, log_to_wandb: bool = True):
    """The spec's TorchTrainer. `worker_hooks(hooks, spec)`, if given, wraps each worker's hooks
    (it is pickled to the workers): the seam through which the tests inject faults.
    `log_to_wandb=False` keeps rank 0 from opening a W&B run where Tune logs the run instead."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from .cluster import is_local_cluster
    from .loopback_torch import LoopbackTorchConfig

    check_tracking(spec.params)  # a missing wandb fails here, before any worker starts
    res = spec.resources
    return TorchTrainer(
        _train_fn,
        # absolute: Ray workers do not run in the repository directory
        train_loop_config={"spec": spec.to_dict(), "progress": progress,
                           "tracking_dir": str(DEFAULT_TRACKING_DIR.resolve()), "worker_hooks": worker_hooks,
                           "log_to_wandb": log_to_wandb},
        scaling_config=ray.train.ScalingConfig(
            num_workers=res.num_workers, use_gpu=res.use_gpu,
            resources_per_worker={"CPU": res.cpus_per_worker, **({"GPU": 1} if res.use_gpu else {})},
        ),
        # on the local cluster, torch.distributed's rendezvous listens on loopback only
        torch_config=(LoopbackTorchConfig if is_local_cluster() else TorchConfig)(
            backend="nccl" if res.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=spec.name, storage_path=spec.storage, callbacks=list(callbacks),
            failure_config=ray.train.FailureConfig(max_failures=spec.params.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # Ray Train's INFO lines (worker group started, every checkpoint's path) drown the
            # progress lines; warnings and errors still reach the console, and Ray's session
            # log files keep everything
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )


def fit(spec: RunSpec, *, progress: bool = True, callbacks: Sequence = (),
        worker_hooks: WorkerHooks | None = None, log_to_wandb: bool = True) -> RunSummary:
    """Run (or resume) the spec's training to the end."""
    import ray.train

    trainer = build_trainer(spec, progress=progress, callbacks=callbacks, worker_hooks=worker_hooks,
                            log_to_wandb=log_to_wandb)
    where = f"{spec.storage}/{spec.name}"
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:  # Ray Train V2 raises instead of returning result.error
        raise TrainingFailedError(
            f"training run {spec.name} failed after train.max_failures={spec.params.train.max_failures} "
            f"restart(s): {_failure_reason(e)}. The last checkpoint is kept in {where}; rerun the stage to "
            f"resume from it (or raise train.max_failures)") from e
    if result.error is not None:
        raise TrainingFailedError(f"training run {spec.name} failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise TrainingFailedError(f"training run {spec.name} reported no checkpoint")
    # the record of a bad input is reported with step -1; only then is the checkpoint read (a
    # remote one is downloaded, which for a large model's state is worth avoiding)
    input_error = None
    if int((result.metrics or {}).get("step", 0)) < 0:
        with result.checkpoint.as_directory() as checkpoint_dir:
            error_file = Path(checkpoint_dir) / INPUT_ERROR_FILE
            input_error = (json.loads(error_file.read_text())["error"] if error_file.is_file()
                           else "a bad input, whose record is missing")
    if input_error is not None:
        raise TrainingFailedError(f"training run {spec.name} stopped: {input_error} (not retried: a restart would "
                                  f"fail the same way)")
    return RunSummary(metrics=dict(result.metrics or {}), checkpoint=result.checkpoint)


def _failure_reason(error: Exception) -> str:
    """One line per failed worker (Ray's own message is a multi-line report with tracebacks)."""
    def first_line(e: object) -> str:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        return f"{type(e).__name__}: {lines[0].rstrip('.') if lines else ''}"

    failures = getattr(error, "worker_failures", None)
    if failures:
        return "; ".join(f"rank {rank}: {first_line(e)}" for rank, e in sorted(failures.items()))
    return first_line(error)


def export_final_model(spec: RunSpec, checkpoint: ray.train.Checkpoint, out: Path) -> None:
    """models/diffusion.pt: the EMA backbone weights plus what is needed to rebuild it.

    `checkpoint` is a `ray.train.Checkpoint`: read in place on local storage, downloaded to a
    temporary directory (removed afterwards) from remote storage.
    """
    with checkpoint.as_directory() as checkpoint_dir:
        state = load_artefact(Path(checkpoint_dir) / CHECKPOINT_FILE, DIFFUSION_CHECKPOINT_ARTEFACT)
    meta = json.loads((Path(spec.paths.latents) / "meta.json").read_text())
    save_artefact({"ema": state["ema"], "step": state["step"], "params": to_dict(spec.params),
                   "latent_meta_sha256": hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()},
                  out, DIFFUSION_MODEL_ARTEFACT)
