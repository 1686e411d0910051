"""`precision: auto` follows the hardware; what runs is observed in the layers, not just the label.

torch's CPU feature checks are monkeypatched to stand for a CPU with and without native bf16
(AVX512_BF16 / AMX); the dtype that actually flows through nn.Linear is recorded with a
global forward hook.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from msdm import precision as prec
from msdm.config import Params, update
from msdm.models.featurenet import train_featurenet
from msdm.diffusion_training import LatentInfo, train_loop


def cpu_with_native_bf16(monkeypatch, native: bool, amx: bool = False) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


@pytest.fixture
def linear_dtypes():
    """The output dtypes of every nn.Linear forward while the test runs."""
    seen: set[torch.dtype] = set()

    def hook(module, args, output):
        if isinstance(module, nn.Linear) and isinstance(output, torch.Tensor) and torch.is_grad_enabled():
            seen.add(output.dtype)

    handle = nn.modules.module.register_module_forward_hook(hook)
    yield seen
    handle.remove()


@pytest.mark.parametrize("native,amx,expected", [(False, False, "fp32"), (True, False, "bf16"),
                                                 (False, True, "bf16")])
def test_auto_on_cpu_follows_the_bf16_checks(monkeypatch, native, amx, expected):
    cpu_with_native_bf16(monkeypatch, native, amx)
    chosen = prec.resolve_precision("auto", "cpu", key="train.precision")
    assert chosen.name == expected
    assert chosen.as_metrics() == {"precision": expected, "precision_reason": chosen.reason}
    assert ("avx512_bf16" in chosen.reason) if native else True
    assert ("amx_bf16" in chosen.reason) if amx else True


@pytest.mark.parametrize("gpu_bf16,expected", [(True, "bf16"), (False, "fp16")])
def test_auto_on_cuda_is_bf16_where_the_gpu_has_it_else_fp16(monkeypatch, gpu_bf16, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: gpu_bf16)
    chosen = prec.resolve_precision("auto", "cuda")
    assert chosen.name == expected
    assert chosen.needs_grad_scaler == (expected == "fp16")


def test_explicit_bf16_on_an_emulating_cpu_runs_and_warns_once(monkeypatch, capsys):
    cpu_with_native_bf16(monkeypatch, False)
    monkeypatch.setattr(prec, "_warned", set())
    first = prec.resolve_precision("bf16", "cpu", key="autoencoder.precision")
    prec.resolve_precision("bf16", "cpu", key="autoencoder.precision")
    assert first.name == "bf16" and "emulated" in first.reason
    lines = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(lines) == 1
    assert "autoencoder.precision" in lines[0] and "slower" in lines[0]


def test_explicit_bf16_on_a_native_cpu_is_silent(monkeypatch, capsys):
    cpu_with_native_bf16(monkeypatch, True)
    monkeypatch.setattr(prec, "_warned", set())
    assert prec.resolve_precision("bf16", "cpu").reason.startswith("set by")
    assert capsys.readouterr().err == ""


def test_fp16_on_cpu_and_unknown_values_are_refused_with_the_key():
    with pytest.raises(ValueError, match="featurenet.precision: 'fp16' needs a CUDA device"):
        prec.resolve_precision("fp16", "cpu", key="featurenet.precision")
    with pytest.raises(ValueError, match="train.precision: got 'fp64'"):
        prec.resolve_precision("fp64", "cpu", key="train.precision")


def test_params_default_to_auto_everywhere():
    p = Params()
    assert (p.autoencoder.precision, p.train.precision, p.featurenet.precision) == ("auto", "auto", "auto")


INFO = LatentInfo(channels=6, size=4, subspaces=3, num_classes=4)


@pytest.mark.parametrize("native,expected_name,expected_dtype", [(False, "fp32", torch.float32),
                                                                 (True, "bf16", torch.bfloat16)])
def test_training_loop_runs_in_the_auto_precision(monkeypatch, linear_dtypes, native, expected_name,
                                                  expected_dtype):
    cpu_with_native_bf16(monkeypatch, native)
    p = update(Params(), {"train": {"steps": 2, "batch_size": 4, "checkpoint_every": 2, "precision": "auto"},
                          "eval": {"every": 2}})
    g = torch.Generator().manual_seed(0)
    result = train_loop(p, torch.randn(8, 6, 4, 4, generator=g), torch.randint(0, 4, (8,), generator=g), INFO,
                        progress=False)
    assert result.precision.name == expected_name
    # the weighting strategy's small MLP runs in fp32 on purpose, so bf16 is one of two dtypes
    assert (linear_dtypes == {torch.float32}) if expected_dtype == torch.float32 else (expected_dtype in linear_dtypes)


@pytest.mark.parametrize("native,expected_dtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_featurenet_trains_in_the_auto_precision(monkeypatch, linear_dtypes, native, expected_dtype):
    cpu_with_native_bf16(monkeypatch, native)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8, generator=g)
    labels = torch.arange(16) % 2
    train_featurenet(images, labels, steps=2, batch_size=8, lr=1e-3, seed=0, feature_dim=4, widths=(4,),
                     precision="auto")
    assert linear_dtypes == {expected_dtype}
