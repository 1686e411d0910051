"""The per-worker loop without Ray: determinism, exact resume, NaN policy, corrupt checkpoints."""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

from msdm.config import Params, replace
from msdm.diffusion_training import CHECKPOINT_FILE, LatentInfo, NonFiniteLossError, TrainHooks, train_loop

from fault_hooks import NaNLossHooks
from pipeline.live import DVCLiveCurve, read_curve

INFO = LatentInfo(channels=6, size=4, subspaces=3, num_classes=4)


def tiny_params(strategy: str = "learned", **train) -> Params:
    p = replace(Params(), "model", preset="vit-tiny", patch_size=2)
    p = replace(p, "weighting", strategy=strategy)
    return replace(p, "train", **{"steps": 12, "batch_size": 8, "checkpoint_every": 6, "log_every": 2,
                                  "precision": "fp32", **train})


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(40, 6, 4, 4, generator=g), torch.randint(0, 4, (40,), generator=g)


def fake_eval(model, step):
    # a deterministic function of the EMA weights stands in for FID
    return {"fid": float(sum(p.double().sum() for p in model.parameters()))}


def run(params, data, tmp_path, name, nan_steps=(), **kw):
    lat, lab = data
    hooks = TrainHooks(resume_dir=tmp_path / f"{name}-ckpt")
    if nan_steps:
        hooks = NaNLossHooks(hooks, set(nan_steps))
    return train_loop(replace(params, "eval", every=3), lat, lab, INFO, hooks=hooks, evaluate=fake_eval,
                      curve=DVCLiveCurve(tmp_path / name), progress=False, **kw)


def test_same_seed_same_curve(data, tmp_path):
    a = run(tiny_params(), data, tmp_path, "a")
    b = run(tiny_params(), data, tmp_path, "b")
    assert [r["step"] for r in a.curve] == [3, 6, 9, 12]
    for ra, rb in zip(a.curve, b.curve):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-6)
        assert ra["fid"] == pytest.approx(rb["fid"], rel=1e-6)
    c = run(tiny_params(seed=1), data, tmp_path, "c")
    assert c.curve[-1]["loss"] != pytest.approx(a.curve[-1]["loss"], rel=1e-6)


@pytest.mark.parametrize("strategy", ["learned", "dysigma"])
def test_resume_is_exact(data, tmp_path, strategy):
    """6 steps, stop, resume to 12 == 12 steps straight: the checkpoint holds all state."""
    straight = run(tiny_params(strategy), data, tmp_path, "straight")
    run(tiny_params(strategy, steps=6), data, tmp_path, "split")
    resumed = run(tiny_params(strategy), data, tmp_path, "split")
    curve = read_curve(tmp_path / "split")
    assert [r["step"] for r in curve] == [3, 6, 9, 12]  # none lost, none repeated
    for ra, rb in zip(straight.curve, resumed.curve):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["fid"] == pytest.approx(rb["fid"], rel=1e-5)


def test_resume_drops_rows_logged_after_the_checkpoint(data, tmp_path):
    """Rows DVCLive logged after the last checkpoint are logged again by the resumed run, once,
    and metrics.json ends with the resumed run's values."""
    run(tiny_params(steps=6), data, tmp_path, "r")
    live = tmp_path / "r"
    for tsv in (live / "plots" / "metrics").glob("*.tsv"):  # as if the process died while logging step 9
        with open(tsv, "a") as fh:
            fh.write("9\t123.0\n9\t4")  # a whole row, then one cut short
    (live / "metrics.json").write_text('{"step": 9, "loss": 12')  # cut short too
    run(tiny_params(), data, tmp_path, "r")
    straight = run(tiny_params(), data, tmp_path, "straight")
    rows = read_curve(live)
    assert [r["step"] for r in rows] == [3, 6, 9, 12]
    for want, got in zip(straight.curve, rows, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5) and got["fid"] == pytest.approx(want["fid"], rel=1e-5)
    summary = json.loads((live / "metrics.json").read_text())
    assert summary["step"] == 12 and summary["fid"] == pytest.approx(straight.curve[-1]["fid"], rel=1e-5)


def test_nan_steps_are_skipped_up_to_the_limit(data, tmp_path):
    with pytest.warns(RuntimeWarning, match="non-finite loss at step 4"):
        result = run(tiny_params(max_nan_skips=2), data, tmp_path, "nan", nan_steps={4, 5})
    assert result.step == 12
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.curve)


def test_too_many_nans_stop_with_last_good_checkpoint(data, tmp_path):
    with pytest.raises(NonFiniteLossError, match="max_nan_skips=2"), pytest.warns(RuntimeWarning):
        run(tiny_params(max_nan_skips=2), data, tmp_path, "nan2", nan_steps={8, 9, 10})
    state = torch.load(tmp_path / "nan2-ckpt" / CHECKPOINT_FILE, weights_only=True)
    assert state["step"] == 6
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


class KeepEveryCheckpoint(TrainHooks):
    """Local hooks that keep each checkpoint in its own directory, as Ray Train keeps several."""

    def __init__(self, root: Path):
        super().__init__()
        self.root = root

    def resume_checkpoints(self) -> list[Path]:
        return sorted(self.root.glob("step-*"), key=lambda d: -int(d.name.split("-")[1]))

    def report(self, metrics, checkpoint_dir):
        if checkpoint_dir is not None:
            shutil.copytree(checkpoint_dir, self.root / f"step-{metrics['step']}", dirs_exist_ok=True)


class StopAt(KeepEveryCheckpoint):
    def __init__(self, root: Path, step: int):
        super().__init__(root)
        self.stop = step

    def on_step(self, step: int) -> None:
        if step == self.stop:
            raise KeyboardInterrupt(f"stopped at step {step}")


def loop(params, data, hooks, live: Path):
    """The loop with its rows logged by DVCLive to `live`, as the pipeline logs them."""
    lat, lab = data
    return train_loop(params, lat, lab, INFO, hooks=hooks, evaluate=fake_eval, curve=DVCLiveCurve(live),
                      progress=False)


def test_a_damaged_latest_checkpoint_falls_back_to_the_one_before(data, tmp_path):
    params = replace(tiny_params(checkpoint_every=4), "eval", every=4)
    straight = loop(params, data, KeepEveryCheckpoint(tmp_path / "straight"), tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        loop(params, data, StopAt(tmp_path / "ckpts", step=10), tmp_path / "resumed")
    damaged = tmp_path / "ckpts" / "step-8" / CHECKPOINT_FILE
    raw = bytearray(damaged.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    damaged.write_bytes(bytes(raw))
    with pytest.warns(RuntimeWarning, match=rf"{damaged}: .*; resuming from the checkpoint before it"):
        resumed = loop(params, data, KeepEveryCheckpoint(tmp_path / "ckpts"), tmp_path / "resumed")
    assert [r["step"] for r in read_curve(tmp_path / "resumed")] == [4, 8, 12]
    assert resumed.curve[-1]["fid"] == pytest.approx(straight.curve[-1]["fid"], rel=1e-6)


def test_a_resume_fetches_only_the_checkpoints_it_reads(data, tmp_path):
    """From remote storage every checkpoint is a download: the latest intact one is the only
    one fetched, and a damaged latest costs one more (pipeline.ray_train.CheckpointDirs)."""
    from msdm.diffusion_training import load_resume_state
    from pipeline.ray_train import CheckpointDirs

    params = replace(tiny_params(checkpoint_every=4), "eval", every=4)
    saved = KeepEveryCheckpoint(tmp_path / "remote")
    loop(params, data, saved, tmp_path / "live")
    fetched = []

    def download(remote: Path) -> Path:
        fetched.append(remote.name)
        return Path(shutil.copytree(remote, Path(tempfile.mkdtemp(dir=tmp_path)) / remote.name))

    assert load_resume_state(CheckpointDirs(saved.resume_checkpoints(), download))["step"] == 12
    assert fetched == ["step-12"]
    damaged = tmp_path / "remote" / "step-12" / CHECKPOINT_FILE
    damaged.write_bytes(damaged.read_bytes()[:100])
    fetched.clear()
    with pytest.warns(RuntimeWarning, match="resuming from the checkpoint before it"):
        assert load_resume_state(CheckpointDirs(saved.resume_checkpoints(), download))["step"] == 8
    assert fetched == ["step-12", "step-8"]


def test_with_no_readable_checkpoint_left_the_run_starts_over_and_says_so(data, tmp_path):
    run(tiny_params(steps=6), data, tmp_path, "bad")
    ckpt = tmp_path / "bad-ckpt" / CHECKPOINT_FILE
    ckpt.write_bytes(ckpt.read_bytes()[:100])
    with pytest.warns(RuntimeWarning, match=rf"{ckpt}: .*no readable checkpoint is left: starting from step 0"):
        resumed = run(tiny_params(), data, tmp_path, "bad")
    straight = run(tiny_params(), data, tmp_path, "straight")
    assert [r["step"] for r in resumed.curve] == [3, 6, 9, 12]
    assert resumed.curve[-1]["fid"] == pytest.approx(straight.curve[-1]["fid"], rel=1e-6)


def test_rows_after_a_resume_equal_the_uninterrupted_run_between_checkpoint_and_eval(data, tmp_path):
    """Checkpoints (every 5) fall between evaluations (every 3): the row after the resume
    averages the same steps as the uninterrupted run's, because the running sums are saved."""
    params = replace(tiny_params(checkpoint_every=5), "eval", every=3)
    straight = loop(params, data, KeepEveryCheckpoint(tmp_path / "straight"), tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        loop(params, data, StopAt(tmp_path / "ckpts", step=7), tmp_path / "resumed")
    loop(params, data, KeepEveryCheckpoint(tmp_path / "ckpts"), tmp_path / "resumed")
    resumed = read_curve(tmp_path / "resumed")
    assert [r["step"] for r in resumed] == [3, 6, 9, 12]
    for want, got in zip(straight.curve, resumed):
        for key in ("loss", "mse_space0", "mse_space2", "mean_weight", "fid"):
            assert float(got[key]) == pytest.approx(want[key], rel=1e-6), (want["step"], key)


def test_without_a_terminal_the_loop_logs_a_progress_line_every_log_every_steps(data, capsys):
    """Ray workers and dvc logs have no terminal for a bar: every train.log_every steps rank 0
    prints its step, loss, steps per second and ETA, and after each evaluation its FID."""
    lat, lab = data
    train_loop(replace(tiny_params("const", steps=6, log_every=2), "eval", every=6), lat, lab, INFO,
               evaluate=fake_eval)
    out = capsys.readouterr().out.splitlines()
    lines = [line for line in out if line.startswith("train[const]")]
    assert [line.split()[2] for line in lines] == ["2/6", "4/6", "6/6"]
    assert all("steps/s" in line and "ETA" in line and "loss" in line for line in lines)
    assert lines[-1].split("ETA ")[1] == "0m00s"
    # and each evaluation, with the metric's name (fake_eval reports none: plain fid)
    (evaluation,) = [line for line in out if line.startswith("eval[const]")]
    assert evaluation.startswith("eval[const] step 6/6  fid ")

