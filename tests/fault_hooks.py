"""Fault injection for the reliability tests, through the loop's `TrainHooks` seams.

`msdm.diffusion_training` and `pipeline/` know nothing of faults: a test wraps a worker's hooks with one
of these (`pipeline.ray_train.fit(..., worker_hooks=...)`, `run_sweep(..., worker_hooks=...)`).
The module is pickled by value, so Ray workers need not import it from tests/.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import ray.cloudpickle
import torch

from msdm.diffusion_training import TrainHooks, WrappedHooks

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class NaNLossHooks(WrappedHooks):
    """The loss of the given (1-based) steps becomes NaN."""

    def __init__(self, inner: TrainHooks, steps: set[int]):
        super().__init__(inner)
        self.steps = set(steps)

    def on_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        loss = super().on_loss(step, loss)
        return loss * float("nan") if step in self.steps else loss


class _CrashHooks(WrappedHooks):
    def __init__(self, inner: TrainHooks, fault: "CrashOnce"):
        super().__init__(inner)
        self.fault = fault

    def on_step(self, step: int) -> None:
        super().on_step(step)
        f = self.fault
        if step == f.step and self.rank == f.rank and not f.marker.exists():
            f.marker.write_text(f"crashed at step {step} on rank {self.rank}\n")
            time.sleep(f.delay_s)
            os._exit(1)  # the process dies as a killed worker would: no exception, no cleanup


@dataclass(frozen=True)
class CrashOnce:
    """worker_hooks: kill rank `rank` right after step `step`, once (the marker file says it happened).

    `delay_s` waits first: Ray Train registers a reported checkpoint only when its controller
    next polls the workers (0.5 s, pipeline.cluster), so a crash right after a report would
    otherwise restart from the checkpoint before it.
    """

    step: int
    rank: int
    marker: Path
    delay_s: float = 0.0

    def __call__(self, hooks: TrainHooks, spec) -> TrainHooks:
        return _CrashHooks(hooks, self)


@dataclass(frozen=True)
class FailRuns:
    """worker_hooks: the runs (Ray Train run names, a sweep's trial names) in `names` fail at start."""

    names: frozenset[str]

    def __call__(self, hooks: TrainHooks, spec) -> TrainHooks:
        if spec.name in self.names:
            raise RuntimeError(f"injected failure in run {spec.name}")
        return hooks


def record_listeners(config: dict) -> None:
    """A Train worker's entry point: its TCP listeners (rendezvous store, gloo) while the group is up."""
    import json

    import psutil
    import ray.train
    import torch.distributed as dist

    dist.barrier()  # every rank has joined: rank 0's store and each gloo listener are up
    rank = ray.train.get_context().get_world_rank()
    listening = [c.laddr.ip for c in psutil.Process().net_connections(kind="tcp") if c.status == psutil.CONN_LISTEN]
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps(listening))
    dist.barrier()


@dataclass(frozen=True)
class CountAttempts:
    """worker_hooks: appends a line to `path` each time a worker group starts the run."""

    path: Path

    def __call__(self, hooks: TrainHooks, spec) -> TrainHooks:
        with open(self.path, "a") as fh:
            fh.write(f"{spec.name}\n")
        return hooks
