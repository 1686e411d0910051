"""Optional experiment tracking with Weights & Biases for Ray Train runs: rank 0 only, off by default.

The params section it reads (every field optional here, so code runs before the section
exists in params.yaml):

    tracking:
      wandb: false      # log training metrics to W&B
      project: msdm     # W&B project
      mode: offline     # offline (files only, `wandb sync` later) | online | disabled

wandb is an optional dependency (`pip install wandb==0.31.0`, pyproject extra `wandb`);
it is imported only when tracking is on, and a missing package is a clear error before
any compute. Run files go to results/wandb/ (gitignored, so `dvc exp run` never commits
them). The API key is never read, printed or passed on here: wandb finds it itself
(WANDB_API_KEY in the environment of the process that logs, or `wandb login`).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Callable, Mapping

from msdm.config import ConfigError
from msdm.diffusion_training import TrainHooks, WrappedHooks

WANDB_REQUIREMENT = "wandb==0.31.0"
DEFAULT_PROJECT = "msdm"
DEFAULT_MODE = "offline"
MODES = ("offline", "online", "disabled")
DEFAULT_DIR = Path("results/wandb")


class TrackingError(ConfigError):
    """Tracking is switched on but cannot work (package missing, bad mode)."""


class Tracker:
    """The no-op tracker: what every rank but 0, and every run with tracking off, gets."""

    enabled = False

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        pass

    def finish(self, failed: bool = False) -> None:
        pass


class WandbTracker(Tracker):
    """Logs the numeric entries of each metrics dict to one W&B run."""

    enabled = True

    def __init__(self, run: Any):
        self.run = run

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        numbers = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if numbers:
            self.run.log(numbers, step=int(step))

    def finish(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def tracking_settings(params: Any) -> tuple[bool, str, str]:
    """(enabled, project, mode) from `params.tracking`, with the defaults where it is absent."""
    section = getattr(params, "tracking", None)
    enabled = bool(getattr(section, "wandb", False))
    project = str(getattr(section, "project", DEFAULT_PROJECT) or DEFAULT_PROJECT)
    mode = str(getattr(section, "mode", DEFAULT_MODE))
    if mode not in MODES:
        raise TrackingError(f"tracking.mode: got {mode!r}, expected one of {', '.join(map(repr, MODES))}")
    return enabled, project, mode


def import_wandb():
    try:
        import wandb
    except ImportError:
        raise TrackingError(f"tracking.wandb is true but the wandb package is not installed. Fix: pip install "
                            f"{WANDB_REQUIREMENT} (the project's optional extra: pip install -e '.[wandb]'), "
                            f"or set tracking.wandb: false") from None
    return wandb


def check_tracking(params: Any) -> None:
    """Fail fast (on the driver, before Ray starts workers) when tracking is on but cannot work."""
    enabled, _, _ = tracking_settings(params)
    if enabled:
        import_wandb()


def _run_id(run_name: str) -> str:
    # The run name is stable across restarts (a hash of the run's params), so a worker
    # restarted by Ray resumes the same W&B run instead of starting a second one.
    return re.sub(r"[^A-Za-z0-9_-]", "-", run_name)[:64]


def build_tracker(params: Any, *, rank: int, run_name: str, config: Mapping | None = None,
                  directory: str | Path = DEFAULT_DIR) -> Tracker:
    """A WandbTracker on rank 0 when `tracking.wandb` is true, else the no-op Tracker."""
    enabled, project, mode = tracking_settings(params)
    if not enabled or rank != 0:
        return Tracker()
    wandb = import_wandb()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    run = wandb.init(project=project, name=run_name or None, id=_run_id(run_name) if run_name else None,
                     resume="allow", mode=mode, dir=str(directory), config=dict(config or {}),
                     job_type="train")
    return WandbTracker(run)


class TrackedHooks(WrappedHooks):
    """TrainHooks that also log every checkpoint-interval report (step, loss, fid) to a tracker."""

    def __init__(self, hooks: TrainHooks, tracker: Tracker):
        super().__init__(hooks)
        self.tracker = tracker

    def report(self, metrics: dict, checkpoint_dir) -> None:
        if self.rank == 0:
            self.tracker.log(metrics, step=int(metrics["step"]))
        super().report(metrics, checkpoint_dir)


def tracked_evaluate(evaluate: Callable[[Any, int], dict], tracker: Tracker) -> Callable[[Any, int], dict]:
    """`evaluate` that also logs its result (the FID of every evaluation) at its step."""

    def run(model, step: int) -> dict:
        result = evaluate(model, step)
        tracker.log(result, step=step)
        return result

    return run
