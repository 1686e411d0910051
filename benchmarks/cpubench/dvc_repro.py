"""Benchmark 7: `dvc repro` with nothing changed (the cost of asking the pipeline what to do).

Runs only when the pipeline has been run (dvc.lock exists) and `dvc status` reports
nothing to do: otherwise `dvc repro` would recompute stages, which is not this benchmark.
Uses the Makefile's environment (the venv's bin first on PATH, DVC analytics off).
"""
from __future__ import annotations

import json
import os
import subprocess
import time

from .common import Context, Figure

BENCHMARK = "dvc"
TIMEOUT_S = 600


def makefile_env(ctx: Context) -> dict:
    venv_bin = ctx.repo / ".venv" / "bin"
    return {**os.environ, "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1",
            "RAY_USAGE_STATS_ENABLED": "0", "PYTHONDONTWRITEBYTECODE": "1"}


def _timed(cmd: list[str], ctx: Context) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ctx.repo, env=makefile_env(ctx), capture_output=True, text=True,
                          timeout=TIMEOUT_S, check=False)
    return time.perf_counter() - start, proc


def run(ctx: Context) -> list[Figure]:
    dvc = str(ctx.repo / ".venv" / "bin" / "dvc")
    settings = {"command": ".venv/bin/dvc repro", "cwd": "repository root", "env": "Makefile (venv PATH, "
                "DVC_NO_ANALYTICS=1)"}
    name = "dvc repro, nothing changed"
    if not (ctx.repo / "dvc.lock").is_file():
        return [ctx.figure(BENCHMARK, name, None, "s", settings=settings,
                           note="skipped: pipeline not run yet (no dvc.lock)")]
    status_seconds, status = _timed([dvc, "status", "--json"], ctx)
    figures = [ctx.figure(BENCHMARK, "dvc status", status_seconds, "s",
                          settings={**settings, "command": ".venv/bin/dvc status --json"})]
    try:
        changes = json.loads(status.stdout or "null") if status.returncode == 0 else None
    except ValueError:
        changes = None
    if changes != {}:
        what = (f"dvc status lists changes in {', '.join(sorted(changes))}" if isinstance(changes, dict)
                else f"dvc status failed (exit {status.returncode}): {status.stderr.strip()[-300:]}")
        return figures + [ctx.figure(BENCHMARK, name, None, "s", settings=settings,
                                     note=f"skipped: pipeline not up to date ({what}); repro would recompute")]
    seconds, proc = _timed([dvc, "repro"], ctx)
    if proc.returncode != 0:
        raise RuntimeError(f"dvc repro exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    output = (proc.stdout + proc.stderr).strip().splitlines()
    return figures + [ctx.figure(BENCHMARK, name, seconds, "s", settings=settings,
                                 note=f"dvc said: {output[-1] if output else '(nothing)'}")]
