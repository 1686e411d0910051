"""Latent shard store: round trip, normalisation statistics, atomicity, corruption errors."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from msdm.io import file_sha256
from msdm.latents import LatentStore, LatentStoreError, LatentStoreWriter, labels_name, shard_name, write_latents

K, C, H, W = 3, 2, 4, 4


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents whose channels have very different means and scales, and labels 0..9."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.linspace(-3, 5, K * C).view(1, -1, 1, 1)
    std = torch.linspace(0.1, 4, K * C).view(1, -1, 1, 1)
    z = torch.randn(n, K * C, H, W, generator=g) * std + mean
    return z, torch.randint(0, 10, (n,), generator=g)


def batches(z: torch.Tensor, size: int):
    for i in range(0, len(z), size):
        yield z[i:i + size]


@pytest.fixture
def store_dir(tmp_path):
    train, test = synthetic(250, 0), synthetic(70, 1)
    out = tmp_path / "latents"
    # Batch size 33 and shard size 100: shards cut across batches, and the last one is short.
    write_latents(out, {"train": (batches(train[0], 33), train[1]), "test": (batches(test[0], 33), test[1])},
                  subspaces=K, channels=C, num_classes=10, codec_kind="multispace", shard_size=100)
    return out, train, test


def test_round_trip_and_layout(store_dir):
    out, (z_train, y_train), (z_test, y_test) = store_dir
    assert sorted(p.name for p in out.iterdir()) == [
        "meta.json", "test-00000.npy", "test-labels.npy",
        "train-00000.npy", "train-00001.npy", "train-00002.npy", "train-labels.npy"]
    store = LatentStore(out)
    meta = json.loads((out / "meta.json").read_text())
    assert (meta["K"], meta["C"], meta["h"], meta["w"], meta["num_classes"]) == (K, C, H, W, 10)
    assert meta["autoencoder_kind"] == "multispace" and meta["stats_split"] == "train"
    assert [s["n"] for s in meta["splits"]["train"]["shards"]] == [100, 100, 50]
    assert meta["splits"]["test"]["n"] == 70
    z, y = store.load("train", normalized=False)
    assert z.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(z, z_train) and torch.equal(y, y_train)
    z, y = store.load("test", normalized=False)
    assert torch.equal(z, z_test) and torch.equal(y, y_test)
    assert store.latent_shape == (K * C, H, W) and store.subspaces == K and store.num_classes == 10


def test_normalisation_uses_train_statistics(store_dir):
    out, (z_train, _), _ = store_dir
    store = LatentStore(out)
    expected_mean = z_train.double().mean(dim=(0, 2, 3))
    expected_std = z_train.double().std(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(store.mean.double(), expected_mean, atol=1e-5)
    assert torch.allclose(store.std.double(), expected_std, rtol=1e-5)
    zn, _ = store.load("train")  # normalized by default
    assert torch.allclose(zn.mean(dim=(0, 2, 3)), torch.zeros(K * C), atol=1e-4)
    assert torch.allclose(zn.std(dim=(0, 2, 3), unbiased=False), torch.ones(K * C), atol=1e-4)
    raw, _ = store.load("test", normalized=False)
    assert torch.allclose(store.denormalize(store.normalize(raw)), raw, atol=1e-5)
    # The test split is normalised with the train statistics, not its own.
    zt, _ = store.load("test")
    assert torch.allclose(zt, (raw - store.mean.view(1, -1, 1, 1)) / store.std.view(1, -1, 1, 1))
    # The sampler's x0 clamp: the per-channel range of the normalised train latents, no more.
    lo, hi = store.normalized_range()
    torch.testing.assert_close(lo, zn.amin(dim=(0, 2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(hi, zn.amax(dim=(0, 2, 3)), atol=1e-5, rtol=0)


def test_truncated_shard_gives_clear_error(store_dir):
    out = store_dir[0]
    shard = out / shard_name("train", 1)
    shard.write_bytes(shard.read_bytes()[:1000])
    store = LatentStore(out)
    with pytest.raises(LatentStoreError, match=r"train-00001\.npy.*Re-encode the dataset"):
        store.load("train")
    store.load("test")  # other splits stay readable


def test_missing_shard_and_missing_store(store_dir, tmp_path):
    out = store_dir[0]
    (out / shard_name("test", 0)).unlink()
    with pytest.raises(LatentStoreError, match=r"test-00000\.npy.*missing.*Re-encode the dataset"):
        LatentStore(out).load("test")
    with pytest.raises(LatentStoreError, match="does not exist.*Re-encode the dataset"):
        LatentStore(tmp_path / "nowhere")


def resave_keeping_hash_valid(out: Path, name: str, array: np.ndarray) -> None:
    """Replace a shard and its recorded hash: a store whose meta.json matches its files' bytes."""
    np.save(out / name, array)
    meta = json.loads((out / "meta.json").read_text())
    for entry in meta["splits"]["train"]["shards"]:
        if entry["file"] == name:
            entry["sha256"] = file_sha256(out / name)
    (out / "meta.json").write_text(json.dumps(meta))


def test_shape_mismatch_against_meta(store_dir):
    out = store_dir[0]
    resave_keeping_hash_valid(out, shard_name("train", 0), np.zeros((100, K * C, H + 1, W), dtype=np.float32))
    with pytest.raises(LatentStoreError, match=r"train-00000\.npy.*meta.json says.*Re-encode the dataset"):
        LatentStore(out).load("train")
    resave_keeping_hash_valid(out, shard_name("train", 0), np.zeros((100, K * C, H, W), dtype=np.float64))
    with pytest.raises(LatentStoreError, match="float64"):
        LatentStore(out).load("train")


@pytest.mark.parametrize("victim", ["shard", "labels"])
@pytest.mark.parametrize("damage", ["flipped byte", "zeroed tail"])
def test_a_changed_byte_in_the_data_area_is_refused(store_dir, victim, damage):
    """A flipped byte, or a zeroed tail, still parses as an array of the right shape: the
    recorded SHA-256 is what catches it."""
    out = store_dir[0]
    path = out / (shard_name("train", 0) if victim == "shard" else labels_name("train"))
    raw = bytearray(path.read_bytes())
    if damage == "flipped byte":
        raw[len(raw) - 7] ^= 0x01  # well past the .npy header
    else:
        raw[-64:] = bytes(64)
    path.write_bytes(bytes(raw))
    assert np.load(path, allow_pickle=False).shape  # numpy alone takes it
    with pytest.raises(LatentStoreError, match=rf"{path.name}: content does not match the SHA-256.*Re-encode"):
        LatentStore(out).load("train")


def test_unknown_split_and_bad_meta(store_dir):
    out = store_dir[0]
    with pytest.raises(LatentStoreError, match="no split 'val'"):
        LatentStore(out).load("val")
    meta = json.loads((out / "meta.json").read_text())
    del meta["std"]
    (out / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(LatentStoreError, match="missing key.*std"):
        LatentStore(out)


def test_failed_write_leaves_old_store_untouched(store_dir):
    out, (z_train, _), _ = store_dir
    before = sorted(p.name for p in out.parent.iterdir())

    def failing():
        yield torch.zeros(10, K * C, H, W)
        raise RuntimeError("encoder crashed")

    with pytest.raises(RuntimeError, match="encoder crashed"):
        with LatentStoreWriter(out, subspaces=K, channels=C, num_classes=10, codec_kind="multispace",
                               shard_size=4) as writer:
            writer.write_split("train", failing(), torch.zeros(10, dtype=torch.long))
    assert sorted(p.name for p in out.parent.iterdir()) == before  # no temp dirs left behind
    z, _ = LatentStore(out).load("train", normalized=False)
    assert torch.equal(z, z_train)


def test_rewrite_replaces_the_store(store_dir):
    out = store_dir[0]
    z, y = synthetic(5, 9)
    write_latents(out, {"train": ([z], y)}, subspaces=K, channels=C, num_classes=10, codec_kind="sd-vae")
    store = LatentStore(out)
    assert store.splits == ["train"] and store.meta["autoencoder_kind"] == "sd-vae"
    assert not (out / "test-labels.npy").exists()
    assert len(list(out.parent.iterdir())) == 1


def test_writer_refuses_bad_input(tmp_path):
    z, y = synthetic(6, 2)
    common = dict(subspaces=K, channels=C, num_classes=10, codec_kind="multispace")
    with pytest.raises(ValueError, match="6 latents but 5 labels"):
        write_latents(tmp_path / "a", {"train": ([z], y[:5])}, **common)
    with pytest.raises(ValueError, match="K\\*C=6"):
        write_latents(tmp_path / "b", {"train": ([z[:, :5]], y)}, **common)
    with pytest.raises(ValueError, match="needs a 'train' split"):
        write_latents(tmp_path / "c", {"test": ([z], y)}, **common)
    with pytest.raises(FloatingPointError, match="non-finite"):
        write_latents(tmp_path / "d", {"train": ([z * float("nan")], y)}, **common)
    assert list(tmp_path.iterdir()) == []
