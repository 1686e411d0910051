"""Faults injected and survived: a Ray Train worker killed mid-run, truncated inputs,
interrupted writes, and determinism across separate processes.

The in-process resume/NaN/corrupt-checkpoint cases live in test_train_loop.py and the
SIGKILL-during-`dvc repro` case in test_pipeline_e2e.py; this file adds what they miss.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from msdm import data
from msdm.config import DataConfig, replace, update
from pipeline.config import PipelineParams, RayConfig
from pipeline.live import DVCLiveCurve
from msdm.data import DatasetError
from msdm.io import atomic_path, atomic_torch_save, safe_torch_load
from msdm.latents import LatentStoreError, LatentStoreWriter, shard_name
from msdm.diffusion_training import CHECKPOINT_FILE, LatentInfo, TrainHooks, train_loop

from e2e import params_text
from fault_hooks import CountAttempts, CrashOnce, FailRuns, record_listeners


REPO = Path(__file__).resolve().parents[1]
K, C, SIZE, CLASSES = 3, 2, 4, 4  # a tiny latent store: 3 subspaces x 2 channels, 4x4, 4 classes
INFO = LatentInfo(channels=K * C, size=SIZE, subspaces=K, num_classes=CLASSES)


def tiny_params(**train) -> PipelineParams:
    p = replace(PipelineParams(), "model", preset="vit-tiny", patch_size=2)
    p = replace(p, "weighting", strategy="learned")
    return replace(p, "train", **{"steps": 12, "batch_size": 8, "checkpoint_every": 6, "log_every": 2,
                                  "precision": "fp32", **train})


def write_tiny_store(out: Path, n: int = 64) -> Path:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(n, K * C, SIZE, SIZE, generator=g)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    with LatentStoreWriter(out, subspaces=K, channels=C, num_classes=CLASSES, codec_kind="multispace",
                           shard_size=n // 2) as writer:
        writer.write_split("train", [z], y)
    return out


def curve_steps(live: Path) -> list[int]:
    """The steps of the rows DVCLive logged to `live`."""
    from pipeline.live import read_curve

    return [r["step"] for r in read_curve(live)]


def weights_sum(model, step):
    # a deterministic function of the EMA weights stands in for FID
    return {"fid": float(sum(p.double().sum() for p in model.parameters()))}


# ---------------------------------------------------------------------------- Ray Train worker death

# Rank 0, after the step-4 checkpoint and before the step-8 one. Rank 0 is the rank that
# writes the checkpoints and the curve, and the one a single-worker run has.
CRASH_STEP, CRASH_RANK = 6, 0
FAILING_SEED = 5
FAILING_TRIAL = f"const-x0-seed{FAILING_SEED}"
SECRET = "wandb-key-" + os.urandom(12).hex()


@pytest.fixture(scope="session")  # session: started once per pytest(-xdist) worker, however tests are ordered
def ray_cluster():
    """One local 2-CPU Ray cluster for the tests that use it.

    Workers inherit the environment of the raylet, which copies this process's at
    `ray.init`: the variables are set just for the start, so later tests here do not see them.
    """
    from pipeline.cluster import init_ray, shutdown_ray

    shutdown_ray()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_API_KEY", SECRET)  # must not reach any file the run writes
        mp.delenv("RAY_ADDRESS", raising=False)  # a local cluster, never someone else's
        init_ray(RayConfig(num_cpus=2))
    try:
        yield
    finally:
        shutdown_ray()


def crash_once(tmp_path: Path) -> CrashOnce:
    # the delay is past Ray Train's poll (0.5 s, pipeline.cluster): the step-4 checkpoint is registered
    return CrashOnce(step=CRASH_STEP, rank=CRASH_RANK, marker=tmp_path / "crashed", delay_s=1.0)


def ray_params(max_failures: int) -> PipelineParams:
    p = tiny_params(steps=8, checkpoint_every=4, num_workers=1, cpus_per_worker=1, max_failures=max_failures)
    return replace(p, "eval", every=2)


def crash_run_spec(tmp_path: Path, name: str, max_failures: int):
    """The RunSpec of a fresh tiny single-worker run."""
    from pipeline.spec import ArtefactPaths, RunSpec

    store = write_tiny_store(tmp_path / "latents")
    return RunSpec(params=ray_params(max_failures), name=name, storage=str(tmp_path / "ray" / "train"),
                   paths=ArtefactPaths(latents=str(store), live=str(tmp_path / "live")))


RAY_GROUP = pytest.mark.xdist_group("ray-local")  # the tests sharing this module's cluster run on one worker


@pytest.mark.slow
@RAY_GROUP
def test_sweep_of_two_worker_trials_restarts_a_killed_worker_from_the_last_checkpoint(ray_cluster, tmp_path, capfd):
    """A real Tune sweep of 2 trials, each a TorchTrainer with 2 CPU workers (DDP over gloo); in
    the first trial to reach step 6, rank 0 dies, and Ray Train restarts the group from step 4.
    Then the sweep runs again as after a kill that lost Tune's record: no trial trains again."""
    from pipeline.spec import ArtefactPaths, train_spec
    from pipeline.sweep import run_sweep

    crash = crash_once(tmp_path)
    store = write_tiny_store(tmp_path / "latents")
    p = update(tiny_params(max_failures=1), {
        "sweep": {"strategies": ["const", "learned"], "targets": ["x0"], "seeds": [0], "steps": 8, "eval_every": 2,
                  "num_workers": 2, "cpus_per_worker": 1}})
    spec = train_spec(p, ArtefactPaths(latents=str(store)), str(tmp_path / "ray" / "sweep"))
    out = run_sweep(spec, tmp_path / "sweep", worker_hooks=crash)
    # the console: a line as each trial ends, and Tune's table once, at the end
    console = capfd.readouterr().out.splitlines()
    assert sum("== Status ==" in line for line in console) == 1
    assert sorted(line.split("sweep: ")[1].split(" (")[0] for line in console if " finished at step " in line) == [
        "const x0 seed 0 finished at step 8", "learned x0 seed 0 finished at step 8"]

    assert crash.marker.read_text() == f"crashed at step {CRASH_STEP} on rank {CRASH_RANK}\n"  # the fault did happen
    with open(out.trials, newline="") as fh:
        trials = {t["strategy"]: t for t in csv.DictReader(fh)}
    assert {s: (int(t["world_size"]), int(t["steps"])) for s, t in trials.items()} == {"const": (2, 8),
                                                                                    "learned": (2, 8)}
    # one trial was picked up at its step-4 checkpoint after the crash, not at 0; the other ran straight
    assert sorted(int(t["resumed_from_step"]) for t in trials.values()) == [0, 4]
    # intra-op threads follow the CPUs Ray assigned (sweep.cpus_per_worker: 1), not the machine's cores
    assert {int(t["torch_threads"]) for t in trials.values()} == {1}
    with open(out.curves, newline="") as fh:
        rows = [(r["strategy"], int(r["step"]), float(r["loss"])) for r in csv.DictReader(fh)]
    # every evaluation once: the step-6 row of the dead attempt was dropped and redone
    assert [(s, k) for s, k, _ in rows] == [(s, k) for s in ("const", "learned") for k in (2, 4, 6, 8)]
    assert all(loss > 0 for _, _, loss in rows)
    # each trial is its own Ray Train run beside the Tune experiment, resumable by its name
    runs = sorted((tmp_path / "ray" / "sweep").glob("sweep-*-runs/*-x0-seed0"))
    assert [r.name for r in runs] == ["const-x0-seed0", "learned-x0-seed0"]
    for run in runs:
        state = max((safe_torch_load(c) for c in run.rglob(CHECKPOINT_FILE)), key=lambda s: s["step"])
        assert state["step"] == 8 and len(state["rng"]) == 2
        assert all(torch.isfinite(v).all() for v in state["ema"].values() if v.is_floating_point())
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert not [p for p in written if SECRET.encode() in p.read_bytes()]

    # Killed after both runs completed but before Tune recorded it (here: Tune's experiment
    # state is gone): the sweep starts both trials again, and each reports the result kept in
    # its folder instead of training. No Ray Train run starts, so no checkpoint is added.
    checkpoints = sorted(str(c) for c in (tmp_path / "ray" / "sweep").rglob(CHECKPOINT_FILE))
    curves, trials_before = out.curves.read_text(), out.trials.read_text()
    tune_state = [d for d in (tmp_path / "ray" / "sweep").glob("sweep-*") if not d.name.endswith("-runs")]
    assert len(tune_state) == 1
    shutil.rmtree(tune_state[0])
    again = run_sweep(spec, tmp_path / "sweep")
    assert sorted(str(c) for c in (tmp_path / "ray" / "sweep").rglob(CHECKPOINT_FILE)) == checkpoints
    assert again.curves.read_text() == curves and again.trials.read_text() == trials_before


@pytest.mark.slow
@RAY_GROUP
def test_killed_ray_worker_without_restarts_fails_clearly_and_keeps_the_checkpoint(ray_cluster, tmp_path):
    from pipeline.errors import PipelineError
    from pipeline.ray_train import TrainingFailedError, fit

    crash = crash_once(tmp_path)
    with pytest.raises(TrainingFailedError) as err:
        fit(crash_run_spec(tmp_path, "crash-fatal", max_failures=0), worker_hooks=crash)
    message = str(err.value)
    assert isinstance(err.value, PipelineError)  # the stage CLI prints it as one line, no traceback
    assert "training run crash-fatal failed after train.max_failures=0 restart(s)" in message
    assert "rerun the stage to resume" in message and str(tmp_path / "ray" / "train" / "crash-fatal") in message
    assert f"rank {CRASH_RANK}: " in message and "\n" not in message
    assert crash.marker.is_file()
    # nothing completed is lost: the step-4 checkpoint is in the run's storage
    run_storage = tmp_path / "ray" / "train" / "crash-fatal"
    assert sorted(int(safe_torch_load(p)["step"]) for p in run_storage.rglob(CHECKPOINT_FILE)) == [4]
    assert curve_steps(tmp_path / "live")[:2] == [2, 4]


def console_lines(capfd, until: str, timeout: float = 15.0) -> list[str]:
    """What reached this process's stdout and stderr, read until `until` appears: Ray forwards
    its workers' output to the driver from a thread of its own."""
    seen, deadline = "", time.time() + timeout
    while until not in seen and time.time() < deadline:
        out, err = capfd.readouterr()
        seen += out + err
        time.sleep(0.2)
    return seen.splitlines()


@pytest.mark.slow
@RAY_GROUP
def test_a_damaged_latest_ray_checkpoint_resumes_from_the_one_before(ray_cluster, tmp_path, capfd):
    """Ray Train keeps two checkpoints: with the latest (step 8) damaged, a rerun of the run with
    more steps resumes from step 4, not from a dead end and not from scratch."""
    from dataclasses import replace as with_fields

    from pipeline.ray_train import fit

    spec = crash_run_spec(tmp_path, "fallback", max_failures=0)  # train.log_every: 2
    fit(spec)
    # the worker's progress lines reach the console once each (Ray Train's print patch doubled
    # them), and Ray Train's line per report ("Reporting training result ...") not at all,
    lines = console_lines(capfd, until="step 8/8")
    assert [line.split(" step ")[1].split()[0] for line in lines if "train[learned] step" in line] == [
        "2/8", "4/8", "6/8", "8/8"]
    assert not [line for line in lines if "Reporting training result" in line]
    # nor the preemption watcher's error-level line (the watcher is off on a local cluster)
    assert not [line for line in lines if "PreemptionWatcher" in line]
    run_storage = tmp_path / "ray" / "train" / "fallback"
    saved = {int(safe_torch_load(c)["step"]): c for c in run_storage.rglob(CHECKPOINT_FILE)}
    assert sorted(saved) == [4, 8]
    raw = bytearray(saved[8].read_bytes())
    raw[len(raw) // 2] ^= 0x01
    saved[8].write_bytes(bytes(raw))
    longer = with_fields(spec, params=update(spec.params, {"train": {"steps": 12}}))
    summary = fit(longer)
    assert summary.metrics["step"] == 12 and summary.metrics["resumed_from_step"] == 4
    assert curve_steps(tmp_path / "live") == [2, 4, 6, 8, 10, 12]


@pytest.mark.slow
@RAY_GROUP
def test_progress_lines_from_several_processes_all_reach_the_console(ray_cluster, capfd):
    """Ray folds lines that differ only in their numbers, from two or more processes, into one
    "[repeated Nx across cluster]" line: two sweep trials' evaluations, or a restarted worker's
    progress after the dead one's, lost their values (pipeline.cluster exempts ours)."""
    import ray

    @ray.remote(num_cpus=0)
    class Printer:
        def say(self, line: str) -> int:
            print(line, flush=True)
            return os.getpid()

    first, second = Printer.remote(), Printer.remote()
    lines = [f"eval[const] step {step}/300  fid_featurenet {fid}" for step, fid in ((100, 123.4), (100, 567.8),
                                                                                  (200, 91.2))]
    pids = {ray.get(first.say.remote(lines[0])), ray.get(second.say.remote(lines[1])),
            ray.get(second.say.remote(lines[2]))}
    assert len(pids) == 2
    console = console_lines(capfd, until=lines[2])
    assert [line for line in lines if any(line in seen for seen in console)] == lines
    assert not [line for line in console if "repeated" in line]


@pytest.mark.slow
@RAY_GROUP
def test_failed_sweep_trials_fail_the_sweep_with_their_error(ray_cluster, tmp_path):
    from pipeline.errors import PipelineError
    from pipeline.spec import ArtefactPaths, train_spec
    from pipeline.sweep import SweepFailedError, run_sweep

    store = write_tiny_store(tmp_path / "latents")
    p = update(tiny_params(max_failures=0), {
        "sweep": {"strategies": ["const", "p2"], "targets": ["x0"], "seeds": [FAILING_SEED], "steps": 4,
                  "eval_every": 2}})
    failing = FailRuns(frozenset({FAILING_TRIAL, f"p2-x0-seed{FAILING_SEED}"}))
    with pytest.raises(SweepFailedError) as err:  # both trials fail at once: none trains before the verdict
        run_sweep(train_spec(p, ArtefactPaths(latents=str(store)), str(tmp_path / "ray" / "sweep")),
                  tmp_path / "sweep", worker_hooks=failing)
    assert isinstance(err.value, PipelineError)  # the stage CLI prints it as one line, no traceback
    assert str(err.value).startswith("2 sweep trial(s) failed; first error: ")
    assert "injected failure in run" in str(err.value)
    assert not (tmp_path / "sweep" / "curves.csv").exists()


def cluster_listeners() -> list[tuple[str, str, int]]:
    """(process name, address, port) of every TCP listener of this process and the Ray processes it started."""
    import psutil

    me = psutil.Process()
    ours = {me.pid: me.name()} | {p.pid: p.name() for p in me.children(recursive=True)}
    return [(ours[c.pid], c.laddr.ip, c.laddr.port) for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.pid in ours]


def is_loopback(ip: str) -> bool:
    import ipaddress

    addr = ipaddress.ip_address(ip)
    return addr.is_loopback or bool(getattr(addr, "ipv4_mapped", None) and addr.ipv4_mapped.is_loopback)


@pytest.mark.slow
@RAY_GROUP
def test_local_ray_cluster_listens_on_loopback_only_and_refuses_a_client_without_its_token(ray_cluster):
    """GCS, raylet, workers, dashboard and agents: a listener on another interface would let anyone
    who reaches this machine submit work to the cluster, which means running code."""
    import ray

    listeners = cluster_listeners()
    names = {name for name, _, _ in listeners}
    assert {"gcs_server", "raylet"} <= names, listeners  # the cluster's own services were found
    assert [entry for entry in listeners if not is_loopback(entry[1])] == []
    gcs = ray.get_runtime_context().gcs_address
    assert gcs.startswith("127.0.0.1:"), gcs
    assert os.environ["RAY_AUTH_MODE"] == "token" and len(os.environ["RAY_AUTH_TOKEN"]) == 64
    # a GCS client on this machine: answered with the cluster's token (the probe works), refused
    # with a wrong token or none
    cluster_id = ray._private.worker.global_worker.node.cluster_id.hex()
    probe = (f"from ray._raylet import GcsClient\n"
             f"client = GcsClient(address={gcs!r}, cluster_id={cluster_id!r})\n"
             f"print('ANSWERED', len(client.internal_kv_keys(b'', None, timeout=5)))")
    outcomes = {}
    for name, auth in {"the cluster's token": {}, "a wrong token": {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64},
                       "no token": {"RAY_AUTH_MODE": "disabled"}}.items():
        env = {k: v for k, v in os.environ.items() if not (auth and k.startswith("RAY_AUTH"))} | auth
        run = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        outcomes[name] = "answered" if "ANSWERED" in run.stdout else (
            "refused" if "InvalidAuthToken" in run.stderr else run.stderr[-300:])
    assert outcomes == {"the cluster's token": "answered", "a wrong token": "refused", "no token": "refused"}


@pytest.mark.slow
@RAY_GROUP
def test_ray_train_ranks_rendezvous_on_loopback_only(ray_cluster, tmp_path):
    """Ray's own torch backend has rank 0 serve torch.distributed's TCPStore on every interface;
    the pipeline's trainer (build_trainer) uses the loopback one on the local cluster."""
    import json

    import ray.train
    from ray.train.torch import TorchTrainer

    from pipeline.loopback_torch import LoopbackTorchConfig
    from pipeline.ray_train import build_trainer

    spec = crash_run_spec(tmp_path, "rendezvous", max_failures=0)
    assert isinstance(build_trainer(spec).backend_config, LoopbackTorchConfig)
    TorchTrainer(record_listeners, train_loop_config={"out": str(tmp_path)},
                 scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                 torch_config=LoopbackTorchConfig(backend="gloo"),
                 run_config=ray.train.RunConfig(name="rendezvous", storage_path=str(tmp_path / "ray"))).fit()
    listening = {rank: json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)}
    assert len(listening[0]) >= 2, listening  # the store and gloo, at least: the probe sees them
    assert {ip for ips in listening.values() for ip in ips if not is_loopback(ip)} == set(), listening


@pytest.mark.slow
@RAY_GROUP
def test_state_api_in_a_worker_finds_its_own_cluster_beside_another_ray_instance(ray_cluster):
    """Ray Train's PlacementGroupCleaner asks the state API whether its controller lives. With a
    second Ray instance on the machine, the state API's search for "the" cluster failed inside
    every worker of a local cluster (pipeline.cluster.pin_cluster_address), and the cleaner died
    with a traceback in the console of each run."""
    import ray
    from ray.util.state import get_actor

    other = subprocess.Popen(
        [sys.executable, "-c", "import sys, ray; ray.init(include_dashboard=False, num_cpus=0, "
         "object_store_memory=80 * 1024 * 1024); print('up', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # loopback only, as ours
        | {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    try:
        assert other.stdout.readline().strip() == "up"

        @ray.remote(num_cpus=0)
        class Alive:
            def ping(self):
                return True

        @ray.remote(num_cpus=0)
        def state_of(actor_id: str) -> str:
            return get_actor(actor_id, timeout=30).state

        actor = Alive.remote()
        ray.get(actor.ping.remote())
        assert ray.get(state_of.remote(actor._actor_id.hex()), timeout=120) == "ALIVE"
    finally:
        other.stdin.close()
        other.wait(timeout=60)


# ---------------------------------------------------------------------------- corrupt inputs

needs_system_fmnist = pytest.mark.skipif(
    not (data.SYSTEM_FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST is not installed ({data.APT_FIX})")


def damage(path: Path, how: str) -> None:
    raw = path.read_bytes()
    if how == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "not gzip":
        path.write_bytes(b"<html>404 Not Found</html>")
    elif how == "empty":
        path.write_bytes(b"")
    else:
        raise ValueError(how)


def copy_fashion_mnist(root: Path) -> Path:
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for name in data.FASHION_MNIST_MD5:
        shutil.copyfile(data.SYSTEM_FASHION_MNIST_DIR / name, raw / name)
    return raw


@needs_system_fmnist
@pytest.mark.parametrize("how", ["truncated", "not gzip", "empty"])
def test_damaged_fashion_mnist_in_data_root_is_named(tmp_path, how):
    raw = copy_fashion_mnist(tmp_path)
    victim = raw / "t10k-images-idx3-ubyte.gz"
    damage(victim, how)
    cfg = DataConfig(root=str(tmp_path), download=False)
    with pytest.raises(DatasetError) as err:
        data.prepare(cfg, system_dir=tmp_path / "no-system-copy")
    assert str(victim) in str(err.value) and "prepare the dataset again" in str(err.value)
    with pytest.raises(DatasetError, match=re.escape(str(victim))):  # reading it unverified fails as clearly
        data.load_arrays(cfg, "test")


@needs_system_fmnist
def test_download_stage_on_a_truncated_file_exits_with_one_line(tmp_path):
    """The library names the file and the fault; the stage adds the command that remakes it,
    from dvc.yaml (the file lies under the download stage's output, data/raw)."""
    raw = copy_fashion_mnist(tmp_path / "data" / "raw")
    damage(raw / "train-labels-idx1-ubyte.gz", "truncated")
    shutil.copyfile(REPO / "dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "params.yaml").write_text(
        params_text(data={"dataset": "fashion_mnist", "root": str(tmp_path / "data" / "raw"), "download": False}))
    proc = subprocess.run([sys.executable, "-m", "stages.download", "--params", "params.yaml"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("download: error: ")
    assert str(raw / "train-labels-idx1-ubyte.gz") in lines[0]
    assert lines[0].endswith(" Rerun the stage that makes it: dvc repro -f download")
    assert not (tmp_path / "data" / "raw" / "manifest.json").exists()


def test_remake_hint_names_the_stage_whose_output_the_message_names(tmp_path, monkeypatch):
    from stages._cli import remake_hint

    monkeypatch.chdir(tmp_path)  # dvc.yaml's relative outs resolve against the repository root
    pipeline = tmp_path / "dvc.yaml"
    pipeline.write_text("stages:\n  encode:\n    outs:\n      - data/latents\n"
                        "  fid_ref:\n    outs:\n      - results/fid_ref\n"
                        "  train:\n    outs:\n      - models/diffusion.pt\n"
                        "      - results/ray/train:\n          persist: true\n")
    hint = " Rerun the stage that makes it: dvc repro -f "
    assert remake_hint(f"{tmp_path}/data/latents/train-00001.npy: truncated", pipeline) == hint + "encode"
    assert remake_hint(f"{tmp_path}/results/ray/train/run: gone", pipeline) == hint + "train"
    # the file named first is the one at fault
    assert remake_hint("results/fid_ref/stats.npz: made from other data than data/latents", pipeline) == \
        hint + "fid_ref"
    assert remake_hint("data/latents_old/x.npy: truncated", pipeline) == ""  # not an output, only a prefix
    assert remake_hint("models/diffusion.pt: not found. Run: dvc repro train", pipeline) == ""  # has its fix


def test_training_refuses_a_truncated_latent_shard_before_any_compute(tmp_path):
    from pipeline.ray_train import run_worker
    from pipeline.spec import ArtefactPaths, RunSpec

    store = write_tiny_store(tmp_path / "latents")
    shard = store / shard_name("train", 1)
    shard.write_bytes(shard.read_bytes()[:300])
    live = tmp_path / "live"
    with pytest.raises(LatentStoreError, match=rf"{re.escape(str(shard))}.*Re-encode the dataset"):
        run_worker(RunSpec(tiny_params(), ArtefactPaths(latents=str(store), live=str(live)), name="t", storage=""),
                   TrainHooks(resume_dir=tmp_path / "ckpt"), progress=False)
    assert not live.exists() and not (tmp_path / "ckpt").exists()


@pytest.mark.slow
@RAY_GROUP
def test_a_damaged_input_stops_a_ray_run_at_once_without_retries(ray_cluster, tmp_path):
    """A corrupt shard fails every attempt the same way: one clear error, no train.max_failures
    restarts (each used to print a traceback), and the advice is the stage that remakes it."""
    from pipeline.ray_train import TrainingFailedError, fit

    spec = crash_run_spec(tmp_path, "bad-input", max_failures=2)
    shard = Path(spec.paths.latents) / shard_name("train", 1)
    shard.write_bytes(shard.read_bytes()[:300])
    attempts = tmp_path / "attempts.txt"
    with pytest.raises(TrainingFailedError) as err:
        fit(spec, worker_hooks=CountAttempts(attempts))
    message = str(err.value)
    assert attempts.read_text().splitlines() == ["bad-input"]  # one attempt, no restart
    assert message.startswith("training run bad-input stopped: LatentStoreError: ") and str(shard) in message
    assert "not retried" in message and "max_failures" not in message and "\n" not in message


# ---------------------------------------------------------------------------- interrupted writes


def save_half_then_fail(real_save):
    """A torch.save that writes the first half of the real bytes, then fails like a full disk."""

    def save(obj, f, *args, **kwargs):
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        Path(f).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        raise OSError(28, "No space left on device")

    return save


def test_interrupted_torch_save_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "model.pt"
    atomic_torch_save({"w": torch.arange(1000.0)}, target)
    monkeypatch.setattr(torch, "save", save_half_then_fail(torch.save))
    with pytest.raises(OSError, match="No space left"):
        atomic_torch_save({"w": torch.zeros(1000)}, target)
    assert torch.equal(safe_torch_load(target)["w"], torch.arange(1000.0))
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temp file left behind


@pytest.mark.parametrize("existed", [True, False])
def test_interrupt_inside_atomic_path_leaves_old_content_or_nothing(tmp_path, existed):
    target = tmp_path / "metrics.json"
    if existed:
        target.write_text('{"fid": 12.5}\n')
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C halfway through a write
        with atomic_path(target) as tmp:
            tmp.write_text('{"fid": ')
            raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == (["metrics.json"] if existed else [])
    if existed:
        assert json.loads(target.read_text()) == {"fid": 12.5}


def test_process_killed_mid_write_keeps_the_previous_file(tmp_path):
    """os._exit skips every cleanup, as SIGKILL or power loss would: the target is untouched."""
    target = tmp_path / "state.pt"
    atomic_torch_save({"step": torch.tensor(4)}, target)
    script = textwrap.dedent(f"""
        import os, torch
        from msdm.io import atomic_path
        with atomic_path({str(target)!r}) as tmp:
            torch.save({{"step": torch.tensor(8), "w": torch.zeros(10000)}}, tmp)
            with open(tmp, "r+b") as fh:
                fh.truncate(os.path.getsize(tmp) // 2)
            os._exit(9)
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, timeout=60)
    assert proc.returncode == 9, proc.stderr
    assert int(safe_torch_load(target)["step"]) == 4
    leftovers = [p.name for p in tmp_path.iterdir() if p != target]
    # the dead process's temp file stays, hidden and never read: no reader opens .*.tmp names
    assert all(n.startswith(".state.pt.") and n.endswith(".tmp") for n in leftovers) and len(leftovers) == 1


def make_latents() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(40, K * C, SIZE, SIZE, generator=g), torch.randint(0, CLASSES, (40,), generator=g)


@pytest.fixture(scope="module")
def latents():
    return make_latents()


def run_tiny(latents, tmp_path, name, **train):
    lat, lab = latents
    return train_loop(replace(tiny_params(**train), "eval", every=3), lat, lab, INFO,
                      hooks=TrainHooks(resume_dir=tmp_path / f"{name}-ckpt"), evaluate=weights_sum,
                      curve=DVCLiveCurve(tmp_path / name), progress=False)


def test_failed_checkpoint_write_loses_no_completed_work(latents, tmp_path, monkeypatch):
    """The step-12 checkpoint write dies half-way: step 6 survives, and resuming gives the straight run."""
    straight = run_tiny(latents, tmp_path, "straight")
    real_save, saves = torch.save, []

    def second_save_fails(obj, f, *args, **kwargs):
        saves.append(f)
        if len(saves) == 2:
            return save_half_then_fail(real_save)(obj, f, *args, **kwargs)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", second_save_fails)
    with pytest.raises(OSError, match="No space left"):
        run_tiny(latents, tmp_path, "cut")
    monkeypatch.setattr(torch, "save", real_save)
    assert int(safe_torch_load(tmp_path / "cut-ckpt" / CHECKPOINT_FILE)["step"]) == 6
    resumed = run_tiny(latents, tmp_path, "cut")
    assert curve_steps(tmp_path / "cut") == [3, 6, 9, 12]
    for a, b in zip(straight.curve, resumed.curve, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["fid"] == pytest.approx(b["fid"], rel=1e-5)


# ---------------------------------------------------------------------------- determinism across processes

# Imports this module by path (tests/ is no package) and runs the same loop as the test below.
DETERMINISM_SCRIPT = """
import importlib.util, json, sys, torch
torch.set_num_threads(1)
spec = importlib.util.spec_from_file_location("reliability", sys.argv[1])
t = importlib.util.module_from_spec(spec)
spec.loader.exec_module(t)
print(json.dumps(t.tiny_run_curve()))
"""


def tiny_run_curve() -> list[dict]:
    lat, lab = make_latents()
    return train_loop(replace(tiny_params(), "eval", every=3), lat, lab, INFO, hooks=TrainHooks(),
                      evaluate=weights_sum, progress=False).curve


def test_same_run_in_two_processes_gives_identical_curves():
    """String hashing (PYTHONHASHSEED) and any other per-process state must not reach the numbers."""
    procs = [subprocess.Popen([sys.executable, "-c", DETERMINISM_SCRIPT, __file__], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONHASHSEED": seed,
                                   "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])})
             for seed in ("1", "2")]
    curves = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-2000:]
        curves.append(json.loads(out.strip().splitlines()[-1]))
    assert [r["step"] for r in curves[0]] == [3, 6, 9, 12]
    assert curves[0] == curves[1]  # bit-identical, not approximately equal
    assert json.loads(json.dumps(tiny_run_curve())) == curves[0]  # and the same as in this process


def test_a_trial_that_completed_before_an_interruption_is_not_trained_again(tmp_path, monkeypatch):
    """Killed after a trial's run completed but before Tune recorded it, a restored sweep
    starts the trial again: it reports the kept result instead of fitting, unless the
    trial's params changed (its run name is a hash of them)."""
    import pipeline.ray_train
    from pipeline.ray_train import RunSummary
    from pipeline.spec import ArtefactPaths, train_spec
    from pipeline.sweep import FINISHED_FILE, _trial, trial_dir

    fits = []

    def fake_fit(spec, **kw):
        fits.append(spec.name)
        return RunSummary(metrics={"step": spec.params.train.steps, "fid": 42.0, "world_size": 1}, checkpoint=None)

    monkeypatch.setattr(pipeline.ray_train, "fit", fake_fit)
    monkeypatch.setattr("ray.tune.integration.ray_train.TuneReportCallback", lambda: None)  # no Tune session here
    store = write_tiny_store(tmp_path / "latents")
    p = update(tiny_params(), {"sweep": {"strategies": ["const"], "targets": ["x0"], "seeds": [0], "steps": 4,
                                         "eval_every": 2}})
    spec = train_spec(p, ArtefactPaths(latents=str(store)), str(tmp_path / "ray"))
    config = {"spec": spec.to_dict(), "out_dir": str(tmp_path / "sweep"), "runs": str(tmp_path / "ray" / "runs"),
              "strategy": "const", "target": "x0", "seed": 0}
    assert _trial(config) is None and len(fits) == 1  # trained, and the completion recorded
    assert (trial_dir(tmp_path / "sweep", "const", "x0", 0) / FINISHED_FILE).is_file()
    kept = _trial(config)  # the restored sweep runs the trial again
    assert len(fits) == 1 and kept["finished_earlier"] is True
    assert kept["fid"] == 42.0 and kept["step"] == 4 and kept["seconds"] >= 0
    longer = update(p, {"sweep": {"steps": 6}})  # another trial: trained
    config["spec"] = train_spec(longer, ArtefactPaths(latents=str(store)), str(tmp_path / "ray")).to_dict()
    assert _trial(config) is None and len(fits) == 2


def test_a_sweep_whose_trial_folders_were_deleted_says_how_to_rerun_them_and_writes_nothing(tmp_path):
    """Tune's record says the trials finished, so a restore runs none of them; a trial folder
    deleted by hand leaves no curve to merge. The sweep names the folder and the fix, and the
    last good curves.csv stays."""
    from types import SimpleNamespace

    from pipeline.live import METRICS_DIR
    from pipeline.sweep import SweepFailedError, collect, trial_dir

    out = tmp_path / "sweep"
    kept = trial_dir(out, "const", "x0", 0) / "live" / METRICS_DIR
    kept.mkdir(parents=True)
    (kept / "fid.tsv").write_text("step\tfid\n2\t50.0\n4\t40.0\n")
    (out / "curves.csv").write_text("the last good curves\n")
    class Grid(list):  # what collect reads of a ResultGrid: its results and where Tune keeps them
        experiment_path = str(tmp_path / "ray" / "sweep-name")

    grid = Grid(SimpleNamespace(config={"strategy": s, "target": "x0", "seed": 0}, metrics={})
                for s in ("const", "dysigma"))
    with pytest.raises(SweepFailedError, match=r"1 trial\(s\) finished in Ray Tune's record but have no curve: "
                                               r".*dysigma-x0-seed0.*Delete the Tune experiment .*sweep-name and rerun"):
        collect(grid, out)
    assert (out / "curves.csv").read_text() == "the last good curves\n"
    assert not (out / "trials.csv").exists()
    collect(grid[:1], out)  # the trial with a curve merges as before
    assert "40.0" in (out / "curves.csv").read_text()
