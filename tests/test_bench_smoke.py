"""The CPU benchmark harness runs and writes the JSON it promises (no timing assertions)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from cpubench.common import timing_from_stamps  # noqa: E402
from cpubench.machine import describe_machine, parse_lscpu, theoretical_peak  # noqa: E402

FIGURE_KEYS = {"benchmark", "name", "value", "unit", "dtype", "torch_threads", "settings", "machine"}

# lscpu of the development machine (a Zen 4 EPYC VM: no max MHz line, no AMX)
ZEN4_LSCPU = """Architecture:                            x86_64
Vendor ID:                               AuthenticAMD
Model name:                              AMD EPYC
CPU family:                              25
Model:                                   17
Thread(s) per core:                      1
Core(s) per socket:                      2
Flags:                                   fpu sse sse2 fma avx avx2 avx512f avx512_bf16 avx512_vnni
Hypervisor vendor:                       KVM
"""


def test_quick_training_benchmark_writes_json(tmp_path):
    out = tmp_path / "cpu.json"
    proc = subprocess.run([sys.executable, "benchmarks/run_all.py", "--quick", "--only", "training",
                           "--threads", "1", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    machine = report["machine"]
    assert {"model_name", "cores", "flags", "torch_threads", "clock_mhz", "summary"} <= set(machine)
    assert machine["torch_threads"] == 1
    assert {"avx512_bf16", "amx_bf16"} <= set(machine["flags"])
    # the record says what `precision: auto` runs on this CPU, and the figures ran in it
    from msdm.precision import resolve_precision

    auto = resolve_precision("auto", "cpu")
    assert (machine["precision_auto"], machine["precision_auto_reason"]) == (auto.name, auto.reason)
    assert set(machine["torch_bf16_checks"]) == {"amx_bf16", "avx512_bf16"}
    expected_dtype = "fp32" if auto.name == "fp32" else f"{auto.name} autocast"
    assert list(report["benchmarks"]) == ["training"]
    section = report["benchmarks"]["training"]
    assert section["error"] is None and section["quick"] is True
    figures = {f["name"]: f for f in section["figures"]}
    assert all(FIGURE_KEYS <= set(f) for f in figures.values())
    ours = next(f for name, f in figures.items() if name.startswith("ours"))
    bare = next(f for name, f in figures.items() if name.startswith("bare"))
    overhead = next(f for name, f in figures.items() if name.startswith("orchestration overhead"))
    for f in (ours, bare):
        assert f["unit"] == "images/s" and f["value"] > 0 and math.isfinite(f["value"])
        assert f["dtype"] == expected_dtype and f["torch_threads"] == 1
        assert f["settings"]["latent"] == [12, 8, 8] and f["settings"]["batch"] == 8
    # the overhead is derived from the two throughputs, not measured separately
    assert overhead["value"] == pytest.approx(100 * (bare["value"] / ours["value"] - 1), rel=1e-6)
    assert "training" in proc.stdout and "images/s" in proc.stdout  # the printed table


def test_unknown_benchmark_name_is_refused(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/run_all.py", "--quick", "--only", "trainig",
                           "--out", str(tmp_path / "x.json")], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "trainig" in proc.stderr and "training" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_zen4_peak_derivation():
    fields = parse_lscpu(ZEN4_LSCPU)
    assert fields["CPU family"] == "25" and fields["Model name"] == "AMD EPYC"
    machine = describe_machine(ZEN4_LSCPU)
    assert machine.microarchitecture == "zen4"
    assert machine.flags["avx512_bf16"] and not machine.flags["amx_bf16"]
    machine.cores, machine.clock_mhz = 2, 2600.0
    fp32, bf16 = theoretical_peak(machine, "fp32"), theoretical_peak(machine, "bf16")
    assert fp32["flops"] == pytest.approx(2 * 2.6e9 * 32)  # two 256-bit FMA pipes
    assert bf16["flops"] == pytest.approx(2 * fp32["flops"])  # VDPBF16PS: 2x the fp32 rate
    assert theoretical_peak(machine, "fp32", cores=1)["flops"] == pytest.approx(fp32["flops"] / 2)


def test_steady_state_timing_excludes_warmup():
    # 2 s of warm-up, then 1 s per step; chunks of 2 steps
    stamps = [(2, 10.0), (4, 12.0), (6, 14.5), (8, 16.0)]
    t = timing_from_stamps(stamps, warmup=2)
    assert t.seconds_per_step == pytest.approx(1.0) and t.steps == 6
    assert t.chunk_seconds_per_step == pytest.approx([1.0, 1.25, 0.75])
    with pytest.raises(ValueError, match="warm-up"):
        timing_from_stamps([(2, 1.0)], warmup=2)


def test_curve_poller_reads_steps_from_the_runs_dvclive_summary(tmp_path):
    """The Ray benchmark's clock: each rewrite of DVCLive's metrics.json gives (last step, mtime)."""
    import time

    from cpubench.ray_train import CurvePoller
    from pipeline.live import DVCLiveCurve

    curve = DVCLiveCurve(tmp_path / "live")
    poller = CurvePoller(tmp_path / "live" / "metrics.json", interval=0.005)
    poller.start()
    curve.start(None)
    for step in (2, 4, 6):
        time.sleep(0.05)
        curve.append({"step": step, "loss": 1.0 / step})
    stamps = poller.stop()
    steps = [s for s, _ in stamps]
    assert steps[-1] == 6 and set(steps) <= {2, 4, 6} and steps == sorted(steps)


def test_only_run_keeps_other_sections_of_the_same_machine(tmp_path):
    from cpubench.report import merge_and_write

    machine = describe_machine().to_dict()
    out = tmp_path / "cpu.json"
    first = {"schema": 1, "quick": False, "machine": machine,
             "benchmarks": {"training": {"figures": [1]}, "fid": {"figures": [2]}}}
    merge_and_write(out, first)
    rerun = {**first, "benchmarks": {"fid": {"figures": [3]}}}
    merged = merge_and_write(out, rerun)
    assert merged["benchmarks"] == {"training": {"figures": [1]}, "fid": {"figures": [3]}}
    assert json.loads(out.read_text()) == merged
    other = {**rerun, "machine": {**machine, "identity": "another machine"}}
    assert merge_and_write(out, other)["benchmarks"] == {"fid": {"figures": [3]}}
