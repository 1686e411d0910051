"""What machine a figure was measured on, and its theoretical FLOP/s peak.

The peak is cores x clock x FLOPs per cycle per core, where FLOPs per cycle come from the
micro-architecture (see `FLOPS_PER_CYCLE`). These are assumptions written down, not
measurements; the measured large-matmul peak (msdm-free, in `flops.py`) is the check.
"""
from __future__ import annotations

import os
import platform
import re
import subprocess
from dataclasses import asdict, dataclass

import torch

from msdm.precision import cpu_bf16_support, resolve_precision

# CPU flags that decide which kernels PyTorch/oneDNN can use for fp32 and bf16 work.
RELEVANT_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx512_fp16",
                  "amx_tile", "amx_bf16", "amx_int8")
# Environment variables that change CPU kernel threading or ISA choice; recorded when set.
# OMP_WAIT_POLICY matters on shared machines: spinning OpenMP threads wait for descheduled
# siblings (2 threads, vit-tiny batch 8, load average 4: 57-75 img/s active, 215-233 passive).
THREADING_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS", "KMP_AFFINITY",
                 "KMP_BLOCKTIME", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")

# Dense FLOPs per cycle per core (an FMA = 2 FLOPs), by micro-architecture.
#   zen4:  two 256-bit FMA pipes; AVX-512 instructions are split into two 256-bit halves,
#          so 2 pipes x 8 fp32 lanes x 2 = 32 fp32. VDPBF16PS does 2 bf16 products per fp32
#          lane with the same throughput, so bf16 = 64.
#   zen5:  two native 512-bit FMA pipes (desktop/server parts): 2 x 16 x 2 = 64 fp32,
#          bf16 dot product 2x = 128.
#   intel-avx512: two 512-bit FMA units (Xeon Gold/Platinum): 2 x 16 x 2 = 64 fp32;
#          AVX512_BF16 dot product 2x = 128; AMX-BF16 tiles 1024 bf16 FLOPs/cycle (Intel's
#          figure for Sapphire Rapids).
#   avx2-fma: two 256-bit FMA units: 32 fp32, no bf16 arithmetic (bf16 = fp32 rate).
FLOPS_PER_CYCLE = {
    "zen4": {"fp32": 32, "bf16": 64},
    "zen5": {"fp32": 64, "bf16": 128},
    "intel-avx512": {"fp32": 64, "bf16": 128},
    "intel-amx": {"fp32": 64, "bf16": 1024},
    "avx2-fma": {"fp32": 32, "bf16": 32},
    "generic": {"fp32": 16, "bf16": 16},
}


@dataclass
class Machine:
    model_name: str
    vendor: str
    family: int | None
    model: int | None
    microarchitecture: str
    logical_cpus: int          # CPUs this process may run on
    threads_per_core: int
    cores: int                 # physical cores this process may run on
    clock_mhz: float
    clock_source: str
    flags: dict
    torch_version: str
    torch_threads: int
    torch_cpu_capability: str
    mkldnn: bool
    platform: str
    hypervisor: str
    threading_env: dict
    torch_bf16_checks: dict    # what torch.cpu reports; msdm.precision decides `auto` from it
    precision_auto: str        # what `precision: auto` runs on this CPU
    precision_auto_reason: str

    def short(self) -> str:
        """One line naming the machine, put next to every figure."""
        extras = [f for f in ("avx512_bf16", "amx_bf16") if self.flags.get(f)]
        return (f"{self.model_name} ({self.microarchitecture}), {self.cores} cores @ {self.clock_mhz:.0f} MHz, "
                f"{'+'.join(extras) or 'no bf16 ISA'}, auto precision {self.precision_auto}, "
                f"torch {self.torch_threads} threads")

    def identity(self) -> str:
        """The machine without run settings (threads): sections measured on it may share a file."""
        return f"{self.model_name}|{self.microarchitecture}|{self.cores}|{self.clock_mhz:.0f}|{self.torch_version}"

    def to_dict(self) -> dict:
        return {**asdict(self), "summary": self.short(), "identity": self.identity()}


def parse_lscpu(text: str) -> dict[str, str]:
    """`lscpu` output -> {field: value} (first occurrence wins)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    return fields


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def microarchitecture(vendor: str, family: int | None, model: int | None, flags: set[str]) -> str:
    """The key of `FLOPS_PER_CYCLE` for this CPU."""
    if vendor == "AuthenticAMD" and family == 25 and "avx512f" in flags:
        return "zen4"  # family 19h with AVX-512: Genoa, Bergamo, Raphael, Phoenix (Zen 3 has none)
    if vendor == "AuthenticAMD" and family == 26:
        return "zen5"
    if vendor == "GenuineIntel" and "amx_bf16" in flags:
        return "intel-amx"
    if vendor == "GenuineIntel" and "avx512f" in flags:
        return "intel-avx512"
    if "avx2" in flags and "fma" in flags:
        return "avx2-fma"
    return "generic"


def _cpuinfo_mhz() -> float | None:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return None
    values = [float(m) for m in re.findall(r"^cpu MHz\s*:\s*([0-9.]+)", text, flags=re.M)]
    return max(values) if values else None


def describe_machine(lscpu_text: str | None = None) -> Machine:
    """The machine, from `lscpu` (or the given text), /proc/cpuinfo and torch."""
    if lscpu_text is None:
        try:
            lscpu_text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True,
                                        env={**os.environ, "LC_ALL": "C"}).stdout
        except (OSError, subprocess.CalledProcessError):
            lscpu_text = ""
    f = parse_lscpu(lscpu_text)
    auto = resolve_precision("auto", "cpu")
    flags = set(f.get("Flags", "").split())
    vendor = f.get("Vendor ID", "")
    family, model = _int(f.get("CPU family")), _int(f.get("Model"))
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    tpc = _int(f.get("Thread(s) per core")) or 1
    if f.get("CPU max MHz"):
        clock, source = float(f["CPU max MHz"]), "lscpu 'CPU max MHz'"
    elif (mhz := _cpuinfo_mhz()) is not None:
        # A VM shows no max clock; the nominal (TSC) clock is what /proc/cpuinfo reports.
        # Boost clocks above it make the real peak higher than the one derived here.
        clock, source = mhz, "/proc/cpuinfo 'cpu MHz' (nominal; lscpu has no max MHz, e.g. in a VM)"
    else:
        clock, source = float("nan"), "unknown"
    return Machine(
        model_name=f.get("Model name", platform.processor() or "unknown"), vendor=vendor, family=family,
        model=model, microarchitecture=microarchitecture(vendor, family, model, flags),
        logical_cpus=logical, threads_per_core=tpc, cores=max(1, logical // tpc), clock_mhz=clock,
        clock_source=source, flags={name: name in flags for name in RELEVANT_FLAGS},
        torch_version=torch.__version__, torch_threads=torch.get_num_threads(),
        torch_cpu_capability=torch.backends.cpu.get_cpu_capability(), mkldnn=torch.backends.mkldnn.is_available(),
        platform=platform.platform(), hypervisor=f.get("Hypervisor vendor", ""),
        threading_env={k: os.environ[k] for k in THREADING_ENV if k in os.environ},
        torch_bf16_checks=cpu_bf16_support(), precision_auto=auto.name, precision_auto_reason=auto.reason,
    )


def theoretical_peak(machine: Machine, dtype: str, cores: int | None = None) -> dict:
    """{'flops': peak FLOP/s, 'derivation': how} for 'fp32' or 'bf16' on `cores` (default: all) cores."""
    cores = machine.cores if cores is None else cores
    arch = machine.microarchitecture
    per_cycle = FLOPS_PER_CYCLE[arch][dtype]
    if dtype == "bf16" and arch in ("zen4", "zen5", "intel-avx512") and not machine.flags.get("avx512_bf16"):
        per_cycle = FLOPS_PER_CYCLE[arch]["fp32"]  # no bf16 dot-product instructions: fp32 rate
    flops = cores * machine.clock_mhz * 1e6 * per_cycle
    return {"flops": flops, "flops_per_cycle_per_core": per_cycle, "microarchitecture": arch, "cores": cores,
            "clock_mhz": machine.clock_mhz,
            "derivation": f"{cores} cores x {machine.clock_mhz:.0f} MHz ({machine.clock_source}) x "
                          f"{per_cycle} {dtype} FLOP/cycle/core ({arch}, see FLOPS_PER_CYCLE)"}


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: a busy shared machine shows here."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
