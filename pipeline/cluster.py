"""One Ray connection per process: a local cluster by default, or an existing one."""
from __future__ import annotations

import os

from .config import RayConfig

# Quiet, local-only defaults; set before Ray is imported anywhere in this process.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Ray Train/Tune print a large table per report by default; our own tqdm bars show progress.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
# Ray Train's controller polls its workers every 2 s by default, and a run's start and end wait
# for a poll: with 27 short sweep trials that is minutes. A poll is a cheap status call per worker.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def init_ray(cfg: RayConfig):
    """Connect to `ray.address` (or $RAY_ADDRESS), else start a local cluster (dashboard on 127.0.0.1).

    Reuses an existing connection, so stages and tests pay Ray's start-up once per process.
    """
    import ray

    if ray.is_initialized():
        return ray
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, log_to_driver=True)
        return ray
    # The dashboard process also serves Ray's state API, which Ray Train's placement-group
    # cleanup polls; it is bound to loopback only.
    kwargs = dict(num_cpus=cfg.num_cpus or None, dashboard_host="127.0.0.1",
                  object_store_memory=512 * 1024 * 1024, log_to_driver=True, configure_logging=True,
                  logging_level="WARNING")
    try:
        ray.init(include_dashboard=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for this
        if "missing packages" not in str(e):
            raise
        # an environment with plain `ray` (not ray[default]): run without the dashboard
        ray.shutdown()
        ray.init(include_dashboard=False, **kwargs)
    return ray


def assigned_cpu_threads() -> int:
    """Intra-op threads for this Ray task or actor: the CPUs Ray assigned to it.

    Outside Ray (or with no CPU assigned) it is the CPUs this process may run on. Torch's
    own default counts the machine's cores, which oversubscribes when Ray packs several
    workers or trials onto one node.
    """
    import ray

    if ray.is_initialized():
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0)
        if cpus >= 1:
            return int(cpus)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
