"""FID through torch-fidelity and the FeatureNet domain extractor.

Everything runs offline on tiny synthetic images: a 4-class task where class k is a bright
square in quadrant k. The Inception-V3 tests build torch-fidelity's real architecture with
random weights, so that the local-weights path is exercised without any download.
"""
from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch
import torch_fidelity
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

from msdm import metrics
from msdm.config import ConfigError
from msdm.data import ArrayDataset
from msdm.io import FEATURENET_ARTEFACT, CorruptFileError, save_artefact
from msdm.models.featurenet import (FeatureNet, evaluate_accuracy, load_featurenet, save_featurenet,
                                    train_featurenet)

NUM_CLASSES = 4


def quadrant_images(n: int, seed: int, channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [n, C, 32, 32]: class k has a bright 12x12 square in quadrant k, on noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    images = torch.randint(0, 60, (n, channels, 32, 32), generator=g).float()
    for i, k in enumerate(labels.tolist()):
        top, left = 2 + 16 * (k // 2), 2 + 16 * (k % 2)
        images[i, :, top:top + 12, left:left + 12] += 150 + 40 * torch.rand(1, generator=g)
    return images.clamp(0, 255).to(torch.uint8), labels


def add_noise(images: torch.Tensor, std: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (images.float() + std * torch.randn(images.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A FeatureNet trained on the quadrant task, its checkpoint, and held-out images."""
    images, labels = quadrant_images(1024, seed=0)
    model = train_featurenet(images, labels, steps=25, batch_size=32, lr=3e-3, seed=0, feature_dim=32,
                             num_classes=NUM_CLASSES)
    path = tmp_path_factory.mktemp("featurenet") / "featurenet.pt"
    save_featurenet(model, path)
    test_images, test_labels = quadrant_images(400, seed=1)
    return {"model": model, "path": str(path), "images": test_images, "labels": test_labels}


@pytest.fixture(scope="module")
def ref_stats(trained, tmp_path_factory):
    stats = metrics.reference_statistics(trained["images"], "featurenet", trained["path"], batch_size=128)
    path = tmp_path_factory.mktemp("fid_ref") / "stats.npz"
    metrics.save_stats(path, stats, extractor="featurenet")
    return {"stats": stats, "path": str(path)}


# ---------------------------------------------------------------------------- FeatureNet


def test_featurenet_learns_a_separable_task(trained):
    accuracy = evaluate_accuracy(trained["model"], trained["images"], trained["labels"])
    assert accuracy > 0.9  # chance is 0.25


def test_featurenet_save_load_round_trip(trained, tmp_path):
    model = load_featurenet(trained["path"])
    assert model.config == trained["model"].config == {
        "in_channels": 1, "num_classes": NUM_CLASSES, "image_size": 32, "feature_dim": 32, "widths": [16, 32, 64]}
    x = trained["images"][:8].float() / 127.5 - 1
    with torch.no_grad():
        assert torch.equal(model(x), trained["model"](x))
    assert not model.training


def test_featurenet_checkpoint_with_wrong_architecture_is_refused(trained, tmp_path):
    other = FeatureNet(1, NUM_CLASSES, feature_dim=16)
    payload_path = tmp_path / "bad.pt"
    save_artefact({"config": trained["model"].config, "state_dict": other.state_dict()}, payload_path,
                  FEATURENET_ARTEFACT)
    with pytest.raises(CorruptFileError, match="does not match the architecture"):
        load_featurenet(payload_path)


def test_featurenet_training_rejects_bad_inputs():
    images, labels = quadrant_images(16, seed=0)
    with pytest.raises(ValueError, match="uint8"):
        train_featurenet(images.float(), labels, 1, 8, 1e-3, 0)
    with pytest.raises(ValueError, match="labels span"):
        train_featurenet(images, labels + 10, 1, 8, 1e-3, 0, num_classes=NUM_CLASSES)


# ---------------------------------------------------------------------------- FID values


def test_fid_of_a_set_against_its_own_statistics_is_zero(trained, ref_stats):
    result = metrics.compute_fid(trained["images"], ref_stats["path"], "featurenet", trained["path"])
    scale = np.trace(ref_stats["stats"]["sigma"])
    assert scale > 1.0  # the features are not degenerate, so ~0 below means something
    assert abs(result["value"]) < 1e-6 * scale
    assert result["num_samples"] == len(trained["images"])


def test_fid_grows_monotonically_with_noise(trained, ref_stats):
    values = [metrics.compute_fid(add_noise(trained["images"], std), ref_stats["path"], "featurenet",
                                  trained["path"])["value"] for std in (0, 8, 24, 64)]
    assert abs(values[0]) < 1e-3 * values[1]
    assert all(a < b for a, b in zip(values, values[1:])), values


def test_fid_of_a_new_sample_from_the_same_distribution_is_small(trained, ref_stats):
    same = metrics.compute_fid(quadrant_images(400, seed=7)[0], ref_stats["path"], "featurenet", trained["path"])
    noisy = metrics.compute_fid(add_noise(trained["images"], 64), ref_stats["path"], "featurenet", trained["path"])
    assert 0 < same["value"] < 0.2 * noisy["value"]


def test_streamed_float_dataset_gives_the_same_statistics_as_uint8_tensors(trained, ref_stats):
    """The path for datasets too large for memory: (float image in [-1, 1], label) pairs."""
    streamed = ArrayDataset(trained["images"], trained["labels"])
    stats = metrics.reference_statistics(streamed, "featurenet", trained["path"], batch_size=128)
    np.testing.assert_allclose(stats["mu"], ref_stats["stats"]["mu"], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats["sigma"], ref_stats["stats"]["sigma"], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("dim", [1, 5])
def test_frechet_distance_matches_closed_form(dim):
    """torch-fidelity's FID vs |mu1-mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2) by scipy."""
    rng = np.random.default_rng(dim)
    a, b = rng.normal(size=(dim, dim)), rng.normal(size=(dim, dim))
    s1, s2 = a @ a.T + 0.1 * np.eye(dim), b @ b.T + 0.1 * np.eye(dim)
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    root1 = scipy.linalg.sqrtm(s1).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(root1 @ s2 @ root1).real)
    got = metrics.frechet_distance({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2})
    assert got == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_of_isotropic_gaussians():
    """N(0, 4I) vs N(3*1, I) in d dims: 9d + d(4 + 1 - 2*2) = 10d."""
    d = 8
    got = metrics.frechet_distance({"mu": np.zeros(d), "sigma": 4 * np.eye(d)},
                                   {"mu": np.full(d, 3.0), "sigma": np.eye(d)})
    assert got == pytest.approx(10 * d, rel=1e-10)


# ---------------------------------------------------------------------------- torch-fidelity API


def test_featurenet_is_registered_with_torch_fidelity():
    assert FEATURE_EXTRACTORS_REGISTRY[metrics.FEATURENET_EXTRACTOR_NAME] is metrics.FeatureNetExtractor
    metrics.register_featurenet_extractor()  # idempotent: a second import must not fail
    with pytest.raises(ValueError, match="already registered"):
        torch_fidelity.register_feature_extractor(metrics.FEATURENET_EXTRACTOR_NAME, metrics.FeatureNetExtractor)


def test_calculate_metrics_with_the_registered_extractor_agrees_with_compute_fid(trained, ref_stats):
    samples = add_noise(trained["images"], 24)
    public = torch_fidelity.calculate_metrics(
        input1=metrics.Uint8ImageDataset(samples), input2=metrics.Uint8ImageDataset(trained["images"]),
        fid=True, feature_extractor=metrics.FEATURENET_EXTRACTOR_NAME,
        feature_extractor_weights_path=trained["path"], cuda=False, cache=False, verbose=False,
        save_cpu_ram=True, batch_size=128)
    ours = metrics.compute_fid(samples, ref_stats["path"], "featurenet", trained["path"])
    assert ours["value"] > 0
    assert public[torch_fidelity.KEY_METRIC_FID] == pytest.approx(ours["value"], rel=1e-4)


def test_compute_fid_writes_no_torch_fidelity_cache(trained, ref_stats, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # where torch-fidelity's disk cache would go
    metrics.compute_fid(add_noise(trained["images"], 8), ref_stats["path"], "featurenet", trained["path"])
    assert list(tmp_path.iterdir()) == []


def test_metric_name_states_the_extractor(trained, ref_stats):
    result = metrics.compute_fid(trained["images"][:50], ref_stats["path"], "featurenet", trained["path"])
    assert result["name"] == "fid_featurenet" and result["extractor"] == "featurenet"
    assert metrics.metric_name("inception-v3-compat") == "fid_inception"
    with pytest.raises(ValueError, match="fid.extractor"):
        metrics.metric_name("inception")


def test_rgb_copies_of_grey_images_give_the_same_features(trained):
    extractor = metrics.get_extractor("featurenet", trained["path"], "cpu")
    grey = trained["images"][:16]
    with torch.no_grad():
        (from_grey,) = extractor(grey)
        (from_rgb,) = extractor(grey.expand(-1, 3, -1, -1).contiguous())
    torch.testing.assert_close(from_rgb, from_grey, atol=1e-4, rtol=1e-4)


def test_extractor_is_cached_until_the_weights_file_changes(trained, tmp_path):
    path = tmp_path / "featurenet.pt"
    save_featurenet(trained["model"], path)
    first = metrics.get_extractor("featurenet", str(path), "cpu")
    assert metrics.get_extractor("featurenet", str(path), "cpu") is first
    save_featurenet(FeatureNet(1, NUM_CLASSES, feature_dim=32), path)
    assert metrics.get_extractor("featurenet", str(path), "cpu") is not first


# ---------------------------------------------------------------------------- errors and files


def test_missing_reference_stats_fails_before_any_compute(tmp_path):
    missing = tmp_path / "results" / "stats.npz"
    # The weights path does not exist either: the stats error must come first.
    with pytest.raises(metrics.MissingReferenceStatsError, match=r"stats\.npz: FID reference statistics not found"):
        metrics.compute_fid(quadrant_images(4, 0)[0], missing, "featurenet", str(tmp_path / "none.pt"))


@pytest.mark.parametrize("samples, message", [
    (torch.zeros(4, 1, 32, 32), "dtype uint8"),
    (torch.zeros(4, 32, 32, dtype=torch.uint8), r"shape \[N, C, H, W\]"),
    (torch.zeros(4, 2, 32, 32, dtype=torch.uint8), "C = 1 or 3"),
    (torch.zeros(1, 1, 32, 32, dtype=torch.uint8), "at least 2"),
    ([[0]], "torch.Tensor"),
])
def test_bad_samples_are_refused(samples, message, ref_stats, trained):
    with pytest.raises(ValueError, match=message):
        metrics.compute_fid(samples, ref_stats["path"], "featurenet", trained["path"])


def test_stats_of_another_extractor_or_size_are_refused(trained, tmp_path):
    other = tmp_path / "inception.npz"
    metrics.save_stats(other, {"mu": np.zeros(32), "sigma": np.eye(32)}, extractor="inception-v3-compat")
    with pytest.raises(CorruptFileError, match="computed with extractor 'inception-v3-compat'"):
        metrics.compute_fid(trained["images"][:8], other, "featurenet", trained["path"])
    adm_style = tmp_path / "adm.npz"
    np.savez(adm_style, mu=np.zeros(2048), sigma=np.eye(2048, dtype=np.float32))
    with pytest.raises(CorruptFileError, match="2048 features"):
        metrics.compute_fid(trained["images"][:8], adm_style, "featurenet", trained["path"])


def test_stats_files_round_trip_and_accept_adm_npz(tmp_path):
    rng = np.random.default_rng(0)
    stats = {"mu": rng.normal(size=6), "sigma": np.cov(rng.normal(size=(50, 6)), rowvar=False)}
    path = tmp_path / "stats.npz"
    metrics.save_stats(path, stats, extractor="featurenet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stats.npz"]  # no temporary left behind
    loaded = metrics.load_stats(path)
    assert loaded["extractor"] == "featurenet"
    np.testing.assert_array_equal(loaded["mu"], stats["mu"])
    np.testing.assert_array_equal(loaded["sigma"], stats["sigma"])

    adm = tmp_path / "VIRTUAL_imagenet512.npz"
    np.savez(adm, mu=stats["mu"].astype(np.float32), sigma=stats["sigma"].astype(np.float32))
    loaded = metrics.load_stats(adm)
    assert loaded["extractor"] is None and loaded["mu"].dtype == np.float64


@pytest.mark.parametrize("arrays, message", [
    ({"mu": np.zeros(3)}, "missing \\['sigma'\\]"),
    ({"mu": np.zeros(3), "sigma": np.eye(4)}, "mu \\[D\\] and sigma \\[D, D\\]"),
    ({"mu": np.full(3, np.nan), "sigma": np.eye(3)}, "NaN"),
])
def test_bad_stats_files_are_refused(arrays, message, tmp_path):
    path = tmp_path / "stats.npz"
    np.savez(path, **arrays)
    with pytest.raises(CorruptFileError, match=message):
        metrics.load_stats(path)
    path.write_bytes(b"not a zip")
    with pytest.raises(CorruptFileError, match="not a readable .npz"):
        metrics.load_stats(path)


# ---------------------------------------------------------------------------- Inception-V3, offline


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """torch-fidelity's Inception-V3 architecture with random weights, saved as a state_dict."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as inception

    with mock.patch.object(inception, "load_state_dict_from_url", return_value={}), \
            mock.patch.object(inception.FeatureExtractorInceptionV3, "load_state_dict"):
        torch.manual_seed(0)
        net = inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for module in net.modules():  # He init keeps activations alive through the 94 conv layers
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight)
    path = tmp_path_factory.mktemp("inception") / "weights-inception.pth"
    torch.save(net.state_dict(), path)
    return str(path)


@pytest.fixture
def no_network(monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as inception

    def refuse(*args, **kwargs):
        raise AssertionError("tried to download weights")

    monkeypatch.setattr(inception, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)


def test_inception_reads_local_weights_and_takes_grey_images(inception_weights, no_network):
    grey = quadrant_images(2, seed=0)[0]
    stats = metrics.reference_statistics(grey, "inception-v3-compat", inception_weights, batch_size=2)
    assert stats["mu"].shape == (2048,) and stats["sigma"].shape == (2048, 2048)
    assert np.isfinite(stats["sigma"]).all() and np.trace(stats["sigma"]) > 1e-3
    assert metrics.feature_dim("inception-v3-compat") == 2048


def test_missing_inception_weights_file_names_the_config_key(tmp_path, no_network):
    with pytest.raises(ConfigError, match=r"fid.weights_path: .*absent.pth not found"):
        metrics.get_extractor("inception-v3-compat", str(tmp_path / "absent.pth"), "cpu")


def test_inception_weights_with_a_pickled_payload_are_refused(tmp_path, no_network):
    path = tmp_path / "evil.pth"
    torch.save({"payload": CorruptFileError("not a tensor")}, path)
    with pytest.raises(CorruptFileError, match="weights-only"):
        metrics.get_extractor("inception-v3-compat", str(path), "cpu")


@pytest.mark.slow
def test_inception_fid_against_own_statistics_is_zero(inception_weights, no_network, tmp_path):
    """The whole compute_fid path with Inception-V3.

    Slow: torch-fidelity's eigvals of a 2048x2048 product take ~3 s on an idle 2-core
    machine but 30+ s when other processes oversubscribe the cores.
    """
    images = quadrant_images(3, seed=0)[0]
    path = tmp_path / "stats.npz"
    metrics.save_stats(path, metrics.reference_statistics(images, "inception-v3-compat", inception_weights),
                       extractor="inception-v3-compat")
    result = metrics.compute_fid(images, path, "inception-v3-compat", inception_weights)
    assert result["name"] == "fid_inception"
    # rank-2 covariance in 2048-d: sqrt of ~0 eigenvalues leaves ~1e-6 relative error
    assert abs(result["value"]) < 1e-4 * np.trace(metrics.load_stats(path)["sigma"])
