"""The printed table and results/bench/cpu.json (one section per benchmark, merged by name)."""
from __future__ import annotations

import json
import math
from pathlib import Path

from msdm.io import atomic_write_json

SCHEMA = 1


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        if value == 0 or 0.01 <= abs(value) < 1e5:
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return f"{value:.3g}"
    return str(value)


def table(sections: dict) -> str:
    """A plain-text table of every figure; settings stay in the JSON."""
    header = ("benchmark", "figure", "value", "unit", "dtype", "thr", "spread [min, max]")
    rows = [header]
    notes = []
    for name, section in sections.items():
        if section.get("error"):
            rows.append((name, "FAILED", "-", "", "", "", ""))
            notes.append(f"{name}: {section['error']}")
        for f in section.get("figures", []):
            spread = f"[{_fmt(f['spread'][0])}, {_fmt(f['spread'][1])}]" if f.get("spread") else ""
            rows.append((f["benchmark"], f["name"], _fmt(f["value"]), f["unit"], f.get("dtype", ""),
                         str(f.get("torch_threads", "")), spread))
            if f.get("note") and not any(n.endswith(f": {f['note']}") for n in notes):
                notes.append(f"{f['name']}: {f['note']}")
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i in (0, 1, 3, 4) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if notes:
        lines += ["", "notes:"] + [f"  {n}" for n in notes]
    return "\n".join(lines)


def merge_and_write(out: Path, report: dict) -> dict:
    """Write `report`; sections of an earlier run on the same machine and mode not rerun are kept.

    So `--only NAME` refreshes one benchmark without losing the others. Each section and
    figure carries its own measured_at, torch threads and load average, so a mixed file stays
    honest; the top-level machine block is this run's.
    """
    merged = report
    if out.is_file():
        try:
            old = json.loads(out.read_text())
        except ValueError:
            old = None
        same_machine = (isinstance(old, dict) and old.get("schema") == SCHEMA
                        and old.get("machine", {}).get("identity") == report["machine"]["identity"]
                        and old.get("quick") == report["quick"])
        if same_machine:
            sections = {**old.get("benchmarks", {}), **report["benchmarks"]}
            merged = {**report, "benchmarks": sections}
    atomic_write_json(merged, out)
    return merged
