"""The scale-up path (issue 8): SD-VAE codec, ADM/Inception FID inputs, dataset gaps, multi-node
trainer config, W&B tracking, dataset presets, and the training dry run. All offline."""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from msdm import data
from msdm.codec import (SD_VAE_SCALE, CodecError, SdVaeCodec, load_codec, load_pretrained_vae, save_sd_vae,
                        sd_vae_codec)
from msdm.config import AutoencoderConfig, ConfigError, Params, params_from_dict, replace, to_dict, update
from msdm.io import safe_torch_load
from pipeline.config import PipelineParams, load_params

REPO = Path(__file__).resolve().parents[1]
# stabilityai/sd-vae-ft-mse's config.json (scaling_factor is diffusers' default, 0.18215)
SD_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=256, layers_per_block=2,
                     block_out_channels=[128, 256, 512, 512], norm_num_groups=32, act_fn="silu",
                     down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)


def write_image(path: Path, width: int, height: int, color) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:] = color
    pixels[: height // 2, : width // 2] = 255 - np.asarray(color)  # structure for the VAE and the crop checks
    Image.fromarray(pixels).save(path)


def rgb_images(n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


# ---------------------------------------------------------------------------- 1. SD-VAE codec


@pytest.fixture(scope="module")
def sd_vae_dir(tmp_path_factory):
    """A randomly initialised AutoencoderKL of sd-vae-ft-mse's architecture, saved as a diffusers folder."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**SD_VAE_CONFIG)
    folder = tmp_path_factory.mktemp("sd-vae-ft-mse")
    vae.save_pretrained(folder)
    return folder


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def sd_vae(sd_vae_dir):
    """The saved folder loaded back once (offline) through msdm.codec; tests only read it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return load_pretrained_vae(str(sd_vae_dir))


def sd_cfg(path, subspaces: int = 2, channels: int = 2, downsample: int = 8) -> AutoencoderConfig:
    return AutoencoderConfig(kind="sd-vae", path=str(path), subspaces=subspaces, channels=channels,
                             downsample=downsample)


def test_sd_vae_codec_encodes_the_scaled_posterior_mean_and_decodes_by_the_scale(sd_vae, sd_vae_dir):
    vae = sd_vae
    assert sum(p.numel() for p in vae.parameters()) == 83_653_863  # the real SD VAE's size
    codec = sd_vae_codec(sd_cfg(sd_vae_dir), vae, image_channels=3, source=str(sd_vae_dir))
    assert (codec.kind, codec.subspaces, codec.channels, codec.downsample) == ("sd-vae", 2, 2, 8)
    assert codec.scaling_factor == SD_VAE_SCALE == 0.18215
    x = rgb_images()
    z = codec.encode(x)
    assert z.shape == (2, 4, 4, 4)
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        torch.testing.assert_close(z, posterior.mean * 0.18215)
        assert not torch.allclose(z, posterior.sample() * 0.18215)  # the mean, not a sample
        expected = vae.decode(z / 0.18215).sample.clamp(-1, 1)
    torch.testing.assert_close(codec.decode(z), expected)
    assert codec.decode(z * 50).abs().max() <= 1  # clamped to valid images


def test_sd_vae_codec_handles_grey_images_and_refuses_a_bad_split(sd_vae, sd_vae_dir):
    vae = sd_vae
    grey = rgb_images(2)[:, :1]
    codec = SdVaeCodec(vae, subspaces=4, image_channels=1)
    z = codec.encode(grey)
    torch.testing.assert_close(z, codec.encode(grey.expand(-1, 3, -1, -1)))  # grey -> RGB copies
    assert codec.channels == 1 and codec.decode(z).shape == (2, 1, 32, 32)
    with pytest.raises(CodecError, match="subspaces: 3 does not divide the 4 latent channels"):
        SdVaeCodec(vae, subspaces=3)
    with pytest.raises(CodecError, match="autoencoder.channels: 4.*set autoencoder.channels: 2"):
        sd_vae_codec(sd_cfg(sd_vae_dir, channels=4), vae, 3, "x")
    with pytest.raises(CodecError, match="downsamples by 8; set autoencoder.downsample: 8"):
        sd_vae_codec(sd_cfg(sd_vae_dir, downsample=4), vae, 3, "x")


def test_sd_vae_path_errors_name_the_key_and_the_fix(tmp_path, offline):
    with pytest.raises(CodecError, match=r"autoencoder.path: .*absent is not a folder.*huggingface-cli download"):
        load_pretrained_vae(str(tmp_path / "absent"))
    with pytest.raises(CodecError, match="has no config.json"):
        load_pretrained_vae(str(tmp_path))


def test_imported_sd_vae_file_round_trips_weights_only_and_is_checked_against_params(sd_vae, sd_vae_dir,
                                                                                     tmp_path, offline):
    from msdm.multispace import MultiSpaceAutoencoder, save_autoencoder

    source = str(sd_vae_dir)
    codec = sd_vae_codec(sd_cfg(sd_vae_dir), sd_vae, 3, source)
    path = tmp_path / "autoencoder.pt"
    save_sd_vae(codec, path)
    payload = safe_torch_load(path)  # weights_only=True
    assert payload["kind"] == "sd-vae" and payload["source"] == source
    assert payload["config"]["block_out_channels"] == [128, 256, 512, 512]
    loaded = load_codec(sd_cfg(sd_vae_dir), path)
    x = rgb_images(1, 16, seed=3)
    assert torch.equal(loaded.encode(x), codec.encode(x))
    with pytest.raises(CodecError, match="Re-import it from autoencoder.path"):
        load_codec(sd_cfg("other/vae"), path)
    multispace = tmp_path / "multispace.pt"
    save_autoencoder(MultiSpaceAutoencoder(1, 2, 2, 4, [8, 16], 2), multispace)
    with pytest.raises(CodecError, match="holds a 'multispace' autoencoder, but autoencoder.kind is 'sd-vae'"):
        load_codec(sd_cfg(sd_vae_dir), multispace)


def make_imagenet(root: Path) -> None:
    """ILSVRC folders: 2 classes, 3 train and 2 val images of different sizes."""
    write_image(root / "imagenet/train/n01440764/a.JPEG", 24, 16, (200, 30, 30))
    write_image(root / "imagenet/train/n01443537/b.JPEG", 16, 16, (30, 200, 30))
    write_image(root / "imagenet/train/n01443537/c.JPEG", 20, 32, (30, 30, 200))
    write_image(root / "imagenet/val/n01440764/d.JPEG", 16, 16, (120, 120, 30))
    write_image(root / "imagenet/val/n01443537/e.JPEG", 16, 16, (30, 120, 120))


def test_autoencoder_and_encode_stages_with_sd_vae(sd_vae_dir, tmp_path, monkeypatch, offline):
    """kind sd-vae end to end: the autoencoder stage imports, encode streams an ImageNet folder."""
    from msdm.latents import LatentStore
    from stages import autoencoder as ae_stage
    from stages import encode as encode_stage

    make_imagenet(tmp_path / "datasets")
    raw = to_dict(PipelineParams())
    raw["data"].update(dataset="imagenet", root=str(tmp_path / "datasets"), image_size=16, download=False)
    raw["autoencoder"].update(kind="sd-vae", path=str(sd_vae_dir), subspaces=2, channels=2, downsample=8)
    raw["encode"].update(batch_size=2, shard_size=2)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)

    assert ae_stage.main([]) == 0
    payload = safe_torch_load("models/autoencoder.pt")
    assert payload["kind"] == "sd-vae" and payload["source"] == str(sd_vae_dir)
    metrics = json.loads(Path("metrics/autoencoder.json").read_text())
    assert metrics["num_images"] == 2 and metrics["kind"] == "sd-vae" and metrics["params"] == 83_653_863
    assert 0 < metrics["psnr"] < 60 and -1 <= metrics["ssim"] <= 1
    assert Image.open("plots/reconstructions.png").size[0] > 2 * 16

    assert encode_stage.main([]) == 0
    store = LatentStore("data/latents")
    assert store.meta["autoencoder_kind"] == "sd-vae" and store.latent_shape == (4, 2, 2)
    assert (store.subspaces, store.channels, store.num_classes) == (2, 2, 1000)
    z, labels = store.load("train", normalized=False)
    assert labels.tolist() == [0, 1, 1] and store.num_examples("test") == 2
    assert len(store.meta["splits"]["train"]["shards"]) == 2  # shard_size 2: shards of 2 and 1
    codec = load_codec(params_from_dict(raw, PipelineParams).autoencoder, "models/autoencoder.pt")
    first = data.load_split(params_from_dict(raw, PipelineParams).data, "train")[0][0]
    torch.testing.assert_close(z[:1], codec.encode(first[None]), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------- 2. FID inputs


def test_fid_ref_stage_takes_adm_reference_batch_offline(tmp_path, monkeypatch):
    """ADM's VIRTUAL_imagenet*.npz (arr_0 images + mu/sigma + spatial stats) as fid.reference_stats."""
    from stages import fid_ref

    def refuse(*args, **kwargs):
        raise AssertionError("tried to download Inception weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    rng = np.random.default_rng(0)
    mu = rng.normal(size=2048).astype(np.float32)
    a = rng.normal(size=(2048, 8)).astype(np.float32)
    sigma = a @ a.T + np.eye(2048, dtype=np.float32)
    adm = tmp_path / "VIRTUAL_imagenet512.npz"
    np.savez(adm, arr_0=rng.integers(0, 256, size=(4, 8, 8, 3), dtype=np.uint8), mu=mu, sigma=sigma,
             mu_s=np.zeros(7, np.float32), sigma_s=np.eye(7, dtype=np.float32))
    raw = to_dict(PipelineParams())
    raw["fid"].update(extractor="inception-v3-compat", reference_stats=str(adm))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    assert fid_ref.main([]) == 0
    with np.load("results/fid_ref/stats.npz") as stats:
        np.testing.assert_array_equal(stats["mu"], mu.astype(np.float64))
        np.testing.assert_array_equal(stats["sigma"], sigma.astype(np.float64))
        assert str(stats["extractor"]) == "inception-v3-compat"
    info = json.loads(Path("results/fid_ref/stats.json").read_text())
    assert info == {**info, "metric": "fid_inception", "num_images": None, "feature_dim": 2048, "source": str(adm)}


def test_paper_scale_presets_measure_inception_fid_50k():
    for name in ("imagenet256", "imagenet512"):
        p = preset_over_defaults(name)
        assert p.fid.extractor == "inception-v3-compat" and p.eval.final_num_samples == 50_000
        assert Path(p.fid.reference_stats).name.startswith(f"VIRTUAL_{name}")


# ---------------------------------------------------------------------------- 3. datasets (gaps)


CELEBA_ANNOTATIONS = {
    "identity_CelebA.txt": (None, lambda i: f"{i}"),
    "list_bbox_celeba.txt": ("image_id x_1 y_1 width height", lambda i: "95 71 226 313"),
    "list_landmarks_align_celeba.txt": ("lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x "
                                        "leftmouth_y rightmouth_x rightmouth_y",
                                        lambda i: "69 109 106 113 77 142 73 152 108 154"),
    "list_attr_celeba.txt": ("5_o_Clock_Shadow Arched_Eyebrows", lambda i: "-1 1"),
}


def write_tiny_celeba(root: Path, partitions: list[int]) -> None:
    """The aligned CelebA layout: 178x218 JPEGs and the space-separated annotation files."""
    base = root / "celeba"
    (base / "img_align_celeba").mkdir(parents=True)
    names = [f"{i + 1:06d}.jpg" for i in range(len(partitions))]
    for i, name in enumerate(names):
        pixels = np.zeros((218, 178, 3), dtype=np.uint8)  # black border, 140x140 center of 40*(i+1)
        pixels[39:179, 19:159] = 40 * (i + 1)
        Image.fromarray(pixels).save(base / "img_align_celeba" / name, quality=100)
    (base / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, p in zip(names, partitions)))
    for filename, (header, row) in CELEBA_ANNOTATIONS.items():
        lines = [] if header is None else [f"{len(names)}", header]
        lines += [f"{n} {row(i)}" for i, n in enumerate(names)]
        (base / filename).write_text("\n".join(lines) + "\n")


def test_celeba_loader_reads_the_real_layout_crops_and_splits(tmp_path, monkeypatch):
    from torchvision.datasets import CelebA

    # The tiny files cannot match the published MD5s that torchvision checks on construction.
    monkeypatch.setattr(CelebA, "_check_integrity", lambda self: True)
    write_tiny_celeba(tmp_path, partitions=[0, 0, 2, 1, 2])  # (torchvision fails on a 1-image split)
    cfg = data.DataConfig(dataset="celeba", root=str(tmp_path), image_size=16)
    train, test = data.load_split(cfg, "train"), data.load_split(cfg, "test")
    assert len(train) == 2 and len(test) == 2  # partition 1 (valid) is in neither
    x, label = test[0]
    assert x.shape == (3, 16, 16) and label == 0 and data.num_classes(cfg) == 1
    # The 140 center crop removes the black border: 000003.jpg's crop is a flat 120.
    assert abs(float(data.to_uint8(x).float().mean()) - 120) < 3
    assert abs(float(data.to_uint8(train[1][0]).float().mean()) - 80) < 3


@pytest.mark.skipif(importlib.util.find_spec("lmdb") is not None,
                    reason="lmdb is installed: the missing-package message cannot be shown")
def test_lsun_lmdb_without_the_lmdb_package_says_how_to_fix(tmp_path):
    lmdb_dir = tmp_path / "lsun_church" / "church_outdoor_train_lmdb"
    lmdb_dir.mkdir(parents=True)
    (lmdb_dir / "data.mdb").write_bytes(b"\0" * 64)
    cfg = data.DataConfig(dataset="lsun_church", root=str(tmp_path), image_size=8)
    assert data.prepare(cfg) == tmp_path / "lsun_church"
    with pytest.raises(data.DatasetError, match="pip install lmdb, or export the images"):
        data.load_split(cfg, "train")


# ---------------------------------------------------------------------------- 4. multi-node


def test_trainer_takes_cluster_storage_and_worker_counts_from_params(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # stage_storage writes its pointer files under results/ray
    from pipeline.ray_train import build_trainer
    from pipeline.spec import ArtefactPaths, stage_storage, train_spec

    p = update(PipelineParams(), {"train": {"num_workers": 16, "use_gpu": True, "precision": "fp16", "batch_size": 256,
                                            "cpus_per_worker": 6},
                                  "sweep": {"use_gpu": True},
                                  "ray": {"address": "auto", "storage_path": "s3://bucket/msdm"}})
    spec = train_spec(p, ArtefactPaths(latents="data/latents"), stage_storage(p, "train"))
    trainer = build_trainer(spec)
    assert trainer.run_config.storage_path == "s3://bucket/msdm/train"  # a URI is passed through untouched
    assert trainer.run_config.name == spec.name and spec.name.startswith("train-")
    sc = trainer.scaling_config
    assert (sc.num_workers, sc.use_gpu, sc.resources_per_worker) == (16, True, {"CPU": 6, "GPU": 1})
    assert trainer.train_loop_config["spec"]["paths"]["latents"] == str(Path("data/latents").resolve())
    nfs = replace(p, "ray", storage_path="mnt/nfs/ray")
    # absolute for every node, and the declared results/ray/train names the real location
    assert stage_storage(nfs, "train") == str(Path("mnt/nfs/ray/train").resolve())
    assert (tmp_path / "results/ray/train/STORAGE_LOCATION.txt").read_text() == "mnt/nfs/ray/train\n"


# ---------------------------------------------------------------------------- 5. tracking


class FakeRun:
    def __init__(self, **kwargs):
        self.init_kwargs, self.logged, self.finished = kwargs, [], None

    def log(self, metrics, step):
        self.logged.append((step, dict(metrics)))

    def finish(self, exit_code=0):
        self.finished = exit_code


@pytest.fixture
def fake_wandb(monkeypatch):
    """wandb as Ray's integration module sees it: `init` records the run it opens."""
    import ray.air.integrations.wandb as ray_wandb

    module = types.ModuleType("wandb")
    module.runs = []

    def init(**kwargs):
        module.runs.append(FakeRun(**kwargs))
        return module.runs[-1]

    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.setattr(ray_wandb, "wandb", module)
    for name in ("WBValue", "Image", "Video"):  # the types Ray's config cleaner checks against
        monkeypatch.setattr(ray_wandb, name, type(name, (), {}), raising=False)
    for name in ("WANDB_MODE", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    return module


def tracking(wandb: bool = True, mode: str = "offline"):
    return types.SimpleNamespace(tracking=types.SimpleNamespace(wandb=wandb, project="msdm-test", mode=mode))


def test_tracking_is_off_by_default_and_never_imports_wandb(monkeypatch):
    from pipeline.tracking import check_tracking, sweep_callbacks, wandb_run

    monkeypatch.setitem(sys.modules, "wandb", None)  # any import of wandb would raise ImportError
    for params in (Params(), PipelineParams(), tracking(wandb=False)):  # library params have no tracking section
        check_tracking(params)
        assert wandb_run(params, run_name="train-x", config={}) is None
        assert sweep_callbacks(params, group="sweep-x") == []


def test_tracking_on_without_wandb_is_a_clear_error(monkeypatch):
    from pipeline.tracking import TrackingError, check_tracking

    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(TrackingError, match=r"pip install wandb==0\.31\.0.*tracking\.wandb: false"):
        check_tracking(tracking())
    with pytest.raises(ConfigError, match="tracking.mode: got 'cloud'"):
        update(PipelineParams(), {"tracking": {"wandb": True, "mode": "cloud"}})


def test_train_opens_its_wandb_run_through_rays_setup_wandb_offline(fake_wandb, tmp_path):
    import os
    import subprocess

    from pipeline.tracking import DEFAULT_DIR, wandb_run

    run = wandb_run(tracking(), run_name="train-ab", config={"train": {"lr": 1e-4}}, directory=tmp_path / "wandb")
    assert fake_wandb.runs == [run]
    kwargs = run.init_kwargs
    assert {k: kwargs[k] for k in ("project", "name", "id", "resume", "mode", "dir", "job_type")} == {
        "project": "msdm-test", "name": "train-ab", "id": "train-ab", "resume": "allow", "mode": "offline",
        "dir": str(tmp_path / "wandb"), "job_type": "train"}
    assert kwargs["config"] == {"train": {"lr": 1e-4}}
    # offline is set where Ray's integration reads it, so it never asks for an API key
    assert os.environ["WANDB_MODE"] == "offline" and (tmp_path / "wandb").is_dir()
    # DVC experiments commit untracked files; the W&B run folder must be ignored by git.
    ignored = subprocess.run(["git", "check-ignore", "-q", str(DEFAULT_DIR / "run-x" / "files")], cwd=REPO)
    assert ignored.returncode == 0


def test_sweep_logs_each_trial_through_tunes_wandb_logger_callback(fake_wandb, tmp_path, monkeypatch):
    from ray.air.integrations.wandb import WandbLoggerCallback

    from pipeline.tracking import sweep_callbacks

    monkeypatch.chdir(tmp_path)
    (callback,) = sweep_callbacks(tracking(), group="sweep-ab", directory=Path("wandb"))
    assert isinstance(callback, WandbLoggerCallback)
    assert (callback.project, callback.group) == ("msdm-test", "sweep-ab")
    # absolute: Tune's logging actors do not run in the driver's folder
    assert callback.kwargs == {"mode": "offline", "dir": str((tmp_path / "wandb").resolve()), "job_type": "sweep-trial"}


def test_run_worker_logs_every_row_to_the_wandb_run(tmp_path):
    from msdm.latents import write_latents
    from msdm.diffusion_training import TrainHooks
    from pipeline.ray_train import run_worker
    from pipeline.spec import ArtefactPaths, RunSpec

    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(24, 4, 4, 4, generator=g), torch.randint(0, 3, (24,), generator=g)
    write_latents(tmp_path / "latents", {"train": ([z], y)}, subspaces=2, channels=2, num_classes=3,
                  codec_kind="sd-vae")
    p = replace(Params(), "model", preset="vit-tiny", patch_size=2)
    p = replace(p, "weighting", strategy="const")
    p = update(p, {"train": {"steps": 4, "batch_size": 4, "checkpoint_every": 2, "precision": "fp32"},
                   "eval": {"every": 2}})
    run = FakeRun()
    spec = RunSpec(p, ArtefactPaths(latents=str(tmp_path / "latents")), name="t", storage="")
    result = run_worker(spec, TrainHooks(), progress=False, wandb=run)
    assert result.step == 4
    assert [step for step, _ in run.logged] == [2, 4]
    for (step, logged), row in zip(run.logged, result.curve, strict=True):
        numbers = {k: v for k, v in row.items() if k != "step" and np.isfinite(v)}
        assert logged == pytest.approx(numbers) and "mse_space1" in logged


# ---------------------------------------------------------------------------- presets


PRESETS = ("cifar10", "celeba64", "lsun_bedroom256", "lsun_church256", "imagenet256", "imagenet512")


def preset_over_defaults(name: str) -> Params:
    from pipeline.presets import preset_params

    return preset_params(REPO / "configs" / f"{name}.yaml", load_params(REPO / "params.yaml"))


def test_every_dataset_has_a_valid_preset():
    from pipeline.presets import available_presets

    # every file is a dataset preset, except the two study profiles (the CPU one: same data, longer sweep)
    assert sorted(Path(p).stem for p in available_presets(REPO / "configs")) == sorted((*PRESETS, "study", "gpu_study"))
    assert preset_over_defaults("study").data == load_params(REPO / "params.yaml").data
    datasets = {name: preset_over_defaults(name).data for name in PRESETS}
    assert {d.dataset for d in datasets.values()} == {"cifar10", "celeba", "lsun_bedroom", "lsun_church", "imagenet"}
    assert [datasets[n].image_size for n in PRESETS] == [32, 64, 256, 256, 256, 512]


def test_gpu_study_is_the_cpu_studys_grid_at_paper_scale_on_gpus():
    gpu, cpu = preset_over_defaults("gpu_study"), preset_over_defaults("study")
    assert (gpu.sweep.strategies, gpu.sweep.targets, gpu.sweep.seeds) == \
           (cpu.sweep.strategies, cpu.sweep.targets, cpu.sweep.seeds)
    assert (gpu.data.dataset, gpu.data.image_size, gpu.fid.extractor) == ("cifar10", 32, "inception-v3-compat")
    assert gpu.sweep.use_gpu and gpu.sweep.preset == "vit-b" and gpu.sweep.steps >= 10_000
    assert gpu.autoencoder == preset_over_defaults("cifar10").autoencoder  # the cifar10 preset's latents


def test_imagenet256_preset_is_the_min_snr_vit_b_recipe():
    p = preset_over_defaults("imagenet256")
    t = p.train
    assert (t.lr, t.betas, t.weight_decay, t.batch_size, t.ema_decay, t.precision) == \
           (1e-4, [0.99, 0.99], 0.03, 256, 0.9999, "fp16")
    assert (p.diffusion.target, p.diffusion.schedule, p.weighting.strategy, p.weighting.gamma) == \
           ("x0", "cosine", "min_snr", 5.0)
    assert (p.model.preset, p.model.patch_size, p.model.label_dropout, p.autoencoder.kind) == \
           ("vit-b", 2, 0.15, "sd-vae")
    c = preset_over_defaults("cifar10")
    assert (c.weighting.strategy, c.data.image_size, c.autoencoder.kind) == ("dysigma", 32, "multispace")


def test_preset_overrides_round_trip_through_dvc_set_param(tmp_path):
    """The printed `-S` overrides, applied by DVC's own code, give exactly the merged params."""
    from pipeline import presets

    for name in PRESETS:
        preset = presets.load_preset(REPO / "configs" / f"{name}.yaml")
        shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
        got = presets.apply_to_params_file(preset, tmp_path / "params.yaml")
        assert to_dict(got) == to_dict(preset_over_defaults(name)), name
    assert "# Single source of truth" in (tmp_path / "params.yaml").read_text()  # comments survive


@pytest.mark.parametrize("value", ["it's a\\b", "x\\", "", "true", "1.5", "s3://bucket/run dir", "null"])
def test_string_values_survive_the_override_grammar(value, tmp_path):
    from pipeline import presets

    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    got = presets.apply_to_params_file({"fid": {"weights_path": value}}, tmp_path / "params.yaml")
    assert got.fid.weights_path == value


def test_presets_cli_prints_the_experiment_command_and_refuses_bad_presets(tmp_path, capsys, monkeypatch):
    import shlex

    from pipeline import presets

    monkeypatch.chdir(REPO)
    assert presets.main(["configs/imagenet256.yaml", "--set", "data.root=/mnt/ds", "--set", "train.num_workers=16"]) == 0
    words = shlex.split(capsys.readouterr().out.replace("\\\n", " "))
    assert words[:5] == ["dvc", "exp", "run", "-n", "imagenet256"] and words[-1] == "evaluate"
    sets = dict(w.split("=", 1) for w in words[6:-1:2])
    assert sets["data.root"] == "/mnt/ds" and sets["train.num_workers"] == "16"
    assert sets["train.betas"] == "[0.99,0.99]" and sets["weighting.strategy"] == "min_snr"
    assert presets.main(["--check"]) == 0 and "configs/imagenet512.yaml: ok" in capsys.readouterr().out

    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: -1\n")
    assert presets.main([str(bad)]) == 1
    assert f"{bad}: train.lr: got -1" in capsys.readouterr().err
    bad.write_text("trian:\n  lr: 0.1\n")
    assert presets.main([str(bad)]) == 1
    assert "unknown section 'trian'" in capsys.readouterr().err


# ---------------------------------------------------------------------------- dry run


def test_dry_run_counts_the_real_model_without_data(tmp_path, monkeypatch, capsys):
    from torch.utils.flop_counter import FlopCounterMode

    from stages import train as train_stage
    from msdm.diffusion_training import LatentInfo, build_model

    raw = to_dict(PipelineParams())
    raw["model"].update(preset="vit-tiny")
    raw["weighting"].update(strategy="dysigma")  # learned variance: 2x output channels
    raw["train"].update(batch_size=128)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)  # no data/latents, no models: a real run would refuse to start
    assert train_stage.main(["--dry-run", "--json"]) == 0
    report = json.loads(capsys.readouterr().out.split("\ntrain: done")[0])
    assert report["latent_shape"] == [12, 8, 8] and report["tokens"] == 16 and report["learn_sigma"]

    torch.manual_seed(0)
    model = build_model(params_from_dict(raw, PipelineParams), LatentInfo(channels=12, size=8, subspaces=3, num_classes=10))
    assert report["params_total"] == sum(p.numel() for p in model.parameters())
    counter = FlopCounterMode(display=False)
    # The math SDPA backend runs attention as bmm, which the counter sees; CPU's fused
    # flash kernel has no FLOP formula registered and would drop attention from the count.
    with counter, torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        model.backbone(torch.randn(1, 12, 8, 8), torch.tensor([5]), torch.tensor([1]))
    assert report["forward_flops"] == counter.get_total_flops()
    assert 2.5 < report["train_flops"] / report["forward_flops"] < 3.5  # backward ~ 2x forward
    assert report["train_flops_per_step"] == report["train_flops"] * 128
    assert not Path("data").exists() and not Path("models").exists()  # nothing read or written

    assert train_stage.main(["--preset", "x.yaml"]) == 1
    assert "--preset only goes with --dry-run" in capsys.readouterr().err


def test_dry_run_of_the_imagenet512_vit_xl_preset(monkeypatch, capsys):
    from stages import train as train_stage

    monkeypatch.chdir(REPO)
    argv = ["--dry-run", "--preset", "configs/imagenet512.yaml"]
    assert train_stage.main(argv) == 0
    out = capsys.readouterr().out
    assert "latents 4x64x64 = 2 subspaces x 2 channels" in out and "vit-xl/2" in out
    assert "1024 patch tokens + time and class tokens" in out and "parameters    459,342,752" in out
    # DiT-XL/2 at 512 is 524.6 GMACs per forward (Peebles & Xie); this ViT has no adaLN.
    assert "forward 1.05 TFLOPs" in out
