"""What every stage CLI shares (stages/_cli.py): `--set` overrides and `--help`."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from msdm.config import ConfigError, apply_overrides
from pipeline.config import load_params


# ------------------------------------------------------------------------------- --set

def test_overrides_set_yaml_values_and_are_validated_with_the_rest(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(Path("params.yaml").read_text())
    p = load_params(path, ["autoencoder.subspaces=1", "autoencoder.channels=12", "sweep.targets=[x0, v]"])
    assert (p.autoencoder.subspaces, p.autoencoder.channels, p.sweep.targets) == (1, 12, ["x0", "v"])
    with pytest.raises(ConfigError, match="autoencoder.subspaces: got 0"):
        load_params(path, ["autoencoder.subspaces=0"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_params(path, ["autoencoder.subspace=1"])
    with pytest.raises(ConfigError, match="expected section.key=VALUE"):
        load_params(path, ["autoencoder=1"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(path, ["sweep.targets=[x0"])


def test_overrides_leave_the_raw_mapping_untouched():
    raw = yaml.safe_load(Path("params.yaml").read_text())
    before = json.dumps(raw, sort_keys=True)
    out = apply_overrides(raw, ["train.steps=5"])
    assert out["train"]["steps"] == 5 and json.dumps(raw, sort_keys=True) == before


# ------------------------------------------------------------------------------- --help

@pytest.mark.parametrize("stage", ["download", "autoencoder", "encode", "featurenet", "fid_ref", "train", "evaluate",
                                   "sweep"])
def test_every_stage_help_names_its_purpose_files_and_params(stage, capsys):
    import importlib

    module = importlib.import_module(f"stages.{stage}")
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert f"DVC stage `{stage}`" in text
    for name, default in module.PATHS.items():
        assert f"--{name.replace('_', '-')}" in text and str(default) in text
    declared = yaml.safe_load(Path("dvc.yaml").read_text())["stages"][stage]["params"]
    assert "Params it reads from params.yaml" in text and all(str(k) in text for k in declared)


# ------------------------------------------------------------------------------- summaries

def test_train_summary_line_names_its_numbers():
    from pipeline.ray_train import RunSummary

    metrics = {"step": 4000, "resumed_from_step": 3000, "world_size": 1, "precision": "fp32", "torch_threads": 2,
               "loss": -7.3691, "fid": 56.5891}
    assert RunSummary(metrics, checkpoint=None).line("fid_featurenet") == (
        "step 4000 (resumed from 3000), 1 worker x 2 threads, fp32; loss -7.369, fid_featurenet 56.59")
    fresh = {**metrics, "resumed_from_step": 0, "world_size": 2, "torch_threads": 1}
    del fresh["fid"]
    assert RunSummary(fresh, checkpoint=None).line("fid_inception") == (
        "step 4000, 2 workers x 1 thread, fp32; loss -7.369")
