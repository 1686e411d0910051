"""What params.yaml holds: the library's sections plus the three only `pipeline/` reads.

`msdm.config.Params` describes a model, its data and its training; `PipelineParams` adds
`sweep` (the strategy study), `ray` (where runs execute) and `tracking` (W&B). The file is
validated once, section by section and across sections, by `load_params`, before any compute.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from msdm import config as library
from msdm.config import LIST_MAX, PRESETS, SAMPLES_MAX, SEED_MAX, STEPS_MAX, STRATEGIES, TARGETS, Params, is_count, need, option, shown


@dataclass(frozen=True)
class SweepConfig:
    strategies: list = option(["const", "min_snr", "dysigma"])
    targets: list = option(["x0"], doc="prediction targets; each compared with const of the same target")
    seeds: list = option([0, 1, 2])
    steps: int = option(300, min=1, max=STEPS_MAX)
    eval_every: int = option(100, min=1, max=STEPS_MAX)
    num_samples: int = option(500, min=2, max=SAMPLES_MAX)
    preset: str = option("vit-tiny", choices=PRESETS)
    # per-trial resources: every trial is a Ray Train run like `train`, with these workers
    num_workers: int = option(1, min=1, max=4096, doc="Ray Train workers per trial (DDP when > 1)")
    cpus_per_worker: int = option(1, min=1, max=512)
    use_gpu: bool = option(False, doc="one GPU per worker")


@dataclass(frozen=True)
class RayConfig:
    address: str = option("", doc="empty: start a local cluster; else a cluster address or 'auto'")
    storage_path: str = option("results/ray", doc="local dir, NFS path or s3:// URI for checkpoints")
    num_cpus: int = option(0, min=0, max=4096, doc="0: all local cores")


@dataclass(frozen=True)
class TrackingConfig:
    wandb: bool = option(False, doc="log from rank 0 to Weights & Biases (pip install wandb==0.31.0)")
    project: str = option("msdm")
    mode: str = option("offline", choices=("offline", "online", "disabled"))


@dataclass(frozen=True)
class PipelineParams(Params):
    sweep: SweepConfig = field(default_factory=SweepConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self) -> None:
        super().validate()
        s, t = self.sweep, self.train
        need(t.batch_size % s.num_workers == 0,
             f"train.batch_size: {t.batch_size} is not divisible by sweep.num_workers {s.num_workers}")
        need(t.precision != "fp16" or s.use_gpu,
             "train.precision: 'fp16' needs sweep.use_gpu: true as well (the sweep's trials train in it)")
        need(len(s.strategies) >= 1, "sweep.strategies: expected at least one strategy")
        for name in s.strategies:
            need(isinstance(name, str) and name in STRATEGIES,
                 f"sweep.strategies: got {shown(name)}, expected each of {', '.join(STRATEGIES)}")
        need("const" in s.strategies, "sweep.strategies: must include 'const', the speedup baseline")
        need(len(set(s.strategies)) == len(s.strategies), "sweep.strategies: duplicate entries")
        need(len(s.targets) >= 1 and all(isinstance(target, str) and target in TARGETS for target in s.targets),
             f"sweep.targets: got {shown(s.targets)}, expected a non-empty list of {', '.join(TARGETS)}")
        need(len(set(s.targets)) == len(s.targets), "sweep.targets: duplicate entries")
        need(1 <= len(s.seeds) <= LIST_MAX and all(is_count(seed) and 0 <= seed <= SEED_MAX for seed in s.seeds),
             f"sweep.seeds: got {shown(s.seeds)}, expected a non-empty list of integers in [0, {SEED_MAX}]")
        need(len(set(s.seeds)) == len(s.seeds), "sweep.seeds: duplicate entries")
        need(s.eval_every <= s.steps,
             f"sweep.eval_every: {s.eval_every} exceeds sweep.steps {s.steps}; a trial would record no FID")
        # a local cluster of ray.num_cpus CPUs must hold one worker group, or Ray waits forever
        if self.ray.num_cpus and not self.ray.address:
            for section, group in (("train", t), ("sweep", s)):
                cpus = group.num_workers * group.cpus_per_worker
                need(cpus <= self.ray.num_cpus,
                     f"ray.num_cpus: {self.ray.num_cpus} is fewer than the {cpus} CPUs of one {section} run "
                     f"({section}.num_workers {group.num_workers} x {section}.cpus_per_worker "
                     f"{group.cpus_per_worker})")


def params_from_dict(raw: Any) -> PipelineParams:
    return library.params_from_dict(raw, PipelineParams)


def load_params(path: str | Path = "params.yaml", overrides: Sequence[str] = ()) -> PipelineParams:
    return library.load_params(path, PipelineParams, overrides)
