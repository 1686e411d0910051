"""params.yaml validation: every bad value is refused with a message naming key, value, allowed."""
from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msdm import config as library
from msdm.config import STRATEGIES, ConfigError, to_dict
from pipeline.config import PipelineParams, load_params, params_from_dict

REPO = Path(__file__).resolve().parents[1]


def raw_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_repo_params_match_dataclass_defaults():
    """params.yaml spells out every key, with the dataclass defaults (one source of truth)."""
    assert to_dict(load_params(REPO / "params.yaml")) == to_dict(PipelineParams())
    assert set(raw_params()) == set(to_dict(PipelineParams()))


def test_the_library_config_holds_no_orchestration_sections():
    """msdm.config knows the model, data and training; sweep, ray and tracking are pipeline/'s."""
    library_sections = {f.name for f in dataclasses.fields(library.Params)}
    assert library_sections.isdisjoint({"sweep", "ray", "tracking"})
    assert set(to_dict(PipelineParams())) - library_sections == {"sweep", "ray", "tracking"}
    with pytest.raises(ConfigError, match="unknown key.*'ray', 'sweep', 'tracking'"):
        library.params_from_dict(raw_params())  # params.yaml is read through pipeline.config
    library_only = {k: v for k, v in raw_params().items() if k in library_sections}
    assert to_dict(library.params_from_dict(library_only)) == {
        k: v for k, v in to_dict(load_params(REPO / "params.yaml")).items() if k in library_sections}


@pytest.mark.parametrize("section,key,value,needle", [
    ("weighting", "strategy", "min-snr", "expected one of 'const'"),
    ("data", "dataset", "mnist", "data.dataset"),
    ("model", "preset", "vit-huge", "model.preset"),
    ("train", "lr", -1.0, "train.lr: got -1.0, expected a value > 0"),
    ("train", "lr", float("nan"), "train.lr: got nan, expected a finite number"),
    ("train", "steps", "many", "train.steps: got 'many' (str), expected an integer"),
    ("train", "use_gpu", "yes", "expected a boolean"),
    ("train", "betas", [0.9], "train.betas"),
    ("train", "precision", "fp16", "needs train.use_gpu"),
    ("eval", "sampling_steps", 5000, "exceeds diffusion.timesteps"),
    ("sweep", "strategies", ["min_snr"], "must include 'const'"),
    ("sweep", "strategies", ["const", "bogus"], "sweep.strategies: got 'bogus'"),
    ("autoencoder", "downsample", 3, "autoencoder.downsample"),
    ("model", "patch_size", 3, "does not divide the latent size"),
])
def test_bad_values_name_key_value_and_allowed(section, key, value, needle):
    raw = raw_params()
    raw[section][key] = value
    with pytest.raises(ConfigError, match=None) as info:
        params_from_dict(raw)
    assert needle in str(info.value)


def test_exponent_floats_written_by_dvc_exp_run_are_numbers():
    raw = raw_params()
    raw["train"]["lr"] = "1e-05"  # what `dvc exp run -S train.lr=1e-5` leaves in params.yaml
    assert params_from_dict(raw).train.lr == 1e-5
    raw["train"]["lr"] = "fast"
    with pytest.raises(ConfigError, match="train.lr: got 'fast' \\(str\\), expected a number"):
        params_from_dict(raw)


def test_unknown_keys_are_refused():
    raw = raw_params()
    raw["train"]["learning_rate"] = 1e-4
    with pytest.raises(ConfigError, match="train: unknown key\\(s\\) 'learning_rate'; allowed keys are"):
        params_from_dict(raw)
    raw = raw_params()
    raw["trian"] = {}
    with pytest.raises(ConfigError, match="unknown key\\(s\\) 'trian'"):
        params_from_dict(raw)


def test_stage_exits_nonzero_with_one_line_before_compute(tmp_path):
    raw = raw_params()
    raw["weighting"]["strategy"] = "dy_sigma"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-m", "stages.train", "--params", str(tmp_path / "params.yaml")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "weighting.strategy: got 'dy_sigma', expected one of" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- property: any mutation validates or fails with a ConfigError naming the key -----------------

_LEAVES = [(s, k) for s, sec in to_dict(PipelineParams()).items() for k in sec]
_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12), st.sampled_from(list(STRATEGIES) + ["vit-b", "cosine", "x0", "fp16", "ddpm"]),
    st.lists(st.one_of(st.integers(-5, 300), st.floats(-1, 2), st.text(max_size=5)), max_size=4),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations=st.lists(st.tuples(st.sampled_from(_LEAVES), _VALUES), min_size=1, max_size=3),
       drop=st.booleans(), extra=st.booleans())
def test_any_mutation_validates_or_names_the_key(mutations, drop, extra):
    raw = copy.deepcopy(raw_params())
    for (section, key), value in mutations:
        raw[section][key] = value
    if drop:
        raw[mutations[0][0][0]].pop(mutations[0][0][1], None)  # a missing key takes its default
    if extra:
        raw["train"]["bogus_key"] = 1
    try:
        params_from_dict(raw)
    except ConfigError as e:
        msg = str(e)
        assert any(f"{s}.{k}" in msg or f"{s}:" in msg for (s, k), _ in mutations) or "bogus_key" in msg \
            or "autoencoder.downsample" in msg or "model.patch_size" in msg or "train.batch_size" in msg, msg
    # any other exception type fails the test: that would be a traceback from deep inside
