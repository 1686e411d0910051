"""No params file crashes the loader or slips through: generated cases (tests/params_fuzz.py),
then the cases found by an independent probe, one by one."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from msdm.config import ConfigError
from params_fuzz import BASE, any_case, classify, dump
from pipeline.cluster import require_room
from pipeline.config import RayConfig, load_params
from pipeline.errors import PipelineError


@settings(max_examples=2000, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(any_case)
def test_every_generated_params_file_is_loaded_or_refused_in_one_clear_line(tmp_path_factory, case):
    # bad cases: a ConfigError of one line naming the key; good ones: loaded
    path = tmp_path_factory.getbasetemp() / "fuzz-params.yaml"
    assert classify(case, path) == ("accepted" if case.good else "clear"), (case.kind, case.data[:300])


def refusal(tmp_path, data: bytes) -> str:
    path = tmp_path / "params.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError) as e:
        load_params(path)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) <= 400, msg
    return msg


def changed(section: str, **values) -> bytes:
    raw = {s: dict(v) for s, v in BASE.items()}
    raw[section].update(values)
    return dump(raw)


@pytest.mark.parametrize("data, named", [
    (changed("train", batch_size=10 ** 12), "train.batch_size"),
    (changed("autoencoder", batch_size=10 ** 12), "autoencoder.batch_size"),
    (changed("train", seed=2 ** 64), "train.seed"),
    (changed("train", betas=[False, 0.99]), "train.betas"),
    (changed("train", ema_decay=1.0), "train.ema_decay"),
    (changed("autoencoder", widths=[32, 10 ** 9]), "autoencoder.widths"),
    (changed("ray", num_cpus=1), "ray.num_cpus"),  # train.cpus_per_worker is 2
    (b"", "empty"),
    (dump({k: v for k, v in BASE.items() if k != "train"}), "train"),
    (dump({**BASE, "train": None}), "train"),
    (dump(BASE) + b"train:\n  steps: 5\n", "appears twice"),
    (dump(BASE).replace(b"steps: 4000", b"steps: 4000\n  steps: 10"), "appears twice"),
    (b"\xff\xfe" + dump(BASE), "not UTF-8"),
    (dump(BASE).replace(b"lr: 0.001", b"lr: " + b"9" * 401), "train.lr"),
    (dump({**BASE, "train": {**BASE["train"], 1: "a", "zz": 2}}), "keys must be names"),
    (dump(BASE).replace(b"steps: 4000", b"steps: " + b"[" * 5000 + b"]" * 5000), "nest"),
    (b"a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\n" + b"".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n".encode()
                                                      for p, c in zip("abcdefgh", "bcdefghi")), "aliases"),
    (dump(BASE) + b"train: [1, 2\n", "line"),
])
def test_cases_an_independent_probe_found_are_refused_by_name(tmp_path, data, named):
    assert named in refusal(tmp_path, data)


def test_the_repository_params_file_loads(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes(dump(BASE))
    load_params(path)


def test_a_run_the_local_cluster_cannot_hold_is_refused_before_it_waits(monkeypatch):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "memory": 1e9})
    require_room({"CPU": 2}, "train", RayConfig())
    with pytest.raises(PipelineError, match=r"train: one run needs 4 CPU .* the local Ray cluster has 2 CPU"):
        require_room({"CPU": 4}, "train", RayConfig())
    with pytest.raises(PipelineError, match="1 GPU"):
        require_room({"CPU": 1, "GPU": 1}, "sweep", RayConfig())
    require_room({"CPU": 64}, "train", RayConfig(address="ray://head:10001"))  # a real cluster may grow
