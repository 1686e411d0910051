"""A real `dvc repro` of every stage on a tiny config: Ray Train, a real Tune sweep,
torch-fidelity FID with the domain extractor, resume after SIGKILL."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from e2e import REPO, TINY_PARAMS, VENV_BIN, copy_repo, dvc, env, kill_marked_processes, marked_processes, process_name
from msdm.config import update
from pipeline.config import PipelineParams, load_params
from pipeline.live import read_curve
from pipeline.spec import ArtefactPaths, RunSpec, spec_diff, train_spec, trial_resources
from pipeline.sweep import one_trial, sweep_name

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


def curve_steps(live: Path) -> list[int]:
    """The steps of the rows DVCLive logged to `live` (none while it does not exist)."""
    return [r["step"] for r in read_curve(live)]


def test_every_output_is_written(repo):
    ae = load(repo, "metrics/autoencoder.json")
    assert 0 < ae["ssim"] <= 1 and ae["psnr"] > 0
    ev = load(repo, "metrics/eval.json")
    assert ev["metric"] == "fid_featurenet" and ev["extractor"] == "featurenet"
    assert ev["fid"] > 0 and ev["fid_untrained"] > 0 and ev["num_samples"] == 40
    assert curve_steps(repo / "results/train/live") == [4, 8, 12]
    assert load(repo, "results/train/live/metrics.json")["step"] == 12  # DVCLive's summary
    speed = load(repo, "metrics/speedup.json")
    assert set(speed["speedup"]) == {"x0"} and set(speed["speedup"]["x0"]) == {"dysigma"}
    assert set(speed["verdict"]["dysigma"]) == {"x0"} and speed["verdict"]["dysigma"]["x0"] == 0  # one seed
    with open(repo / "results/sweep/curves.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["strategy"], r["target"], int(r["step"])) for r in rows} == {
        (s, "x0", k) for s in ("const", "dysigma") for k in (4, 8)}
    with open(repo / "results/sweep/trials.csv", newline="") as fh:
        trials = list(csv.DictReader(fh))
    # every trial was a Ray Train run with the sweep's worker group (sweep.num_workers: 1 here)
    assert [(t["strategy"], int(t["world_size"])) for t in trials] == [("const", 1), ("dysigma", 1)]
    assert all(time.strptime(t["finished_at"], "%Y-%m-%dT%H:%M:%SZ") for t in trials)
    page = (repo / "docs/results.md").read_text()
    assert "## Verdicts" in page and "- **Time:** 2 trials, " in page and "from the first trial's start" in page
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
        # the default pipeline: `dvc status` alone also lists ablation/dvc.yaml, never run here
        status = json.loads(dvc(repo, "status", "dvc.yaml", "--json").stdout)
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


def _cmd_paths(cmd: str) -> dict[str, str]:
    """{--option: path} of a stage command (every option but --params, --set and --runs takes a path)."""
    args = shlex.split(cmd)
    return {a: args[i + 1] for i, a in enumerate(args) if a.startswith("--") and a not in NOT_PATHS}


NOT_PATHS = {"--params", "--set", "--runs"}


def test_every_path_a_stage_command_names_is_declared_and_is_the_stage_default():
    """dvc.yaml passes each file a stage reads or writes on its command line; each is a dep or an
    output of that stage (so DVC tracks it), and each equals the stage's own default (so running a
    stage by hand touches the same files)."""
    import importlib

    def related(path: str, declared: str) -> bool:  # the same, or one inside the other
        a, b = Path(path), Path(declared.rstrip("/"))
        return a == b or b in a.parents or a in b.parents

    for name, stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].items():
        paths = _cmd_paths(stage["cmd"])
        assert paths, f"{name}: its cmd passes no paths"
        declared = [e if isinstance(e, str) else next(iter(e))
                    for key in ("deps", "outs", "metrics", "plots") for e in stage.get(key, [])]
        for option, path in paths.items():
            assert any(related(path, d) for d in declared), f"{name}: {option} {path} is neither a dep nor an output"
        module = importlib.import_module(f"stages.{name}")
        if hasattr(module, "PATHS"):  # report declares its options itself
            assert paths == {f"--{k.replace('_', '-')}": v for k, v in module.PATHS.items()}, name


def test_the_ablation_pipeline_declares_every_path_and_sweeps_like_the_default():
    """ablation/dvc.yaml: each path its commands pass is a dep or output of that stage; its sweep
    reads the same params as the default sweep (plus the autoencoder it decodes with); every
    stage runs from the repository root; its outputs do not overlap the default pipeline's."""
    root = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    ablation = yaml.safe_load((REPO / "ablation" / "dvc.yaml").read_text())
    single = ablation["vars"][0]["single_space"]
    params = PipelineParams()
    assert (single["subspaces"], single["channels"]) == (1, params.autoencoder.subspaces * params.autoencoder.channels)

    def declared(stage, keys=("deps", "outs", "metrics", "plots")):
        return [e if isinstance(e, str) else next(iter(e)) for key in keys for e in stage.get(key, [])]

    root_outputs = {p for stage in root.values() for p in declared(stage, ("outs", "metrics", "plots"))}
    for name, stage in ablation["stages"].items():
        assert stage["wdir"] == ".."
        cmd = stage["cmd"].replace("${single_space.subspaces}", "1").replace("${single_space.channels}", "12")
        for option, path in _cmd_paths(cmd).items():
            assert any(Path(path) == Path(d) or Path(d) in Path(path).parents or Path(path) in Path(d).parents
                       for d in declared(stage)), f"{name}: {option} {path} is neither a dep nor an output"
        outputs = set(declared(stage, ("outs", "metrics", "plots")))
        assert not outputs & root_outputs, name
    assert ablation["stages"]["sweep_k1"]["params"] == ["autoencoder", *root["sweep"]["params"]]


# The fields pipeline.spec.trial_params sets: a trial's only differences from the train run.
TRIAL_SETS = {"weighting.strategy", "diffusion.target", "model.preset", "train.steps", "train.seed",
              "train.checkpoint_every", "train.num_workers", "train.cpus_per_worker", "train.use_gpu",
              "eval.every", "eval.num_samples"}
NEVER_READ_BY_A_TRIAL = {"eval.final_num_samples"}


def test_sweep_stage_lists_every_param_a_trial_reads():
    listed = set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["sweep"]["params"])
    for section in ("diffusion", "weighting", "model", "train", "eval", "fid", "sweep", "ray"):
        for f in dataclasses.fields(PipelineParams.__dataclass_fields__[section].default_factory()):
            key = f"{section}.{f.name}"
            covered = section in listed or key in listed
            assert covered != (key in TRIAL_SETS | NEVER_READ_BY_A_TRIAL), key


def sweep_of(params: PipelineParams, tmp_path: Path):
    paths = ArtefactPaths(latents=str(tmp_path / "latents"), autoencoder="ae.pt", featurenet="fn.pt",
                          fid_ref="ref.npz", live="results/train/live")
    return train_spec(params, paths, str(tmp_path / "ray" / "sweep"))


def test_a_trial_is_the_train_run_with_only_the_fields_trial_spec_sets(tmp_path):
    base = load_params(REPO / "params.yaml")
    # a sweep whose every trial field differs from the train run's, so the diff shows them all
    params = update(base, {"sweep": {"preset": "vit-small", "num_workers": 2, "cpus_per_worker": 3, "use_gpu": True,
                                     "steps": 77, "eval_every": 11, "num_samples": 33}})
    train = sweep_of(params, tmp_path)
    trial = one_trial(train, tmp_path / "out", f"{train.storage}/{sweep_name(train)}-runs", "min_snr", "eps", 7)
    diff = spec_diff(train, trial)
    assert set(diff) == TRIAL_SETS | {"paths.live", "name", "storage"}
    assert {k: v[1] for k, v in diff.items() if k in TRIAL_SETS} == {
        "weighting.strategy": "min_snr", "diffusion.target": "eps", "model.preset": "vit-small", "train.steps": 77,
        "train.seed": 7, "train.checkpoint_every": 11, "train.num_workers": 2, "train.cpus_per_worker": 3,
        "train.use_gpu": True, "eval.every": 11, "eval.num_samples": 33}
    assert trial.name == "min_snr-eps-seed7" and trial.paths.live.endswith("trials/min_snr-eps-seed7/live")
    assert trial.resources.per_run() == trial_resources(params).per_run() == {"CPU": 6, "GPU": 2}
    assert RunSpec.from_dict(trial.to_dict()) == trial  # what Ray carries to the workers is the same spec


def test_train_fields_every_trial_overrides_change_no_trial(tmp_path):
    base = load_params(REPO / "params.yaml")
    changed = update(base, {"weighting": {"strategy": "p2"}, "diffusion": {"target": "eps"},
                            "model": {"preset": "vit-small"},
                            "train": {"steps": 7, "seed": 9, "checkpoint_every": 3, "num_workers": 4,
                                      "cpus_per_worker": 1},
                            "eval": {"every": 5, "num_samples": 11, "final_num_samples": 13}})
    specs = [sweep_of(p, tmp_path) for p in (base, changed)]
    assert sweep_name(specs[0]) == sweep_name(specs[1])  # the same Tune experiment: a rerun restores it
    for strategy, target, seed in (("const", "x0", 0), ("dysigma", "v", 2)):
        a, b = (one_trial(s, tmp_path, f"{s.storage}/{sweep_name(s)}-runs", strategy, target, seed) for s in specs)
        # the same Tune experiment name and the same trial runs (storage, name): a restore resumes them
        assert set(spec_diff(a, b)) == NEVER_READ_BY_A_TRIAL


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


# Seen on the 2-core VM: Ray's last workers exit 2-5 s after the stage's process group is killed
ORPHAN_GRACE_S = 20


def test_sigkill_during_train_leaves_no_ray_process_and_resumes_from_checkpoint(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["train"].update(steps=28, checkpoint_every=8)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    curve = repo / "results/train/live"
    proc = subprocess.Popen([str(VENV_BIN / "dvc"), "repro", "train"], cwd=repo, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:
            if max(curve_steps(curve), default=0) >= 12 and proc.poll() is None:
                break
            assert proc.poll() is None, "train finished before it could be killed"
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        # Ray puts each worker in a process group of its own, so the kill misses them; they
        # exit by themselves once the raylet (in the stage's group) is gone: no orphan stays
        survivors = marked_processes()
        drain_by = time.time() + ORPHAN_GRACE_S
        while survivors and time.time() < drain_by:
            time.sleep(0.5)
            survivors = marked_processes()
        assert survivors == [], [process_name(pid) for pid in survivors]
    finally:
        proc.wait()
        kill_marked_processes()  # a failed assertion above must not leak them into later tests
    killed_at = curve_steps(curve)
    assert 12 <= max(killed_at) < 28
    dvc(repo, "repro", "train")
    # every eval present once; the rows after the last checkpoint were redone, not duplicated
    assert curve_steps(curve) == list(range(4, 29, 4))
    assert load(repo, "metrics/train.json")["step"] == 28


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout


def test_metrics_are_tracked_in_git_and_a_failed_experiment_keeps_them(repo):
    """metrics/ is not ignored (an experiment's commit carries its numbers), and a `dvc exp run`
    whose params are refused leaves every metrics file byte for byte as it was."""
    assert "metrics/eval.json" in _git(repo, "status", "--porcelain", "--untracked-files=all", "metrics")
    before = {p.name: p.read_bytes() for p in sorted((repo / "metrics").glob("*.json"))}
    assert {"autoencoder.json", "eval.json", "train.json", "speedup.json"} <= set(before)
    params = (repo / "params.yaml").read_text()
    try:
        proc = dvc(repo, "exp", "run", "-S", "weighting.strategy=foo", "train", check=False)
    finally:
        (repo / "params.yaml").write_text(params)
    assert proc.returncode != 0
    assert "weighting.strategy: got 'foo'" in proc.stdout + proc.stderr
    assert {p.name: p.read_bytes() for p in sorted((repo / "metrics").glob("*.json"))} == before


def test_an_experiment_shows_its_fid_beside_the_committed_run(repo):
    """The README's variant workflow: commit a run, `dvc exp run -S ... train evaluate`, then
    `dvc exp show --only-changed` lists both FIDs."""
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "a finished run, with its metrics")
    dvc(repo, "exp", "run", "-S", "weighting.strategy=min_snr", "train", "evaluate", timeout=600)
    rows = json.loads(dvc(repo, "exp", "show", "--only-changed", "--json").stdout)

    def fid(entry) -> float | None:
        data = (entry.get("data") or {})
        return ((data.get("metrics") or {}).get("metrics/eval.json", {}).get("data") or {}).get("fid")

    def strategy(entry) -> str | None:
        data = (entry.get("data") or {})
        return (data.get("params") or {}).get("params.yaml", {}).get("data", {}).get("weighting", {}).get("strategy")

    baseline = next(r for r in rows if r.get("rev") != "workspace")
    experiments = [e for r in [baseline] for group in (r.get("experiments") or []) for e in group.get("revs", [])]
    assert strategy(baseline) == "dysigma_min_snr" and fid(baseline) is not None
    assert [strategy(e) for e in experiments] == ["min_snr"] and fid(experiments[0]) is not None
    assert fid(experiments[0]) != fid(baseline)
    # the table a user reads: one row per run, the FID column filled in both
    table = list(csv.DictReader(dvc(repo, "exp", "show", "--only-changed", "--csv").stdout.splitlines()))
    fid_columns = [c for c in table[0] if c == "fid" or c.endswith(":fid")]
    assert fid_columns, list(table[0])
    filled = [r for r in table if r[fid_columns[0]] not in ("", "!", "-")]
    assert len(filled) >= 2, table


def test_dvc_plots_draw_a_series_per_strategy_and_diff_two_runs(repo):
    """The top-level plots render from the cached data: the sweep plot is coloured by strategy
    (one series each), and `dvc plots diff` draws the committed run's and the experiment's train
    curves. Runs after the experiment test above (same repo)."""
    shown = json.loads(dvc(repo, "plots", "show", "--json").stdout)["data"]
    sweep = shown["sweep_fid"][0]["content"]
    assert sweep["spec"]["encoding"]["color"]["field"] == "strategy"
    series = {(v["target"], v["strategy"]) for v in sweep["data"]["values"]}
    assert series == {("x0", "const"), ("x0", "dysigma")}
    bars = shown["sweep_speedups"][0]["content"]
    assert bars["encoding"]["y"]["type"] == "nominal" and [v["label"] for v in bars["data"]["values"]] == ["x0/dysigma"]
    experiment = dvc(repo, "exp", "list", "--name-only").stdout.split()[0]
    diff = json.loads(dvc(repo, "plots", "diff", "HEAD", experiment, "--json").stdout)["data"]
    train = diff["train_fid"][0]
    assert set(train["revisions"]) == {"HEAD", experiment}
    assert {v["rev"] for v in train["content"]["data"]["values"]} == {"HEAD", experiment}
