"""Naming, running and exporting one training run (used by the train stage and the sweep)."""
from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from msdm.errors import PipelineError
from msdm.config import Params, to_dict
from msdm.io import atomic_torch_save, safe_torch_load
from msdm.train import CHECKPOINT_FILE

from .trainer import RunOverrides, RunPaths, build_trainer

AUTOENCODER = Path("models/autoencoder.pt")
FEATURENET = Path("models/featurenet.pt")
FID_REF = Path("results/fid_ref/stats.npz")

# Sections that define a training run: changing any of them starts a new run instead of
# resuming an old one. Worker counts and storage are excluded (resuming on 2 workers a
# run begun on 1 is legitimate).
_RUN_DEFINING = ("diffusion", "weighting", "model", "train", "eval", "fid")
_NOT_RUN_DEFINING = {"train": ("num_workers", "use_gpu", "cpus_per_worker", "max_failures", "checkpoint_every",
                               "log_every")}


class TrainingFailedError(PipelineError):
    pass


@dataclass
class RunSummary:
    metrics: dict
    checkpoint_dir: Path


def run_name(prefix: str, params: Params, latents_dir: Path, overrides: RunOverrides | None = None) -> str:
    raw = to_dict(params)
    defining = {k: dict(raw[k]) for k in _RUN_DEFINING}
    for section, keys in _NOT_RUN_DEFINING.items():
        for key in keys:
            defining[section].pop(key, None)
    meta = (latents_dir / "meta.json")
    defining["latents"] = hashlib.sha256(meta.read_bytes()).hexdigest() if meta.is_file() else ""
    defining["overrides"] = overrides.__dict__ if overrides else {}
    digest = hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:10]
    return f"{prefix}-{digest}"


def run_paths(latents: Path, curve: Path | None, *, with_eval: bool = True, params: Params | None = None) -> RunPaths:
    return RunPaths(latents=str(latents), curve=str(curve) if curve else None,
                    autoencoder=str(AUTOENCODER), featurenet=str(FEATURENET),
                    fid_ref=str(FID_REF) if with_eval else None)


LOCAL_STORAGE = Path("results/ray")  # what dvc.yaml declares as the (persistent) outputs


def storage_for(params: Params, suffix: str) -> str:
    """Where Ray keeps this stage's runs. Elsewhere than results/ray (NFS, s3://), the declared
    DVC output results/ray/<suffix> holds a pointer file naming the real location instead."""
    root = params.ray.storage_path.rstrip("/")
    storage = f"{root}/{suffix}"
    local = LOCAL_STORAGE / suffix
    if "://" in root or Path(root).resolve() != LOCAL_STORAGE.resolve():
        local.mkdir(parents=True, exist_ok=True)
        (local / "STORAGE_LOCATION.txt").write_text(storage + "\n")
    return storage


def train_with_ray(params: Params, paths: RunPaths, *, name: str, storage_suffix: str,
                   overrides: RunOverrides | None = None) -> RunSummary:
    import ray.train

    storage = storage_for(params, storage_suffix)
    trainer = build_trainer(params, paths, name=name, overrides=overrides, storage_path=storage)
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:  # Ray Train V2 raises instead of returning result.error
        raise TrainingFailedError(
            f"training run {name} failed after train.max_failures={params.train.max_failures} restart(s): "
            f"{_failure_reason(e)}. The last checkpoint is kept in {storage}/{name}; rerun the stage to resume "
            f"from it (or raise train.max_failures)") from e
    if result.error is not None:
        raise TrainingFailedError(f"training run {name} failed: {result.error}") from result.error
    if result.checkpoint is None:
        raise TrainingFailedError(f"training run {name} reported no checkpoint")
    local = Path(tempfile.mkdtemp(prefix="msdm-final-"))
    ckpt_dir = Path(result.checkpoint.to_directory(str(local)))
    return RunSummary(metrics=dict(result.metrics or {}), checkpoint_dir=ckpt_dir)


def _failure_reason(error: Exception) -> str:
    """One line per failed worker (Ray's own message is a multi-line report with tracebacks)."""
    def first_line(e: object) -> str:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        return f"{type(e).__name__}: {lines[0].rstrip('.') if lines else ''}"

    failures = getattr(error, "worker_failures", None)
    if failures:
        return "; ".join(f"rank {rank}: {first_line(e)}" for rank, e in sorted(failures.items()))
    return first_line(error)


def export_final_model(params: Params, checkpoint_dir: Path, latents_dir: Path, out: Path) -> None:
    """models/diffusion.pt: the EMA backbone weights plus what is needed to rebuild it."""
    state = safe_torch_load(checkpoint_dir / CHECKPOINT_FILE, made_by="train")
    meta = json.loads((latents_dir / "meta.json").read_text())
    atomic_torch_save({"ema": state["ema"], "step": state["step"], "params": to_dict(params),
                       "latent_meta_sha256": hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()},
                      out)
