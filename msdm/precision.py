"""The numeric format a run trains and samples in, chosen from the hardware it lands on.

bf16 autocast only pays where the hardware computes in bf16: CUDA GPUs from Ampere on,
and CPUs with AVX512_BF16 or AMX-BF16. On a CPU without either (e.g. an AVX2-only EPYC),
oneDNN emulates bf16 and a training step runs 8-10x *slower* than in fp32. So `auto`
decides per device, and an explicit `bf16` where it is emulated still runs but says so.

Resolution happens where the device is known (a stage process, or a Ray worker that may
sit on another node), never from the machine that parsed params.yaml.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass

import torch

REQUESTABLE = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Precision:
    """What runs (`name`: fp32 | bf16 | fp16) and why (`reason`, naming what was asked for)."""

    name: str
    reason: str

    def autocast(self, device: torch.device | str) -> contextlib.AbstractContextManager:
        """Autocast for this precision on `device`; a null context for fp32."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.name == "bf16" else torch.float16
        return torch.autocast(torch.device(device).type, dtype=dtype)

    @property
    def needs_grad_scaler(self) -> bool:
        return self.name == "fp16"

    def as_metrics(self) -> dict:
        """The fields every metrics file carries: the format used and why."""
        return {"precision": self.name, "precision_reason": self.reason}


def cpu_bf16_support() -> dict[str, bool]:
    """{'amx_bf16': ..., 'avx512_bf16': ...} as torch's CPU feature checks report them."""
    checks = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    found = {}
    for name, fn in checks.items():
        check = getattr(torch.cpu, fn, None)
        try:
            found[name] = bool(check()) if check is not None else False
        except RuntimeError:  # a build without the check's backend
            found[name] = False
    return found


def as_precision(value: "Precision | str", device: torch.device | str, *, key: str = "precision") -> Precision:
    """`value` if already resolved, else `resolve_precision(value, device, key=key)`."""
    return value if isinstance(value, Precision) else resolve_precision(value, device, key=key)


def resolve_precision(requested: str, device: torch.device | str, *, key: str = "precision") -> Precision:
    """Turn a params value (auto | fp32 | bf16 | fp16) into the `Precision` used on `device`.

    `key` names the params field in messages. fp16 off CUDA is refused (ValueError); an
    explicit bf16 on a CPU that emulates it runs, with one warning line on stderr.
    """
    if requested not in REQUESTABLE:
        raise ValueError(f"{key}: got {requested!r}, expected one of {', '.join(REQUESTABLE)}")
    device = torch.device(device)
    if device.type == "cuda":
        native = torch.cuda.is_bf16_supported(including_emulation=False)
        if requested == "auto":
            if native:
                return Precision("bf16", "auto: the GPU computes in bf16")
            return Precision("fp16", "auto: the GPU has no bf16, fp16 with a grad scaler")
        return Precision(requested, f"set by {key}")
    if requested == "fp16":
        raise ValueError(f"{key}: 'fp16' needs a CUDA device; on CPU use 'auto', 'bf16' or 'fp32'")
    support = cpu_bf16_support()
    have = [name for name, ok in support.items() if ok]
    if requested == "auto":
        if have:
            return Precision("bf16", f"auto: the CPU has {' and '.join(have)}")
        return Precision("fp32", "auto: the CPU has neither avx512_bf16 nor amx_bf16, bf16 is emulated")
    if requested == "bf16" and not have:
        _warn_once(f"{key}: bf16 on a CPU without avx512_bf16 or amx_bf16 is emulated, typically 8-10x slower "
                   f"than fp32; set {key}: auto (or fp32)")
        return Precision("bf16", f"set by {key}; emulated on this CPU (no avx512_bf16 or amx_bf16)")
    return Precision(requested, f"set by {key}")


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    # One line per process and message: a stage resolves the same key for every batch loop.
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)
