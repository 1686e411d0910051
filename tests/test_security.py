"""Security: no loader executes a pickled payload, no unsafe load call in the code, the Ray
dashboard stays on loopback, and secrets in the environment never reach outputs or logs."""
from __future__ import annotations

import ast
import json
import os
import pickle
import secrets
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from msdm.config import replace
from pipeline.config import PipelineParams, RayConfig
from pipeline.live import DVCLiveCurve
from msdm.io import (AUTOENCODER_ARTEFACT, DIFFUSION_CHECKPOINT_ARTEFACT, DIFFUSION_MODEL_ARTEFACT,
                     FEATURENET_ARTEFACT, CorruptFileError, atomic_write_json, load_artefact, safe_torch_load,
                     save_artefact)
from msdm.latents import LatentStore, LatentStoreWriter, labels_name, shard_name
from msdm.diffusion_training import CHECKPOINT_FILE, LatentInfo, TrainHooks, train_loop

REPO = Path(__file__).resolve().parents[1]


class RunsCodeOnLoad:
    """Unpickling this calls open(marker, "w"): the file appearing proves the payload ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def payload(tmp_path):
    marker = tmp_path / "payload-ran"
    # control: the payload is live when unpickled without restrictions
    pickle.loads(pickle.dumps(RunsCodeOnLoad(marker))).close()
    assert marker.is_file()
    marker.unlink()
    return RunsCodeOnLoad(marker), marker


# ---------------------------------------------------------------------------- loaders refuse payloads


def tiny_params() -> PipelineParams:
    p = replace(PipelineParams(), "model", preset="vit-tiny", patch_size=2)
    return replace(p, "train", steps=4, batch_size=8, checkpoint_every=2, precision="fp32")


def load_with_safe_torch_load(path: Path) -> None:
    safe_torch_load(path)


def resume_training_from(path: Path) -> None:
    """The train loop's resume path (Ray's hooks hand it the same directory layout). A refused
    checkpoint is passed over with a warning and the run starts from step 0; the warning's
    text is raised here so the test reads the loop's reason."""
    ckpt_dir = path.parent / "resume"
    ckpt_dir.mkdir()
    path.rename(ckpt_dir / CHECKPOINT_FILE)
    g = torch.Generator().manual_seed(0)
    with pytest.warns(RuntimeWarning, match="starting from step 0") as warned:
        train_loop(tiny_params(), torch.randn(16, 6, 4, 4, generator=g), torch.zeros(16, dtype=torch.long),
                   LatentInfo(channels=6, size=4, subspaces=3, num_classes=4), hooks=TrainHooks(resume_dir=ckpt_dir),
                   progress=False)
    raise CorruptFileError(str(warned[0].message))


def load_autoencoder_from(path: Path) -> None:
    from msdm.multispace import load_autoencoder

    load_autoencoder(path)


def load_featurenet_from(path: Path) -> None:
    from msdm.models.featurenet import load_featurenet

    load_featurenet(path)


def export_model_from(path: Path) -> None:
    """The train stage's export of the final Ray checkpoint to models/diffusion.pt."""
    from pipeline.ray_train import export_final_model
    from pipeline.spec import ArtefactPaths, RunSpec

    import ray.train

    (path.parent / CHECKPOINT_FILE).write_bytes(path.read_bytes())
    spec = RunSpec(tiny_params(), ArtefactPaths(latents=str(path.parent)), name="t", storage="")
    export_final_model(spec, ray.train.Checkpoint.from_directory(str(path.parent)), path.parent / "diffusion.pt")


TORCH_LOADERS = {
    "safe_torch_load": (load_with_safe_torch_load, {"model": {"w": torch.ones(2)}}),
    "train resume": (resume_training_from, {"model": {}, "step": 2}),
    "autoencoder": (load_autoencoder_from, {"format": 1, "kind": "multispace", "config": {}, "state_dict": {}}),
    "featurenet": (load_featurenet_from, {"config": {}, "state_dict": {}}),
    "export_final_model": (export_model_from, {"ema": {}, "step": 2}),
}


@pytest.mark.parametrize("name", list(TORCH_LOADERS))
def test_torch_loaders_refuse_a_pickled_payload_without_running_it(name, payload, tmp_path):
    load, contents = TORCH_LOADERS[name]
    obj, marker = payload
    path = tmp_path / "checkpoint.pt"
    torch.save({**contents, "extra": obj}, path)
    with pytest.raises(CorruptFileError) as err:
        load(path)
    assert "weights-only" in str(err.value) and "pickled payload" in str(err.value)
    assert not marker.exists()
    assert not (tmp_path / "fresh-run").exists() and not (tmp_path / "diffusion.pt").exists()


@pytest.mark.parametrize("victim", ["shard", "labels"])
def test_latent_store_refuses_pickled_arrays(victim, payload, tmp_path):
    obj, marker = payload
    store = tmp_path / "latents"
    with LatentStoreWriter(store, subspaces=1, channels=2, num_classes=2, codec_kind="multispace") as writer:
        writer.write_split("train", [torch.zeros(4, 2, 4, 4)], torch.zeros(4, dtype=torch.long))
    path = store / (shard_name("train", 0) if victim == "shard" else labels_name("train"))
    np.save(path, np.array([obj] * 4, dtype=object), allow_pickle=True)
    with pytest.raises(CorruptFileError, match=str(path)):
        LatentStore(store).load("train")
    assert not marker.exists()


def test_fid_reference_stats_refuse_pickled_arrays(payload, tmp_path):
    from msdm.metrics import load_stats

    obj, marker = payload
    path = tmp_path / "stats.npz"
    np.savez(path, mu=np.array([obj], dtype=object), sigma=np.eye(2))
    with pytest.raises(CorruptFileError, match=str(path)):
        load_stats(path)
    assert not marker.exists()


# ---------------------------------------------------------------------------- static check of every load call

YAML_UNSAFE = {"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load", "full_load_all"}


def _is_const(node: ast.AST | None, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _kwarg(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def unsafe_load_calls(source: str, filename: str, *, library: bool) -> list[str]:
    """Every call that could unpickle untrusted data, as 'file:line: what'.

    `library` (non-test code) also forbids raw pickle.load(s); tests use pickle to build payloads.
    """
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "yaml", "numpy", "pickle"):
            for alias in node.names:
                if alias.name in {"load", "loads", *YAML_UNSAFE}:
                    found.append(f"{where}: from {node.module} import {alias.name} (hides the call from review)")
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        attr, owner = node.func.attr, node.func.value
        owner_name = owner.id if isinstance(owner, ast.Name) else ""
        if owner_name == "torch" and attr == "load" and not _is_const(_kwarg(node, "weights_only"), True):
            found.append(f"{where}: torch.load without weights_only=True")
        elif attr == "load_state_dict_from_url" and not _is_const(_kwarg(node, "weights_only"), True):
            found.append(f"{where}: load_state_dict_from_url without weights_only=True")
        elif owner_name == "yaml" and attr in YAML_UNSAFE:
            found.append(f"{where}: yaml.{attr} (use yaml.safe_load)")
        elif owner_name in ("np", "numpy") and attr == "load" and not (
                _kwarg(node, "allow_pickle") is None or _is_const(_kwarg(node, "allow_pickle"), False)):
            found.append(f"{where}: np.load with allow_pickle other than False")
        elif library and owner_name == "pickle" and attr in ("load", "loads"):
            found.append(f"{where}: pickle.{attr} (unrestricted unpickling)")
    return sorted(found, key=lambda f: int(f.split(":")[1]))


def test_checker_flags_each_unsafe_pattern():
    bad = ("torch.load(p)\ntorch.load(p, weights_only=False)\nyaml.load(s)\nnp.load(p, allow_pickle=True)\n"
           "numpy.load(p, allow_pickle=flag)\npickle.loads(b)\nfrom torch import load\n"
           "torch.hub.load_state_dict_from_url(u)\n")
    assert [f.split(": ", 1)[0] for f in unsafe_load_calls(bad, "x.py", library=True)] == [
        f"x.py:{i}" for i in range(1, 9)]
    good = ("torch.load(p, map_location='cpu', weights_only=True)\nyaml.safe_load(s)\nnp.load(p)\n"
            "np.load(p, mmap_mode='r', allow_pickle=False)\npickle.dumps(x)\n")
    assert unsafe_load_calls(good, "y.py", library=True) == []
    assert unsafe_load_calls("pickle.loads(b)\n", "tests/t.py", library=False) == []


def repo_python_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z", "--", "*.py"],
                            cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    return [REPO / rel for rel in listed if rel and (REPO / rel).is_file()]


def test_no_unsafe_load_call_in_the_repo():
    files = repo_python_files()
    assert {"msdm/io.py", "msdm/latents.py", "pipeline/cluster.py"} <= {str(p.relative_to(REPO)) for p in files}
    found = [f for path in files
             for f in unsafe_load_calls(path.read_text(), str(path.relative_to(REPO)),
                                        library=path.relative_to(REPO).parts[0] != "tests")]
    assert found == []


# ---------------------------------------------------------------------------- Ray dashboard


@pytest.fixture
def captured_ray_init(monkeypatch):
    """Replace ray.init with a recorder: checks init_ray's arguments without starting a cluster."""
    import ray

    from ray._private import ray_constants

    calls: list[dict] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    # init_ray sets these for the cluster it starts: restored after the test
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", True)
    return ray, calls


def test_local_cluster_binds_the_dashboard_to_loopback(captured_ray_init, monkeypatch):
    from pipeline.cluster import init_ray

    ray, calls = captured_ray_init
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    init_ray(RayConfig())
    assert len(calls) == 1
    assert calls[0]["include_dashboard"] is True and calls[0]["dashboard_host"] == "127.0.0.1"
    # every other service too (Ray's single-machine switch), and token auth with a fresh token
    from ray._private import ray_constants

    assert os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0" and ray_constants.ENABLE_RAY_CLUSTER is False
    assert os.environ["RAY_AUTH_MODE"] == "token" and len(os.environ["RAY_AUTH_TOKEN"]) == 64


def test_a_user_set_auth_mode_and_a_real_cluster_are_left_alone(captured_ray_init, monkeypatch):
    from pipeline.cluster import init_ray

    ray, calls = captured_ray_init
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    init_ray(RayConfig())
    assert os.environ["RAY_AUTH_MODE"] == "disabled" and "RAY_AUTH_TOKEN" not in os.environ
    monkeypatch.delenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    init_ray(RayConfig(address="ray://head:10001"))
    assert calls[-1] == {"address": "ray://head:10001", "log_to_driver": True}
    assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in os.environ


def test_without_dashboard_packages_the_dashboard_is_off(captured_ray_init, monkeypatch):
    from pipeline.cluster import init_ray

    ray, calls = captured_ray_init

    def init(**kw):
        calls.append(kw)
        if len(calls) == 1:
            raise Exception("Cannot include dashboard with missing packages, include ray[default]")

    monkeypatch.setattr(ray, "init", init)
    init_ray(RayConfig())
    assert [c["include_dashboard"] for c in calls] == [True, False]
    assert all(c["dashboard_host"] == "127.0.0.1" for c in calls)


# ---------------------------------------------------------------------------- secrets


class RecordingHooks(TrainHooks):
    def __init__(self, resume_dir: Path):
        super().__init__(resume_dir=resume_dir)
        self.metrics: list[dict] = []

    def report(self, metrics, checkpoint_dir):
        self.metrics.append(dict(metrics))
        super().report(metrics, checkpoint_dir)


def test_secrets_in_the_environment_reach_no_output(tmp_path, monkeypatch, capfd):
    secret_values = {name: f"{name.lower()}-{secrets.token_hex(16)}"
                     for name in ("WANDB_API_KEY", "HF_TOKEN", "AWS_SECRET_ACCESS_KEY")}
    for name, value in secret_values.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "run"
    hooks = RecordingHooks(out / "checkpoint")
    g = torch.Generator().manual_seed(0)
    result = train_loop(replace(tiny_params(), "eval", every=2), torch.randn(16, 6, 4, 4, generator=g),
                        torch.zeros(16, dtype=torch.long), LatentInfo(channels=6, size=4, subspaces=3, num_classes=4),
                        hooks=hooks, curve=DVCLiveCurve(out / "live"), progress=True)
    atomic_write_json({**hooks.metrics[-1], "images_per_second": result.images_per_second}, out / "metrics.json")
    written = sorted(p for p in out.rglob("*") if p.is_file())
    assert {p.name for p in written} >= {"state.pt", "loss.tsv", "metrics.json"}  # checkpoint, DVCLive, stage
    assert json.loads((out / "metrics.json").read_text())["step"] == 4
    state = safe_torch_load(out / "checkpoint" / CHECKPOINT_FILE)
    logs = capfd.readouterr()
    for value in secret_values.values():
        for path in written:
            assert value.encode() not in path.read_bytes(), path
        assert value not in repr(state)
        assert value not in logs.out and value not in logs.err


# ---------------------------------------------------------------------------- artefact records


def flip_a_weight_byte(path: Path, weight: torch.Tensor) -> None:
    """Flip one bit inside the stored bytes of `weight` (found by its content): the zip
    container and torch.load do not notice."""
    raw = bytearray(path.read_bytes())
    at = raw.find(weight.numpy().tobytes()[:64])
    assert at > 0
    raw[at + 32] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("kind", [AUTOENCODER_ARTEFACT, FEATURENET_ARTEFACT, DIFFUSION_CHECKPOINT_ARTEFACT,
                                  DIFFUSION_MODEL_ARTEFACT])
def test_a_flipped_byte_in_a_model_or_checkpoint_is_refused(tmp_path, kind):
    weight = torch.linspace(-1, 1, 4096)
    path = tmp_path / "artefact.pt"
    save_artefact({"state_dict": {"w": weight}, "step": 3}, path, kind)
    assert torch.equal(load_artefact(path, kind)["state_dict"]["w"], weight)
    flip_a_weight_byte(path, weight)
    assert not torch.equal(safe_torch_load(path)["state_dict"]["w"], weight)  # torch alone loads it
    with pytest.raises(CorruptFileError, match=r"artefact.pt: content does not match the SHA-256"):
        load_artefact(path, kind)


def test_a_file_of_another_kind_is_refused_by_name(tmp_path):
    """models/autoencoder.pt copied over models/diffusion.pt: named, not a KeyError deep inside."""
    from msdm.models.featurenet import FeatureNet, load_featurenet, save_featurenet
    from msdm.multispace import load_autoencoder

    featurenet = tmp_path / "featurenet.pt"
    save_featurenet(FeatureNet(1, 4, feature_dim=8), featurenet)
    with pytest.raises(CorruptFileError, match=r"featurenet.pt: holds a 'featurenet' artefact, expected 'autoencoder'"):
        load_autoencoder(featurenet)
    with pytest.raises(CorruptFileError, match=r"holds a 'featurenet' artefact, expected 'diffusion model'"):
        load_artefact(featurenet, DIFFUSION_MODEL_ARTEFACT)
    foreign = tmp_path / "foreign.pt"
    torch.save({"config": {}, "state_dict": {}}, foreign)  # right keys, but no record: not ours
    with pytest.raises(CorruptFileError, match=r"foreign.pt: not a pipeline artefact of kind 'featurenet'"):
        load_featurenet(foreign)
    assert load_featurenet(featurenet).config["feature_dim"] == 8
