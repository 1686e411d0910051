"""Datasets: tiny files in the real on-disk formats, checksums, clear errors, the download stage."""
from __future__ import annotations

import gzip
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from msdm import data
from e2e import params_text
from msdm.config import DATASETS, ConfigError, DataConfig
from msdm.data import DatasetError

REPO = Path(__file__).resolve().parents[1]
SYSTEM_DIR = data.SYSTEM_FASHION_MNIST_DIR
needs_system_fmnist = pytest.mark.skipif(
    not (SYSTEM_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Fashion-MNIST is not installed under {SYSTEM_DIR} ({data.APT_FIX})",
)


# ---------------------------------------------------------------------------- file writers


def write_idx_gz(path: Path, array: np.ndarray) -> None:
    """The idx format: 0, 0, dtype code 0x08 (ubyte), ndim; big-endian uint32 dims; raw bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def write_tiny_fashion_mnist(root: Path, n_train: int = 5, n_test: int = 3) -> dict:
    rng = np.random.default_rng(0)
    raw = root / "FashionMNIST" / "raw"
    arrays = {}
    for split, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(1, 256, size=(n, 28, 28), dtype=np.uint8)  # no zeros: padding is visible
        images[0, 0, 0], images[0, 0, 1] = 255, 1
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        images_name, labels_name = data.FASHION_MNIST_FILES[split]
        write_idx_gz(raw / images_name, images)
        write_idx_gz(raw / labels_name, labels)
        arrays[split] = (images, labels)
    return arrays


def write_cifar_batch(path: Path, images: np.ndarray, labels: list[int]) -> None:
    # Protocol 2, like the published Python 2 batches: arrays go through numpy's _reconstruct.
    batch = {"batch_label": path.name, "labels": labels, "data": images.reshape(len(images), -1),
             "filenames": [f"{i}.png" for i in range(len(images))]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(batch, protocol=2))


def write_tiny_cifar10(root: Path) -> dict:
    rng = np.random.default_rng(1)
    batch_dir = root / "cifar-10-batches-py"
    written = {"train": [], "test": []}
    for split, names in data.CIFAR10_FILES.items():
        for k, name in enumerate(names):
            images = rng.integers(0, 256, size=(2, 3, 32, 32), dtype=np.uint8)
            labels = [(k + i) % 10 for i in range(2)]
            write_cifar_batch(batch_dir / name, images, labels)
            written[split].append((images, labels))
    (batch_dir / "batches.meta").write_bytes(pickle.dumps({"label_names": ["airplane"] * 10}, protocol=2))
    return written


def write_image(path: Path, width: int, height: int, color=(0, 0, 255), side_color=None) -> None:
    """An RGB image; with side_color, the left and right thirds get that color."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:] = color
    if side_color is not None:
        pixels[:, : width // 3] = side_color
        pixels[:, width - width // 3:] = side_color
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


# ---------------------------------------------------------------------------- Fashion-MNIST


def test_fashion_mnist_tiny_files_load_padded_with_background(tmp_path):
    arrays = write_tiny_fashion_mnist(tmp_path)
    cfg = DataConfig(root=str(tmp_path), download=False)

    images, labels = data.load_arrays(cfg, "train")
    assert images.shape == (5, 1, 32, 32) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64 and labels.tolist() == arrays["train"][1].tolist()
    assert torch.equal(images[:, 0, 2:30, 2:30], torch.from_numpy(arrays["train"][0]))
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (images[:, 0][:, border] == 0).all()

    dataset = data.load_split(cfg, "test")
    assert len(dataset) == 3
    x, y = dataset[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    assert y == int(arrays["test"][1][0])
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert (x[0, :2, :] == -1.0).all() and (x[0, :, 30:] == -1.0).all()  # padding is background
    assert x[0, 2, 2].item() == 1.0 and x[0, 2, 3].item() == pytest.approx(1 / 127.5 - 1)
    assert torch.allclose(x[0, 2:30, 2:30], torch.from_numpy(arrays["test"][0][0]).float() / 127.5 - 1)


def test_fashion_mnist_other_sizes(tmp_path):
    arrays = write_tiny_fashion_mnist(tmp_path)
    native, _ = data.load_arrays(DataConfig(root=str(tmp_path), image_size=28), "train")
    assert torch.equal(native[:, 0], torch.from_numpy(arrays["train"][0]))
    small, _ = data.load_arrays(DataConfig(root=str(tmp_path), image_size=14), "train")
    assert small.shape == (5, 1, 14, 14)
    # antialiased downsampling averages: close to 2x2 block means of the original
    blocks = torch.from_numpy(arrays["train"][0]).float().reshape(5, 14, 2, 14, 2).mean((2, 4))
    assert (small[:, 0].float() - blocks).abs().mean() < 20


def test_verify_checksums_names_the_corrupt_file(tmp_path):
    write_tiny_fashion_mnist(tmp_path)
    raw = tmp_path / "FashionMNIST" / "raw"
    table = {name: data.file_md5(raw / name) for name in data.FASHION_MNIST_MD5}
    data.verify_checksums(raw, table)  # intact: no error

    victim = raw / "t10k-images-idx3-ubyte.gz"
    victim.write_bytes(victim.read_bytes()[:-10])  # truncated copy
    with pytest.raises(DatasetError) as err:
        data.verify_checksums(raw, table)
    assert "t10k-images-idx3-ubyte.gz" in str(err.value) and str(raw) in str(err.value)
    assert "prepare the dataset again" in str(err.value)
    with pytest.raises(DatasetError, match="t10k-images-idx3-ubyte.gz.*truncated"):
        data.read_idx(victim)

    # the canonical table refuses tiny files, naming the first one checked
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz: checksum mismatch"):
        data.verify_checksums(raw, data.FASHION_MNIST_MD5, content_md5=data.FASHION_MNIST_CONTENT_MD5)


def test_read_idx_refuses_wrong_length_and_magic(tmp_path):
    path = tmp_path / "bad-idx3-ubyte.gz"
    header = bytes([0, 0, 8, 3]) + np.asarray([2, 28, 28], dtype=">u4").tobytes()
    path.write_bytes(gzip.compress(header + bytes(28 * 28)))  # one image where the header says two
    with pytest.raises(DatasetError, match=r"bad-idx3-ubyte.gz: idx header says shape \(2, 28, 28\)"):
        data.read_idx(path)
    path.write_bytes(gzip.compress(b"PK\x03\x04" + bytes(20)))
    with pytest.raises(DatasetError, match="bad magic number"):
        data.read_idx(path)


@needs_system_fmnist
def test_canonical_checksums_accept_debian_copy_and_refuse_a_corrupted_one(tmp_path):
    name = "t10k-labels-idx1-ubyte.gz"
    shutil.copyfile(SYSTEM_DIR / name, tmp_path / name)
    table = {name: data.FASHION_MNIST_MD5[name]}
    data.verify_checksums(tmp_path, table, content_md5=data.FASHION_MNIST_CONTENT_MD5)

    content = bytearray(gzip.decompress((tmp_path / name).read_bytes()))
    content[100] = (content[100] + 1) % 10  # one label changed, still a well-formed file
    (tmp_path / name).write_bytes(gzip.compress(bytes(content)))
    with pytest.raises(DatasetError) as err:
        data.verify_checksums(tmp_path, table, content_md5=data.FASHION_MNIST_CONTENT_MD5)
    assert f"{tmp_path / name}: checksum mismatch" in str(err.value)
    assert data.FASHION_MNIST_CONTENT_MD5[name] in str(err.value)


def test_missing_fashion_mnist_without_download_says_how_to_fix(tmp_path):
    cfg = DataConfig(root=str(tmp_path / "empty"), download=False)
    with pytest.raises(DatasetError) as err:
        data.prepare(cfg, system_dir=tmp_path / "no-such-dir")
    message = str(err.value)
    assert str(tmp_path / "empty" / "FashionMNIST" / "raw") in message
    assert "apt-get install -y dataset-fashion-mnist" in message and "data.download" in message
    assert not (tmp_path / "empty" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte.gz").exists()


def test_damaged_system_copy_is_refused_before_copying(tmp_path):
    write_tiny_fashion_mnist(tmp_path / "system")
    system_dir = tmp_path / "system" / "FashionMNIST" / "raw"
    cfg = DataConfig(root=str(tmp_path / "root"), download=False)
    with pytest.raises(DatasetError) as err:
        data.prepare(cfg, system_dir=system_dir)
    assert f"{system_dir / 'train-images-idx3-ubyte.gz'}: checksum mismatch" in str(err.value)
    assert "apt-get install --reinstall -y dataset-fashion-mnist" in str(err.value)
    assert not (tmp_path / "root" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte.gz").exists()


def test_failed_download_is_a_dataset_error_and_uses_published_md5(tmp_path, monkeypatch):
    calls = []

    def offline_download_url(url, root, filename=None, md5=None):
        calls.append((url, filename, md5))
        raise OSError("network is unreachable")

    import torchvision.datasets.utils

    monkeypatch.setattr(torchvision.datasets.utils, "download_url", offline_download_url)
    cfg = DataConfig(root=str(tmp_path), download=True)
    with pytest.raises(DatasetError, match="could not download Fashion-MNIST file train-images-idx3-ubyte.gz"):
        data.prepare(cfg, system_dir=tmp_path / "no-such-dir")
    assert calls and all(md5 == data.FASHION_MNIST_MD5["train-images-idx3-ubyte.gz"] for _, _, md5 in calls)
    from torchvision.datasets import FashionMNIST

    assert calls[0][0] == FashionMNIST.mirrors[0] + "train-images-idx3-ubyte.gz"
    raw = tmp_path / "FashionMNIST" / "raw"
    assert [p.name for p in raw.iterdir()] == []  # no half-downloaded file left behind


@needs_system_fmnist
def test_prepare_real_fashion_mnist_and_load_test_split(tmp_path):
    cfg = DataConfig(root=str(tmp_path), download=False)
    directory = data.prepare(cfg)
    assert directory == tmp_path / "FashionMNIST" / "raw"
    assert sorted(p.name for p in directory.iterdir()) == sorted(data.FASHION_MNIST_MD5)
    images, labels = data.load_arrays(cfg, "test")
    assert images.shape == (10000, 1, 32, 32) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [1000] * 10  # the test set is balanced
    assert (images[:, :, :2] == 0).all() and images.max() == 255
    assert data.prepare(cfg) == directory  # second run: files already there and verified


# ---------------------------------------------------------------------------- CIFAR-10


def test_cifar10_pickle_batches_load(tmp_path):
    written = write_tiny_cifar10(tmp_path)
    cfg = DataConfig(dataset="cifar10", root=str(tmp_path))
    images, labels = data.load_arrays(cfg, "train")
    assert images.shape == (10, 3, 32, 32) and images.dtype == torch.uint8
    expected = np.concatenate([imgs for imgs, _ in written["train"]])
    assert torch.equal(images, torch.from_numpy(expected))  # channel-major, as published
    assert labels.tolist() == [label for _, ls in written["train"] for label in ls]

    x, y = data.load_split(cfg, "test")[1]
    assert x.shape == (3, 32, 32) and -1 <= x.min() and x.max() <= 1
    assert torch.equal(data.to_uint8(x), torch.from_numpy(written["test"][0][0][1]))
    assert y == written["test"][0][1][1]
    assert data.num_classes(cfg) == 10 and data.image_channels(cfg) == 3


def test_cifar10_checksums_and_missing_files(tmp_path):
    write_tiny_cifar10(tmp_path)
    with pytest.raises(DatasetError, match="data_batch_1: checksum mismatch"):
        data.prepare(DataConfig(dataset="cifar10", root=str(tmp_path), download=False))
    with pytest.raises(DatasetError) as err:
        data.prepare(DataConfig(dataset="cifar10", root=str(tmp_path / "empty"), download=False))
    assert str(tmp_path / "empty" / "cifar-10-batches-py") in str(err.value)
    assert "data.download: true" in str(err.value)


def test_cifar10_pickle_with_code_is_refused(tmp_path):
    class RunsCode:
        def __reduce__(self):
            return (os.getcwd, ())

    batch_dir = tmp_path / "cifar-10-batches-py"
    batch_dir.mkdir()
    (batch_dir / "test_batch").write_bytes(pickle.dumps({"data": RunsCode(), "labels": []}, protocol=2))
    with pytest.raises(DatasetError, match="test_batch.*refusing to load global posix.getcwd"):
        data.load_arrays(DataConfig(dataset="cifar10", root=str(tmp_path)), "test")


# ---------------------------------------------------------------------------- folders


def make_imagenet(root: Path) -> None:
    for split in ("train", "val"):
        write_image(root / "imagenet" / split / "n01440764" / "a.JPEG", 48, 16, side_color=(255, 0, 0))
        write_image(root / "imagenet" / split / "n01443537" / "b.png", 20, 30, color=(0, 255, 0))
    write_image(root / "imagenet" / "train" / "n01443537" / "c.JPEG", 16, 16)


def test_imagenet_folders_center_crop_and_labels(tmp_path):
    make_imagenet(tmp_path)
    cfg = DataConfig(dataset="imagenet", root=str(tmp_path), image_size=16)
    assert data.prepare(cfg) == tmp_path / "imagenet"
    train = data.load_split(cfg, "train")
    assert len(train) == 3 and sorted(label for _, label in train) == [0, 1, 1]
    x, y = train[0]  # 48x16 wide: red sides, blue middle -> the center crop is all blue
    assert x.shape == (3, 16, 16) and y == 0 and -1 <= x.min() and x.max() <= 1
    assert x[2].mean() > 0.9 and x[0].mean() < -0.9
    assert len(data.load_split(cfg, "test")) == 2  # 'test' is ILSVRC's val split
    images, labels = data.load_arrays(cfg, "test")
    assert images.shape == (2, 3, 16, 16) and images.dtype == torch.uint8 and labels.tolist() == [0, 1]
    assert images[1, 1].float().mean() > 240  # the green image, decoded through the slow path
    assert data.num_classes(cfg) == 1000 and data.image_channels(cfg) == 3


def test_imagenet_errors_name_the_folder(tmp_path):
    cfg = DataConfig(dataset="imagenet", root=str(tmp_path))
    with pytest.raises(DatasetError, match=f"{tmp_path / 'imagenet' / 'train'}: not found"):
        data.prepare(cfg)
    write_image(tmp_path / "imagenet" / "train" / "n01" / "a.JPEG", 8, 8)
    write_image(tmp_path / "imagenet" / "val" / "ILSVRC2012_val_00000001.JPEG", 8, 8)  # unsorted val
    with pytest.raises(DatasetError, match=r"imagenet/val: no class folders\. It holds images"):
        data.prepare(cfg)


def test_lsun_exported_folder_any_nesting(tmp_path):
    write_image(tmp_path / "lsun_bedroom" / "0" / "1" / "a.jpg", 30, 20, color=(255, 255, 255))
    write_image(tmp_path / "lsun_bedroom" / "0" / "b.png", 20, 20, color=(0, 0, 0))
    (tmp_path / "lsun_bedroom" / "notes.txt").write_text("not an image")
    cfg = DataConfig(dataset="lsun_bedroom", root=str(tmp_path), image_size=8)
    assert data.prepare(cfg) == tmp_path / "lsun_bedroom"
    dataset = data.load_split(cfg, "train")
    assert len(dataset) == 2
    assert [label for _, label in dataset] == [0, 0]
    images, labels = data.load_arrays(cfg, "test")  # no split folders: the whole folder
    assert images.shape == (2, 3, 8, 8) and labels.tolist() == [0, 0]
    assert images[0].min() == 0 and images[0].max() == 0  # 0/b.png sorts before 0/1/a.jpg
    assert images[1].float().mean() > 250
    assert data.num_classes(cfg) == 1


def test_lsun_and_celeba_missing_are_clear(tmp_path):
    (tmp_path / "lsun_church").mkdir()
    with pytest.raises(DatasetError) as err:
        data.prepare(DataConfig(dataset="lsun_church", root=str(tmp_path)))
    assert str(tmp_path / "lsun_church") in str(err.value) and "church_outdoor_train_lmdb" in str(err.value)
    with pytest.raises(DatasetError) as err:
        data.prepare(DataConfig(dataset="celeba", root=str(tmp_path), download=False))
    assert str(tmp_path / "celeba") in str(err.value) and "data.download: true" in str(err.value)


# ---------------------------------------------------------------------------- small API


def test_unknown_dataset_and_split_list_valid_names(tmp_path):
    cfg = DataConfig(dataset="mnist", root=str(tmp_path))  # bypasses params validation on purpose
    for call in (lambda: data.load_arrays(cfg, "train"), lambda: data.load_split(cfg, "train"),
                 lambda: data.prepare(cfg), lambda: data.num_classes(cfg)):
        with pytest.raises(ConfigError) as err:
            call()
        assert "'mnist'" in str(err.value) and all(repr(name) in str(err.value) for name in DATASETS)
    with pytest.raises(ValueError, match="'val'.*'train', 'test'"):
        data.load_arrays(DataConfig(root=str(tmp_path)), "val")


def test_uint8_round_trip_and_class_names():
    every_value = torch.arange(256, dtype=torch.uint8)
    as_float = data.from_uint8(every_value)
    assert as_float.dtype == torch.float32 and as_float[0] == -1 and as_float[255] == 1
    assert torch.equal(data.to_uint8(as_float), every_value)
    assert data.to_uint8(torch.tensor([-3.0, 3.0])).tolist() == [0, 255]
    assert len(data.CLASS_NAMES) == 10
    assert data.CLASS_NAMES[0] == "T-shirt/top" and data.CLASS_NAMES[9] == "Ankle boot"
    assert [data.num_classes(DataConfig(dataset=d)) for d in DATASETS] == [10, 10, 1, 1, 1, 1000]
    assert [data.image_channels(DataConfig(dataset=d)) for d in DATASETS] == [1, 3, 3, 3, 3, 3]


# ---------------------------------------------------------------------------- the stage


def run_stage(cwd: Path, params: str) -> subprocess.CompletedProcess:
    (cwd / "params.yaml").write_text(params)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "stages.download", "--params", "params.yaml"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@needs_system_fmnist
def test_download_stage_writes_manifest(tmp_path):
    result = run_stage(tmp_path, params_text(data={"dataset": "fashion_mnist", "root": "data/raw", "download": False}))
    assert result.returncode == 0, result.stderr
    summary, done = result.stdout.strip().splitlines()  # what was made, then the stage's time
    assert "fashion_mnist" in summary and done.startswith("download: done in ")
    manifest = json.loads((tmp_path / "data" / "raw" / "manifest.json").read_text())
    assert manifest["dataset"] == "fashion_mnist"
    assert manifest["num_examples"] == {"train": 60000, "test": 10000}
    assert manifest["channels"] == 1 and manifest["num_classes"] == 10
    assert sorted(manifest["files"]) == sorted(data.FASHION_MNIST_MD5)
    for name, entry in manifest["files"].items():
        path = tmp_path / "data" / "raw" / "FashionMNIST" / "raw" / name
        assert entry["bytes"] == path.stat().st_size and entry["md5"] == data.file_md5(path)
        assert entry["content_md5"] == data.FASHION_MNIST_CONTENT_MD5[name]


def test_download_stage_fails_clearly_without_data(tmp_path):
    result = run_stage(tmp_path, params_text(data={"dataset": "cifar10", "root": "data/raw", "download": False}))
    assert result.returncode == 1
    assert "cifar-10-batches-py" in result.stderr and "data.download: true" in result.stderr
    assert not (tmp_path / "data" / "raw" / "manifest.json").exists()
