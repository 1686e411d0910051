"""Ray Train's torch backend with its rendezvous on loopback, for the local cluster.

Ray Train's own `TorchConfig` backend starts torch.distributed through `init_method="env://"`:
rank 0 then runs a `TCPStore` server that listens on every interface (torch has no bind
address for it), for as long as the run lasts. On the local cluster every worker is on this
machine, so rank 0 here binds the store's socket to 127.0.0.1 itself and hands it to
`TCPStore(master_listen_fd=...)`; every rank joins the process group through that store, and
gloo (or NCCL) then also talks over loopback. A real cluster (`ray.address`) keeps Ray's
backend: its ranks are on other nodes.
"""
from __future__ import annotations

import datetime
import os
import socket

import ray
from ray.train.torch import TorchConfig
# Ray's own backend and its per-worker env set-up (LOCAL_RANK, RANK, WORLD_SIZE, ...): private
# names of the pinned Ray release, reused so that only the rendezvous differs from Ray's
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

_store = None  # rank 0's TCPStore server: kept alive in that worker process for the run


def _serve_store(world_size: int, timeout_s: int) -> int:
    """On rank 0: a TCPStore server on a loopback socket; returns its port."""
    import torch.distributed as dist

    global _store
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(max(128, world_size))
    port = sock.getsockname()[1]
    _store = dist.TCPStore("127.0.0.1", port, world_size, True, datetime.timedelta(seconds=timeout_s),
                           wait_for_workers=False, master_listen_fd=sock.detach())
    return port


def _join_process_group(backend: str, rank: int, world_size: int, port: int, timeout_s: int) -> None:
    import torch.distributed as dist

    if backend == "nccl":  # as Ray's backend does: fail on a hung collective instead of waiting
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    timeout = datetime.timedelta(seconds=timeout_s)
    store = _store if rank == 0 else dist.TCPStore("127.0.0.1", port, world_size, False, timeout)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout)


class LoopbackTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig):
        backend = backend_config.backend or "gloo"
        world_size = len(worker_group)
        worker_group.execute(_set_torch_distributed_env_vars)
        port = worker_group.execute_single(0, _serve_store, world_size, backend_config.timeout_s)
        ray.get([worker_group.execute_single_async(rank, _join_process_group, backend, rank, world_size, port,
                                                   backend_config.timeout_s) for rank in range(world_size)])


class LoopbackTorchConfig(TorchConfig):
    @property
    def backend_cls(self):
        return LoopbackTorchBackend
