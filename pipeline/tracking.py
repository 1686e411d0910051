"""Optional Weights & Biases logging through Ray's own integrations; off by default, offline when on.

    tracking:
      wandb: false      # log to W&B
      project: msdm     # W&B project
      mode: offline     # offline (files only, `wandb sync` later) | online | disabled

- The `train` stage: rank 0 of its Train run opens the run with Ray Train's `setup_wandb`
  (`wandb_run`) and logs every row the loop logs (`log_row`): loss, per-subspace MSE, weights, FID.
- The `sweep`: Tune's `WandbLoggerCallback` (`sweep_callbacks`) logs each trial's reports as
  one W&B run, grouped by sweep; the trials' workers do not log themselves.

wandb is an optional dependency (`pip install wandb==0.31.0`, pyproject extra `wandb`); it is
imported only when tracking is on, and a missing package is a clear error before any compute
(`check_tracking`). Run files go to results/wandb/ (gitignored, so `dvc exp run` never commits
them). The API key is never read, printed or passed on here: wandb finds it itself.
"""
from __future__ import annotations

import importlib
import math
import os
import re
from pathlib import Path
from typing import Any

from msdm.config import ConfigError

WANDB_REQUIREMENT = "wandb==0.31.0"
DEFAULT_DIR = Path("results/wandb")


class TrackingError(ConfigError):
    """Tracking is switched on but cannot work (package missing)."""


def enabled(params: Any) -> bool:
    """Whether `tracking.wandb` is on (library params, which have no tracking section, say no)."""
    return bool(getattr(getattr(params, "tracking", None), "wandb", False))


def check_tracking(params: Any) -> None:
    """Fail fast (on the driver, before Ray starts anything) when tracking is on but wandb is missing."""
    if not enabled(params):
        return
    try:
        importlib.import_module("wandb")
    except ImportError:
        raise TrackingError(f"tracking.wandb is true but the wandb package is not installed. Fix: pip install "
                            f"{WANDB_REQUIREMENT} (the project's optional extra: pip install -e '.[wandb]'), "
                            f"or set tracking.wandb: false") from None


def _offline_first(mode: str, directory: Path) -> None:
    # Ray's integrations ask for an API key unless $WANDB_MODE says offline or disabled; the
    # run files land in `directory`.
    os.environ["WANDB_MODE"] = mode
    os.environ["WANDB_DIR"] = str(directory)
    directory.mkdir(parents=True, exist_ok=True)


def run_id(run_name: str) -> str:
    """The W&B run id: the Ray run's name (a hash of its params), so a worker that Ray restarts
    resumes the same W&B run instead of starting a second one."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", run_name)[:64]


def wandb_run(params: Any, *, run_name: str, config: dict, directory: Path = DEFAULT_DIR):
    """Rank 0's W&B run from Ray Train's `setup_wandb` (other ranks get a disabled one), or None
    when tracking is off. Called inside a Train worker."""
    if not enabled(params):
        return None
    from ray.air.integrations.wandb import setup_wandb

    t = params.tracking
    _offline_first(t.mode, Path(directory))
    return setup_wandb(config=config, project=t.project, mode=t.mode, dir=str(directory), name=run_name,
                       id=run_id(run_name), resume="allow", job_type="train", rank_zero_only=True)


def log_row(run, row: dict) -> None:
    """One logged row of the loop to W&B, at its step: the finite numbers only (strings such as
    the FID metric's name are in the run's config)."""
    numbers = {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))
               and not isinstance(v, bool) and math.isfinite(v)}
    run.log(numbers, step=int(row["step"]))


def sweep_callbacks(params: Any, *, group: str, directory: Path = DEFAULT_DIR) -> list:
    """Tune callbacks for the sweep: Ray Tune's `WandbLoggerCallback` when tracking is on."""
    if not enabled(params):
        return []
    from ray.air.integrations.wandb import WandbLoggerCallback

    t = params.tracking
    directory = Path(directory).resolve()  # absolute: Tune's logging actors run in their own folders
    _offline_first(t.mode, directory)
    return [WandbLoggerCallback(project=t.project, group=group, mode=t.mode, dir=str(directory),
                                excludes=["time_this_iter_s", "timestamp"], job_type="sweep-trial")]
