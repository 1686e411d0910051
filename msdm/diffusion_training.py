"""The per-worker training loop: joint multi-space diffusion on pre-encoded latents.

Framework-free: Ray (or a plain process) plugs in through `TrainHooks`, which says who
this worker is, wraps the model for data parallelism, reports metrics and checkpoints,
and hands back the checkpoint to resume from.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .config import Params
from .diffusion import GaussianDiffusion, prediction
from .diffusion_loss import DiffusionLoss
from .io import DIFFUSION_CHECKPOINT_ARTEFACT, CorruptFileError, load_artefact, save_artefact
from .models.vit import build_vit
from .precision import Precision, resolve_precision
from .weighting import WeightLog, build_strategy

CHECKPOINT_FILE = "state.pt"


class NonFiniteLossError(RuntimeError):
    """The loss stayed NaN/inf for more steps than `train.max_nan_skips` allows."""


class DiffusionModel(nn.Module):
    """The backbone plus the (possibly learnable) weighting strategy, optimised together."""

    def __init__(self, backbone: nn.Module, strategy: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.strategy = strategy

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.backbone(x, t, y)


@dataclass
class LatentInfo:
    channels: int
    size: int
    subspaces: int
    num_classes: int


def latent_info(meta: dict) -> LatentInfo:
    """LatentInfo from a latent store's meta.json (a single class means unconditional)."""
    k, c = int(meta["K"]), int(meta["C"])
    classes = int(meta["num_classes"])
    return LatentInfo(channels=k * c, size=int(meta["h"]), subspaces=k, num_classes=classes if classes > 1 else 0)


def build_model(params: Params, info: LatentInfo) -> DiffusionModel:
    strategy = build_strategy(params.weighting, info.subspaces)
    backbone = build_vit(params.model.preset, in_channels=info.channels, image_size=info.size,
                         patch_size=params.model.patch_size, num_classes=info.num_classes,
                         learn_sigma=strategy.learns_variance)
    return DiffusionModel(backbone, strategy)


class EMA:
    """Exponential moving average of the backbone's parameters (buffers copied)."""

    def __init__(self, model: nn.Module, decay: float):
        import copy

        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_p = list(self.model.parameters())
        torch._foreach_lerp_(ema_p, [p.detach() for p in model.parameters()], 1.0 - self.decay)
        for b_ema, b in zip(self.model.buffers(), model.buffers()):
            b_ema.copy_(b)


class TrainHooks:
    """What the loop needs from its host. The default is a single local process."""

    rank = 0
    world_size = 1

    def __init__(self, resume_dir: Path | None = None, device: str | torch.device = "cpu"):
        self.resume_dir = resume_dir
        self.device = torch.device(device)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return model

    def resume_checkpoints(self) -> list[Path]:
        """Directories holding `state.pt` to resume from, newest first: the loop takes the first
        that loads and falls back past a damaged one."""
        if self.resume_dir is None:
            return []
        # .old: a crash between the two renames of `report`
        return [d for d in (self.resume_dir, self._previous()) if (d / CHECKPOINT_FILE).is_file()]

    def _previous(self) -> Path:
        return self.resume_dir.with_name(self.resume_dir.name + ".old")

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        """Called on every rank at each checkpoint interval and at the end."""
        if checkpoint_dir is not None and self.resume_dir is not None and checkpoint_dir != self.resume_dir:
            import shutil

            tmp = self.resume_dir.with_name(self.resume_dir.name + ".tmp")
            old = self._previous()
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(checkpoint_dir, tmp)
            # the old checkpoint stays readable until the new one is in place
            if self.resume_dir.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(self.resume_dir, old)
            os.replace(tmp, self.resume_dir)
            shutil.rmtree(old, ignore_errors=True)

    def barrier(self) -> None:
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def on_loss(self, step: int, loss: Tensor) -> Tensor:
        """The loss the loop steps on at `step` (1-based), given the one it computed.

        The seam where a host or a test changes a step (the reliability tests make it NaN).
        """
        return loss

    def on_step(self, step: int) -> None:
        """Called on every rank after optimizer step `step` (1-based), before any report."""


class WrappedHooks(TrainHooks):
    """TrainHooks that forward to `inner`; a subclass overrides only what it adds."""

    def __init__(self, inner: TrainHooks):
        self.inner = inner
        self.rank, self.world_size, self.device = inner.rank, inner.world_size, inner.device

    def wrap_model(self, model: nn.Module) -> nn.Module:
        return self.inner.wrap_model(model)

    def resume_checkpoints(self) -> list[Path]:
        return self.inner.resume_checkpoints()

    def report(self, metrics: dict, checkpoint_dir: Path | None) -> None:
        self.inner.report(metrics, checkpoint_dir)

    def barrier(self) -> None:
        self.inner.barrier()

    def on_loss(self, step: int, loss: Tensor) -> Tensor:
        return self.inner.on_loss(step, loss)

    def on_step(self, step: int) -> None:
        self.inner.on_step(step)


@dataclass
class DiffusionTrainResult:
    step: int
    curve: list[dict] = field(default_factory=list)
    images_per_second: float = float("nan")
    seconds: float = 0.0
    precision: Precision | None = None


class CurveLog:
    """Where rank 0's logged rows go (one per `eval.every` steps, and the last step).

    This base keeps them in memory; the pipeline logs them with DVCLive (`pipeline.live`).
    `start` is called once, after the loop knows whether it resumes: a resumed run's rows after
    its checkpoint's step are dropped, so they are logged again, never twice.
    """

    def __init__(self):
        self.rows: list[dict] = []

    def start(self, resumed_step: int | None) -> None:
        self.rows = [] if resumed_step is None else [r for r in self.rows if r["step"] <= resumed_step]

    def append(self, row: dict) -> None:
        self.rows.append(row)

    def close(self) -> None:
        pass


def load_resume_state(candidates: Sequence[Path]) -> dict | None:
    """The newest of `candidates` (checkpoint directories, newest first) that loads intact.

    A damaged or missing one is passed over with a warning that names it; when none is left the
    run starts from step 0, and the last warning says so. (Ray Train keeps the checkpoint before
    the latest, train.checkpoint_every steps earlier: that is what a damaged latest falls back to.)
    """
    for i, directory in enumerate(candidates):
        try:
            return load_artefact(Path(directory) / CHECKPOINT_FILE, DIFFUSION_CHECKPOINT_ARTEFACT)
        except (CorruptFileError, FileNotFoundError) as e:
            then = ("resuming from the checkpoint before it" if i + 1 < len(candidates)
                    else "no readable checkpoint is left: starting from step 0")
            warnings.warn(f"{e}; {then}", RuntimeWarning, stacklevel=2)
    return None


def progress_line(name: str, step: int, steps: int, loss: float, done: int, seconds: float) -> str:
    """'train[const] step 300/4000 (7%)  loss 0.412  9.8 steps/s  ETA 6m17s'."""
    rate = done / seconds if seconds > 0 else float("nan")
    eta = (steps - step) / rate if rate > 0 else float("nan")
    eta_text = f"{int(eta // 60)}m{int(eta % 60):02d}s" if math.isfinite(eta) else "?"
    return (f"train[{name}] step {step}/{steps} ({100 * step // max(steps, 1)}%)  loss {loss:.4g}  "
            f"{rate:.1f} steps/s  ETA {eta_text}")


def eval_line(name: str, step: int, steps: int, row: dict) -> str:
    """'eval[const] step 1000/4000  fid_featurenet 112.7': an evaluation, where no bar shows it."""
    return f"eval[{name}] step {step}/{steps}  {row.get('metric', 'fid')} {row['fid']:.4g}"


def train_loop(params: Params, latents: Tensor, labels: Tensor, info: LatentInfo, *,
               hooks: TrainHooks | None = None,
               evaluate: Callable[[nn.Module, int], dict] | None = None,
               curve: CurveLog | None = None, progress: bool = True) -> DiffusionTrainResult:
    """Train the diffusion model on normalised latents [N, K*C, h, w] with labels [N].

    `evaluate(ema_backbone, step)` returns a dict with at least `fid`; it is called on rank 0
    every `eval.every` steps and at the end. Checkpoints are reported every
    `train.checkpoint_every` steps and at the end. Everything else comes from `params`:
    a sweep trial is the same call with other params. `curve` receives rank 0's rows.
    """
    hooks = hooks or TrainHooks()
    tc = params.train
    steps, eval_every, seed = tc.steps, params.eval.every, tc.seed
    device = hooks.device
    rank, world = hooks.rank, hooks.world_size
    local_batch = tc.batch_size // world

    torch.manual_seed(seed)  # identical init on every rank
    model = build_model(params, info).to(device)
    ema = EMA(model.backbone, tc.ema_decay)
    # fused on CPU too: 1.01-1.08x the default per-parameter loop on the 2-core Zen 4 machine
    # (benchmarks/run_all.py --only precision, two runs)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tuple(tc.betas),
                            weight_decay=tc.weight_decay, fused=True)
    diffusion = GaussianDiffusion(params.diffusion.timesteps, params.diffusion.schedule)
    null_class = info.num_classes if info.num_classes > 0 else None
    loss_fn = DiffusionLoss(diffusion, model.strategy, target=prediction(params.diffusion.target),
                            subspaces=info.subspaces,
                            label_dropout=params.model.label_dropout, null_class=null_class)
    # resolved on the worker: it, not the machine that read params.yaml, has the device
    precision = resolve_precision(tc.precision, device, key="train.precision")
    autocast = precision.autocast(device)
    scaler = torch.amp.GradScaler(device.type) if precision.needs_grad_scaler else None
    gen = torch.Generator(device=device).manual_seed(seed * 1000 + rank)

    step, epoch, pos = 0, 0, 0
    curve = curve if curve is not None and rank == 0 else CurveLog()
    state = load_resume_state(hooks.resume_checkpoints())
    if state is not None:
        model.load_state_dict(state["model"])
        ema.model.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step, epoch, pos = int(state["step"]), int(state["epoch"]), int(state["pos"])
        if rank < len(state["rng"]):  # a changed worker count keeps the fresh per-rank seed
            gen.set_state(state["rng"][rank])
        torch.set_rng_state(state["torch_rng"])
    curve.start(step if state is not None else None)
    window = state.get("window") if state is not None else None
    ddp_model = hooks.wrap_model(model)

    n = latents.shape[0]
    # The latent set stays in host memory (ImageNet-512 latents are ~84 GB); only each
    # batch moves to the device, asynchronously from pinned memory on CUDA.
    pin = device.type == "cuda"
    if pin:
        latents, labels = latents.pin_memory(), labels.pin_memory()

    def permutation(ep: int) -> Tensor:
        g = torch.Generator().manual_seed(seed * 7919 + ep)
        return torch.randperm(n, generator=g)

    perm = permutation(epoch)
    weight_log = WeightLog(diffusion.timesteps, params.weighting.buckets)
    # running sums stay on the device: no host sync per step
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    mse_sum = torch.zeros(info.subspaces, device=device, dtype=torch.float64)
    window_steps = 0
    if window is not None:  # the steps since the last logged row: its mean covers them all
        window_steps = int(window["steps"])
        loss_sum.copy_(window["loss_sum"])
        mse_sum.copy_(window["mse_sum"])
        weight_log.load_state(window["weights"], device)
    skips = 0
    t_start = time.perf_counter()
    start_step = step

    def checkpoint_state() -> dict:
        rng = [gen.get_state().cpu()]
        if world > 1:
            gathered = [torch.empty_like(rng[0]) for _ in range(world)]
            torch.distributed.all_gather_object(gathered, rng[0])
            rng = gathered
        return {"model": model.state_dict(), "ema": ema.model.state_dict(), "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else {}, "step": step, "epoch": epoch,
                "pos": pos, "rng": rng, "torch_rng": torch.get_rng_state(),
                # the running sums behind the next logged row, so a resumed run logs the same row
                "window": {"steps": window_steps, "loss_sum": loss_sum.cpu(), "mse_sum": mse_sum.cpu(),
                           "weights": weight_log.state()},
                "params": {"strategy": params.weighting.strategy, "preset": params.model.preset}}

    def do_eval() -> dict:
        nonlocal window_steps
        row: dict[str, Any] = {"step": step}
        count = max(window_steps, 1)
        row["loss"] = float(loss_sum) / count
        for k, v in enumerate((mse_sum / count).tolist()):
            row[f"mse_space{k}"] = v
        means = weight_log.means()
        finite = [m for m in means if not math.isnan(m)]
        row["mean_weight"] = sum(finite) / len(finite) if finite else float("nan")
        for i, m in enumerate(means):
            row[f"w_t{i}"] = m
        if evaluate is not None:
            row.update(evaluate(ema.model, step))
        curve.append(row)
        window_steps = 0
        loss_sum.zero_()
        mse_sum.zero_()
        weight_log.reset()
        return row

    def save_and_report() -> None:
        state = checkpoint_state()
        # resumed_from_step shows a host (and its tests) where this attempt picked the run up
        metrics = {"step": step, "resumed_from_step": start_step, "world_size": world, **precision.as_metrics(),
                   "torch_threads": torch.get_num_threads(),
                   "loss": curve.rows[-1]["loss"] if curve.rows else float("nan")}
        if curve.rows and "fid" in curve.rows[-1]:
            metrics["fid"] = curve.rows[-1]["fid"]
        import tempfile

        with tempfile.TemporaryDirectory(prefix="msdm-ckpt-") as tmp:
            d = Path(tmp)
            if rank == 0:
                save_artefact(state, d / CHECKPOINT_FILE, DIFFUSION_CHECKPOINT_ARTEFACT)
            hooks.report(metrics, d if rank == 0 else None)

    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=step, desc=f"train[{params.weighting.strategy}]", disable=None,
                   mininterval=2.0)
        if bar.disable:  # no terminal: progress lines instead (below)
            bar = None
    model.train()
    while step < steps:
        if pos + local_batch * world > n:
            epoch, pos = epoch + 1, 0
            perm = permutation(epoch)
        idx = perm[pos + rank * local_batch: pos + (rank + 1) * local_batch]
        pos += local_batch * world
        x0 = latents[idx].to(device, non_blocking=pin)
        y = labels[idx].to(device, non_blocking=pin)
        out = loss_fn(ddp_model, x0, y if null_class is not None else None, generator=gen, autocast=autocast)
        loss = hooks.on_loss(step + 1, out.loss)
        if not torch.isfinite(loss):
            skips += 1
            opt.zero_grad(set_to_none=True)
            if skips > tc.max_nan_skips:
                raise NonFiniteLossError(
                    f"non-finite loss at step {step + 1}: {skips} bad steps exceed train.max_nan_skips="
                    f"{tc.max_nan_skips}; the last good checkpoint is kept. Lower train.lr or use fp32.")
            warnings.warn(f"non-finite loss at step {step + 1}; step skipped ({skips}/{tc.max_nan_skips})",
                          RuntimeWarning, stacklevel=1)
            step += 1
            if bar is not None:
                bar.update(1)
            continue
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        ema.update(model.backbone)
        step += 1
        hooks.on_step(step)
        if rank == 0:
            loss_sum += loss.detach().double()
            mse_sum += out.mse.mean(0).double()
            window_steps += 1
            weight_log.add(out.t, out.weights)
        if bar is not None:
            bar.update(1)
        elif progress and rank == 0 and tc.log_every > 0 and step % tc.log_every == 0:
            # one line per log_every steps where no terminal shows a bar (Ray workers, dvc logs)
            print(progress_line(params.weighting.strategy, step, steps, float(loss_sum) / max(window_steps, 1),
                                step - start_step, time.perf_counter() - t_start), flush=True)
        if rank == 0 and (step % eval_every == 0 or step == steps):
            row = do_eval()
            if bar is not None:
                bar.set_postfix({k: f"{row[k]:.3g}" for k in ("loss", "fid") if k in row})
            elif progress and "fid" in row:
                print(eval_line(params.weighting.strategy, step, steps, row), flush=True)
        if step % tc.checkpoint_every == 0 or step == steps:
            save_and_report()
    if bar is not None:
        bar.close()
    curve.close()
    if step == start_step:  # resumed a finished run: report its checkpoint again for the caller
        save_and_report()
    seconds = time.perf_counter() - t_start
    ips = (step - start_step) * tc.batch_size / seconds if step > start_step else float("nan")
    return DiffusionTrainResult(step=step, curve=curve.rows, images_per_second=ips, seconds=seconds,
                                precision=precision)
