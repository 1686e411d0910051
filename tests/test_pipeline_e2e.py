"""A real `dvc repro` of every stage on a tiny config: Ray Train, a real Tune sweep,
torch-fidelity FID with the domain extractor, resume after SIGKILL."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from e2e import REPO, TINY_PARAMS, VENV_BIN, copy_repo, dvc, env, kill_marked_processes
from msdm.config import Params, load_params, replace
from pipeline.sweep import trial_overrides, trial_params

# One xdist group: the tests share the module's tiny repo and run in order on one worker.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("e2e")]

STAGES = ["download", "autoencoder", "encode", "featurenet", "fid_ref", "train", "evaluate", "sweep", "report"]


@pytest.fixture(scope="session")  # session: built once per pytest(-xdist) worker, however tests are ordered
def repo(tmp_path_factory):
    root = copy_repo(tmp_path_factory.mktemp("tiny-repo"), TINY_PARAMS)
    proc = dvc(root, "repro", timeout=900)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in proc.stdout, proc.stdout[-3000:]
    return root


def load(repo: Path, rel: str) -> dict:
    return json.loads((repo / rel).read_text())


def curve_steps(path: Path) -> list[int]:
    with open(path, newline="") as fh:
        return [int(r["step"]) for r in csv.DictReader(fh)]


def test_every_output_is_written(repo):
    ae = load(repo, "metrics/autoencoder.json")
    assert 0 < ae["ssim"] <= 1 and ae["psnr"] > 0
    ev = load(repo, "metrics/eval.json")
    assert ev["metric"] == "fid_featurenet" and ev["extractor"] == "featurenet"
    assert ev["fid"] > 0 and ev["fid_untrained"] > 0 and ev["num_samples"] == 40
    assert curve_steps(repo / "results/train/curve.csv") == [4, 8, 12]
    speed = load(repo, "metrics/speedup.json")
    assert set(speed["speedup"]) == {"x0"} and set(speed["speedup"]["x0"]) == {"dysigma"}
    assert set(speed["verdict"]["dysigma"]) == {"x0"} and speed["verdict"]["dysigma"]["x0"] == 0  # one seed
    with open(repo / "results/sweep/curves.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["strategy"], r["target"], int(r["step"])) for r in rows} == {
        (s, "x0", k) for s in ("const", "dysigma") for k in (4, 8)}
    assert "## Verdicts" in (repo / "docs/results.md").read_text()
    for png in ("plots/reconstructions.png", "plots/samples.png", "docs/results/convergence.png",
                "docs/results/speedups.png", "docs/results/weights.png"):
        assert (repo / png).stat().st_size > 5000, png
    assert (repo / "data/latents/meta.json").is_file()


def test_second_repro_does_nothing(repo):
    start = time.perf_counter()
    proc = dvc(repo, "repro")
    assert "Running stage" not in proc.stdout
    assert time.perf_counter() - start < 30


def test_param_change_reruns_only_downstream(repo):
    original = (repo / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["autoencoder"]["ssim_weight"] = 0.5
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        status = json.loads(dvc(repo, "status", "--json").stdout)
        dry = dvc(repo, "repro", "--dry").stdout
    finally:
        (repo / "params.yaml").write_text(original)
    assert set(status) == {"autoencoder"}, status  # encode follows once the model file changes
    assert "params.yaml" in str(status["autoencoder"])  # changed deps: the autoencoder section
    ran = [s for s in STAGES if f"Running stage '{s}'" in dry]
    assert ran == ["autoencoder"], dry
    # encode depends on the autoencoder's output, so a new model reruns it (and not download)
    encode = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]["encode"]
    assert "models/autoencoder.pt" in encode["deps"] and "autoencoder.ssim_weight" not in encode["params"]


# What a sweep trial sets itself (pipeline.sweep.trial_params / trial_overrides) or never reads.
SWEEP_IGNORES = {"diffusion": {"target"}, "weighting": {"strategy"}, "model": {"preset"},
                 "train": {"steps", "seed", "checkpoint_every", "num_workers", "use_gpu", "cpus_per_worker"},
                 "eval": {"every", "num_samples", "final_num_samples"}}


def test_sweep_stage_lists_every_param_a_trial_reads():
    listed = set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["sweep"]["params"])
    for section in ("diffusion", "weighting", "model", "train", "eval", "fid", "sweep", "ray"):
        for f in dataclasses.fields(Params.__dataclass_fields__[section].default_factory()):
            key = f"{section}.{f.name}"
            covered = section in listed or key in listed
            assert covered != (f.name in SWEEP_IGNORES.get(section, ())), key


def test_trial_recipe_does_not_depend_on_the_ignored_params():
    base = load_params(REPO / "params.yaml")
    changed = replace(base, "weighting", strategy="p2")
    changed = replace(changed, "model", preset="vit-small")
    changed = replace(changed, "train", steps=7, seed=9, checkpoint_every=3, num_workers=4, use_gpu=True,
                      cpus_per_worker=1)
    changed = replace(changed, "eval", every=5, num_samples=11, final_num_samples=13)

    def blank_loop_overridden(p):  # train_loop takes steps, seed, eval_every, num_samples from the overrides
        p = replace(p, "train", steps=0, seed=0, cpus_per_worker=1)
        return replace(p, "eval", every=1, num_samples=2, final_num_samples=2)

    changed = replace(changed, "diffusion", target="eps")
    for strategy in ("const", "dysigma"):
        assert trial_overrides(base, 0) == trial_overrides(changed, 0)
        assert blank_loop_overridden(trial_params(base, strategy, "v")) == blank_loop_overridden(
            trial_params(changed, strategy, "v"))


def test_strategy_or_train_length_change_does_not_rerun_the_sweep(repo):
    original = (repo / "params.yaml").read_text()
    params = yaml.safe_load(original)
    params["weighting"]["strategy"] = "min_snr"
    params["train"]["steps"] += 8
    params["eval"]["final_num_samples"] += 10
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        status = json.loads(dvc(repo, "status", "--json").stdout)
    finally:
        (repo / "params.yaml").write_text(original)
    assert "train" in status and "sweep" not in status and "report" not in status, status


def test_sigkill_during_train_resumes_from_checkpoint(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"].update(steps=28, checkpoint_every=8)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    curve = repo / "results/train/curve.csv"
    proc = subprocess.Popen([str(VENV_BIN / "dvc"), "repro", "train"], cwd=repo, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if curve.is_file() and max(curve_steps(curve), default=0) >= 12 and proc.poll() is None:
                break
            assert proc.poll() is None, "train finished before it could be killed"
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        kill_marked_processes()  # the Ray daemons the stage started outlive its process group
    killed_at = curve_steps(curve)
    assert 12 <= max(killed_at) < 28
    dvc(repo, "repro", "train")
    # every eval present once; the rows after the last checkpoint were redone, not duplicated
    assert curve_steps(curve) == list(range(4, 29, 4))
    assert load(repo, "metrics/train.json")["step"] == 28


def test_failed_sweep_trial_fails_the_stage(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["sweep"].update(seeds=[5], targets=["x0"])  # a new experiment, not a restore of the finished one
    params["train"].update(max_failures=0)  # the injected error is deterministic: no retries to wait for
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    e = env()
    e["MSDM_INJECT_TRIAL_ERROR"] = "const,dysigma"  # both fail at once: no trial trains before the verdict
    proc = subprocess.run([str(VENV_BIN / "python"), "-m", "stages.sweep"], cwd=repo, env=e,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert "2 sweep trial(s) failed" in proc.stderr
    assert re.search(r"injected failure in trial (const|dysigma)", proc.stderr), proc.stderr[-2000:]
