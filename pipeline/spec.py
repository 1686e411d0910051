"""One run, resolved once: the library params, the artefacts it reads and writes, its Ray resources.

`train_spec` turns the validated params and the stage's paths into a `RunSpec`; `trial_spec`
derives a sweep trial from it by changing fields, so a trial is the `train` run with a
different strategy, target, seed, budget and resources, and nothing else. Everything below
(`pipeline.ray_train`, `msdm.diffusion_training`) receives a spec, never params plus overrides.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from msdm.config import to_dict, update

from .config import PipelineParams, params_from_dict


@dataclass(frozen=True)
class ArtefactPaths:
    """What a run reads (and where it logs its curve). Absolute: Ray workers do not run in the repo."""

    latents: str
    autoencoder: str = ""
    featurenet: str = ""
    fid_ref: str = ""  # empty: no FID evaluations during training
    live: str = ""  # rank 0's DVCLive directory (pipeline.live); empty: the curve is not written

    def resolved(self) -> "ArtefactPaths":
        return ArtefactPaths(**{k: str(Path(v).resolve()) if v else v for k, v in dataclasses.asdict(self).items()})


@dataclass(frozen=True)
class Resources:
    """One Ray Train run's worker group (read from params.train, or params.sweep for a trial)."""

    num_workers: int
    cpus_per_worker: int
    use_gpu: bool

    def per_run(self) -> dict[str, float]:
        """What the whole worker group holds while it runs."""
        return {"CPU": self.num_workers * self.cpus_per_worker, **({"GPU": self.num_workers} if self.use_gpu else {})}


def trial_resources(params: PipelineParams) -> Resources:
    """Every sweep trial's worker group (what `trial_params` puts into its train section)."""
    s = params.sweep
    return Resources(num_workers=s.num_workers, cpus_per_worker=s.cpus_per_worker, use_gpu=s.use_gpu)


@dataclass(frozen=True)
class RunSpec:
    params: PipelineParams
    paths: ArtefactPaths
    name: str  # Ray Train run name: a stable name is what makes a rerun resume
    storage: str  # Ray storage path (absolute local path or URI)

    @property
    def resources(self) -> Resources:
        t = self.params.train
        return Resources(num_workers=t.num_workers, cpus_per_worker=t.cpus_per_worker, use_gpu=t.use_gpu)

    def to_dict(self) -> dict:
        return {"params": to_dict(self.params), "paths": dataclasses.asdict(self.paths), "name": self.name,
                "storage": self.storage}

    @classmethod
    def from_dict(cls, raw: dict) -> "RunSpec":
        return cls(params=params_from_dict(raw["params"]), paths=ArtefactPaths(**raw["paths"]), name=raw["name"],
                   storage=raw["storage"])


# Sections that define a training run: changing any of them starts a new run instead of
# resuming an old one. Worker counts and storage are excluded (resuming on 2 workers a
# run begun on 1 is legitimate).
_RUN_DEFINING = ("diffusion", "weighting", "model", "train", "eval", "fid")
_NOT_RUN_DEFINING = {"train": ("num_workers", "use_gpu", "cpus_per_worker", "max_failures", "checkpoint_every",
                               "log_every"),
                     "eval": ("final_num_samples",)}  # the evaluate stage's, never a training run's


def run_digest(params: PipelineParams, latents_dir: Path, extra: dict | None = None) -> str:
    """10 hex digits over what defines the run, the latent set it trains on, and `extra`."""
    raw = to_dict(params)
    defining = {k: dict(raw[k]) for k in _RUN_DEFINING}
    for section, keys in _NOT_RUN_DEFINING.items():
        for key in keys:
            defining[section].pop(key, None)
    meta = latents_dir / "meta.json"
    defining["latents"] = hashlib.sha256(meta.read_bytes()).hexdigest() if meta.is_file() else ""
    defining["extra"] = extra or {}
    return hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:10]


# The repository's artefacts, as dvc.yaml declares them.
LATENTS = Path("data/latents")
AUTOENCODER = Path("models/autoencoder.pt")
FEATURENET = Path("models/featurenet.pt")
FID_REF = Path("results/fid_ref/stats.npz")
LOCAL_STORAGE = Path("results/ray")  # what dvc.yaml declares as the (persistent) Ray outputs


def repo_paths(*, live: Path | str = "") -> ArtefactPaths:
    return ArtefactPaths(latents=str(LATENTS), autoencoder=str(AUTOENCODER), featurenet=str(FEATURENET),
                         fid_ref=str(FID_REF), live=str(live)).resolved()


def stage_storage(params: PipelineParams, suffix: str) -> str:
    """Where Ray keeps this stage's runs (absolute). Elsewhere than results/ray (NFS, s3://), the
    declared DVC output results/ray/<suffix> holds a pointer file naming the real location."""
    root = params.ray.storage_path.rstrip("/")
    storage = f"{root}/{suffix}"
    if "://" in root or Path(root).resolve() != LOCAL_STORAGE.resolve():
        local = LOCAL_STORAGE / suffix
        local.mkdir(parents=True, exist_ok=True)
        (local / "STORAGE_LOCATION.txt").write_text(storage + "\n")
    return storage if "://" in storage else str(Path(storage).resolve())


def train_spec(params: PipelineParams, paths: ArtefactPaths, storage: str) -> RunSpec:
    """The `train` stage's run: named by a hash of what defines it, so a rerun resumes it."""
    name = f"train-{run_digest(params, Path(paths.latents))}"
    return RunSpec(params=params, paths=paths.resolved(), name=name, storage=storage)


def trial_name(strategy: str, target: str, seed: int) -> str:
    return f"{strategy}-{target}-seed{seed}"


def trial_params(params: PipelineParams, strategy: str, target: str, seed: int) -> PipelineParams:
    """The train params with the sweep's strategy, target, seed, budget and resources.

    A trial reports (and checkpoints) at every evaluation, so an interruption loses no
    evaluation. These fields are a trial's only differences; the test suite diffs them.
    """
    s = params.sweep
    return update(params, {
        "weighting": {"strategy": strategy},
        "diffusion": {"target": target},
        "model": {"preset": s.preset},
        "train": {"steps": s.steps, "seed": seed, "checkpoint_every": s.eval_every,
                  "num_workers": s.num_workers, "cpus_per_worker": s.cpus_per_worker, "use_gpu": s.use_gpu},
        "eval": {"every": s.eval_every, "num_samples": s.num_samples},
    })


def trial_spec(spec: RunSpec, strategy: str, target: str, seed: int, *, live: str, storage: str) -> RunSpec:
    """A sweep trial: the train run with `trial_params`, its own DVCLive directory, run name and storage."""
    return dataclasses.replace(spec, params=trial_params(spec.params, strategy, target, seed),
                               paths=dataclasses.replace(spec.paths, live=live),
                               name=trial_name(strategy, target, seed), storage=storage)


def spec_diff(a: RunSpec, b: RunSpec) -> dict[str, tuple]:
    """{'section.key' or 'paths.x' or 'name': (a's value, b's value)} for every field that differs."""
    def flat(spec: RunSpec) -> dict:
        out = {f"{section}.{k}": v for section, fields in to_dict(spec.params).items() for k, v in fields.items()}
        out.update({f"paths.{k}": v for k, v in dataclasses.asdict(spec.paths).items()})
        out.update(name=spec.name, storage=spec.storage)
        return out

    fa, fb = flat(a), flat(b)
    return {k: (fa[k], fb[k]) for k in fa if fa[k] != fb[k]}
