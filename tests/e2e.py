"""Helpers for end-to-end tests: a temporary copy of the repo with tiny params, and dvc runs."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# Real stages, real data (Fashion-MNIST from Debian's package), tiny budgets.
TINY_PARAMS = {
    "autoencoder": {"steps": 30, "batch_size": 32, "widths": [8, 16], "attn_heads": 2},
    "encode": {"batch_size": 2000, "shard_size": 40000},
    "featurenet": {"steps": 30, "batch_size": 64, "feature_dim": 32},
    "model": {"preset": "vit-tiny"},
    # one worker: DDP over 2 workers is covered by test_reliability's Ray Train runs, and each worker
    # process costs seconds of imports on the 2-core CI machine, three fits over here
    "train": {"steps": 12, "batch_size": 16, "num_workers": 1, "cpus_per_worker": 1, "checkpoint_every": 4,
              "log_every": 2},
    "eval": {"every": 4, "num_samples": 40, "final_num_samples": 40, "sampling_steps": 4, "batch_size": 40},
    # one target, one worker per trial: every trial is a Ray Train run, which costs seconds of
    # start-up on the 2-core CI machine. The target grid and its per-target report are covered by
    # test_convergence, 2-worker trials by test_reliability's sweep on its Ray cluster.
    "sweep": {"strategies": ["const", "dysigma"], "targets": ["x0"], "seeds": [0], "steps": 8, "eval_every": 4, "num_samples": 20,
              "preset": "vit-tiny", "num_workers": 1, "cpus_per_worker": 1},
}


# Every process a stage starts here (dvc, the stage, its Ray daemons and workers) inherits this
# variable, so a test can kill exactly those after a SIGKILL without touching a Ray cluster that
# another test (e.g. in a parallel pytest-xdist worker) runs at the same time.
RUN_MARKER = ("MSDM_E2E_RUN", uuid.uuid4().hex)


def env() -> dict:
    e = dict(os.environ)
    e["PATH"] = f"{VENV_BIN}{os.pathsep}{e.get('PATH', '')}"
    e.update(DVC_NO_ANALYTICS="1", RAY_USAGE_STATS_ENABLED="0",
             PYTHONDONTWRITEBYTECODE="1")
    e[RUN_MARKER[0]] = RUN_MARKER[1]
    e.pop("RAY_ADDRESS", None)
    return e


def marked_processes() -> list[int]:
    """PIDs of live processes started under `env()` (found by their environment)."""
    needle = f"{RUN_MARKER[0]}={RUN_MARKER[1]}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:  # gone, or not ours to read
                continue
    return pids


def process_name(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ")[:80].decode(errors="replace")
    except OSError:
        return f"pid {pid} (gone)"


def kill_marked_processes() -> None:
    for pid in marked_processes():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def params_text(**sections: dict) -> str:
    """The repository's params.yaml with some keys of some sections changed: a stage refuses a
    params file that leaves a section out."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    return yaml.safe_dump(params, sort_keys=False)


def copy_repo(dest: Path, overrides: dict | None = None) -> Path:
    """Tracked and untracked-but-not-ignored files, a fresh git repo, params merged with overrides."""
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                           cwd=REPO, capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    for section, values in (overrides or {}).items():
        params.setdefault(section, {}).update(values)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "tiny"], cwd=dest,
                   check=True)
    return dest


def dvc(repo: Path, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(VENV_BIN / "dvc"), *args], cwd=repo, env=env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc
