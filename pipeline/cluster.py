"""One Ray connection per process: a local cluster by default, or an existing one."""
from __future__ import annotations

import os
import secrets

from .config import RayConfig
from .errors import PipelineError

# Quiet defaults; set before Ray is imported anywhere in this process.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Ray Train/Tune print a large table per report by default; our own tqdm bars show progress.
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
# Ray Train's controller polls its workers every 2 s by default, and a run's start and end wait
# for a poll: with 27 short sweep trials that is minutes. A poll is a cheap status call per worker.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Ray Train replaces `print` in its workers with one that logs through the root logger and,
# where stdout is wrapped (as Ray's log forwarding wraps it), prints as well: every progress
# line reached the console twice. Unpatched, a worker's print is forwarded to the driver once.
os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
# Ray folds lines from different processes that differ only in their numbers into one "[repeated
# Nx across cluster]" line: two sweep trials' `eval[const] step 100/300  fid_featurenet ...` lines,
# or a restarted worker's progress lines after the dead one's, lost their values. Ours are exempt.
os.environ.setdefault("RAY_DEDUP_LOGS_ALLOW_REGEX", r"^(train|eval)\[[^]]*\] step ")


def close_local_cluster() -> None:
    """Make the local cluster this process is about to start unreachable from the network.

    Loopback: Ray's own switch for single-machine clusters (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`,
    the default on macOS and Windows) makes the node's IP 127.0.0.1, and every service binds
    to it: GCS, raylet, object manager, workers, dashboard, agents and metrics servers. Ray's
    processes read the variable; this process imported Ray already, so its constant is set too.
    Token auth on top (unless $RAY_AUTH_MODE says otherwise): loopback is still open to the
    machine's other users. A fresh random token per cluster, in the environment that Ray's
    processes inherit and nowhere on disk.
    """
    from ray._private import ray_constants
    from ray._raylet import Config

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    # Ray Train's preemption watcher polls for spot-node preemption, which a single-machine
    # cluster does not have; its actor also logged an error-level line per run ("has
    # constructor arguments in the object store and max_restarts > 0") into the console.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    if "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
        Config.initialize("")  # Ray read its config at import: reread it, as Ray's own token set-up does


def is_local_cluster() -> bool:
    """Whether this process belongs to a cluster that `close_local_cluster` set up (Ray's
    processes inherit the variable): every worker is on this machine, on loopback."""
    return os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") == "0"


def pin_cluster_address() -> None:
    """Ray worker set-up hook of a local cluster: name this cluster in $RAY_ADDRESS.

    Ray's state API finds "the" cluster from $RAY_ADDRESS, else by looking for running GCS
    processes, and a local cluster started by `ray.init` sets no $RAY_ADDRESS. With a second Ray
    instance on the machine (two `dvc exp` queue workers, a sweep beside `make test`, a `ray
    start`) that search fails, or finds the other one: Ray Train's PlacementGroupCleaner, which
    polls the state API for its controller, then died with a traceback in the console each run.
    """
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


def init_ray(cfg: RayConfig):
    """Connect to `ray.address` (or $RAY_ADDRESS), else start a local cluster on loopback with token auth.

    Reuses an existing connection, so stages and tests pay Ray's start-up once per process.
    """
    import ray

    if ray.is_initialized():
        return ray
    address = cfg.address or os.environ.get("RAY_ADDRESS", "")
    if address:  # a real cluster: its own network settings and token ($RAY_AUTH_MODE, $RAY_AUTH_TOKEN)
        ray.init(address=address, log_to_driver=True)
        return ray
    close_local_cluster()
    # The dashboard process also serves Ray's state API, which Ray Train's placement-group
    # cleanup polls; it is bound to loopback only.
    kwargs = dict(num_cpus=cfg.num_cpus or None, dashboard_host="127.0.0.1",
                  object_store_memory=512 * 1024 * 1024, log_to_driver=True, configure_logging=True,
                  logging_level="WARNING",
                  runtime_env={"worker_process_setup_hook": f"{__name__}.{pin_cluster_address.__name__}"})
    try:
        ray.init(include_dashboard=True, **kwargs)
    except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception for this
        if "missing packages" not in str(e):
            raise
        # an environment with plain `ray` (not ray[default]): run without the dashboard
        ray.shutdown()
        ray.init(include_dashboard=False, **kwargs)
    return ray


def require_room(per_run: dict[str, float], section: str, cfg: RayConfig) -> None:
    """Refuse, before anything starts, a run whose worker group the local cluster cannot hold:
    Ray would wait for the resources forever. (A real cluster may grow: not checked there.)"""
    import ray

    if cfg.address or os.environ.get("RAY_ADDRESS"):
        return
    total = ray.cluster_resources()
    short = {k: (v, total.get(k, 0)) for k, v in per_run.items() if v > total.get(k, 0)}
    if short:
        need = ", ".join(f"{int(v)} {k}" for k, (v, _) in short.items())
        have = ", ".join(f"{int(h)} {k}" for k, (_, h) in short.items())
        raise PipelineError(f"{section}: one run needs {need} ({section}.num_workers x {section}.cpus_per_worker), "
                            f"the local Ray cluster has {have}; lower them (or raise ray.num_cpus)")


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
