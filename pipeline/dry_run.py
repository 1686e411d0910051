"""`python -m stages.train --dry-run`: the configured run's size and cost, without data or compute.

The model is built for the latent shape the params imply (image_size / downsample, K*C
channels) on PyTorch's 'meta' device (no memory, no compute); its parameters are counted and
its FLOPs per image measured with torch.utils.flop_counter.
"""
from __future__ import annotations

from pathlib import Path

from msdm.config import Params

# Train-split sizes (the datasets' published counts), for the dry run's memory estimate.
TRAIN_IMAGES = {"fashion_mnist": 60_000, "cifar10": 50_000, "celeba": 162_770, "lsun_bedroom": 3_033_042,
                "lsun_church": 126_227, "imagenet": 1_281_167}


def planned_latent_info(params: Params):
    """The LatentInfo the encode stage will produce for these params, without any data."""
    from msdm.data import NUM_CLASSES
    from msdm.diffusion_training import LatentInfo

    ae = params.autoencoder
    classes = NUM_CLASSES[params.data.dataset]
    return LatentInfo(channels=ae.subspaces * ae.channels, size=params.data.image_size // ae.downsample,
                      subspaces=ae.subspaces, num_classes=classes if classes > 1 else 0)


def model_cost(params: Params) -> dict:
    """Parameter counts and FLOPs per image of the configured model, measured on the meta device.

    FLOPs are what torch.utils.flop_counter counts (matmuls, convolutions, attention; 2 per
    multiply-add) for one image through the backbone: forward, and forward + backward of a
    training step. Elementwise ops, the loss, the optimiser and the EMA are not counted.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from msdm.diffusion_training import build_model

    info = planned_latent_info(params)
    with torch.device("meta"):
        model = build_model(params, info)
    backbone = model.backbone
    x = torch.zeros(1, info.channels, info.size, info.size, device="meta")
    t = torch.zeros(1, dtype=torch.long, device="meta")
    y = torch.zeros(1, dtype=torch.long, device="meta") if info.num_classes > 0 else None
    forward = FlopCounterMode(display=False)
    with forward:
        backbone(x, t, y)
    training = FlopCounterMode(display=False)
    with training:
        backbone(x, t, y).float().square().mean().backward()
    grid = info.size // params.model.patch_size
    return {"info": info, "tokens": grid * grid, "extra_tokens": backbone.extras,
            "learn_sigma": backbone.learn_sigma, "out_channels": backbone.out_channels,
            "params_backbone": sum(p.numel() for p in backbone.parameters()),
            "params_total": sum(p.numel() for p in model.parameters()),
            "forward_flops": forward.get_total_flops(), "train_flops": training.get_total_flops()}


def dry_run_report(params: Params, autoencoder: str | Path) -> dict:
    """Everything the dry run prints, as plain numbers (`autoencoder`: the stage-1 model it would use)."""
    from msdm.models.vit import VIT_PRESETS

    cost = model_cost(params)
    info = cost.pop("info")
    tc, ev, ae = params.train, params.eval, params.autoencoder
    guided = info.num_classes > 0 and ev.cfg_scale != 1.0
    sample_flops = cost["forward_flops"] * ev.sampling_steps * (2 if guided else 1)
    n_train = TRAIN_IMAGES[params.data.dataset]
    preset = VIT_PRESETS[params.model.preset]
    return {
        "dataset": params.data.dataset, "image_size": params.data.image_size, "num_classes": info.num_classes,
        "codec": ae.kind, "codec_path": ae.path if ae.kind == "sd-vae" else str(autoencoder),
        "latent_shape": [info.channels, info.size, info.size], "subspaces": info.subspaces,
        "channels_per_subspace": ae.channels, "preset": params.model.preset, "dim": preset.dim,
        "depth": preset.depth, "heads": preset.heads, "patch_size": params.model.patch_size,
        "strategy": params.weighting.strategy, **cost,
        "batch_size": tc.batch_size, "num_workers": tc.num_workers, "steps": tc.steps,
        "train_flops_per_step": cost["train_flops"] * tc.batch_size,
        "train_flops_total": cost["train_flops"] * tc.batch_size * tc.steps,
        "sampler": ev.sampler, "sampling_steps": ev.sampling_steps, "cfg_scale": ev.cfg_scale,
        "sample_flops": sample_flops, "final_num_samples": ev.final_num_samples,
        "final_fid_sampling_flops": sample_flops * ev.final_num_samples,
        "train_images": n_train, "latent_bytes": n_train * info.channels * info.size * info.size * 4,
    }


def format_report(r: dict) -> str:
    def g(flops: float) -> str:
        for unit, scale in (("EFLOPs", 1e18), ("PFLOPs", 1e15), ("TFLOPs", 1e12)):
            if flops >= scale:
                return f"{flops / scale:,.2f} {unit}"
        return f"{flops / 1e9:,.2f} GFLOPs"

    c, s, _ = r["latent_shape"]
    classes = f"{r['num_classes']} classes" if r["num_classes"] else "unconditional"
    sigma = f", learned variance ({r['strategy']}): {r['out_channels']} output channels" if r["learn_sigma"] else ""
    guidance = f" x 2 (guidance {r['cfg_scale']})" if r["cfg_scale"] != 1.0 and r["num_classes"] else ""
    return "\n".join([
        "train --dry-run: model built on the meta device; no data read, nothing trained or written",
        f"  data          {r['dataset']} {r['image_size']}x{r['image_size']}, {classes}, "
        f"{r['train_images']:,} train images",
        f"  codec         {r['codec']} ({r['codec_path']}) -> latents {c}x{s}x{s} "
        f"= {r['subspaces']} subspaces x {r['channels_per_subspace']} channels",
        f"  backbone      {r['preset']}/{r['patch_size']}: dim {r['dim']}, depth {r['depth']}, heads {r['heads']}, "
        f"{r['tokens']} patch tokens + {'time and class tokens' if r['extra_tokens'] == 2 else 'a time token'}{sigma}",
        f"  parameters    {r['params_total']:,} ({r['params_backbone']:,} backbone, "
        f"{r['params_total'] - r['params_backbone']:,} weighting)",
        f"  per image     forward {g(r['forward_flops'])}; training forward+backward {g(r['train_flops'])}",
        f"  per step      batch {r['batch_size']} over {r['num_workers']} worker(s): {g(r['train_flops_per_step'])}",
        f"  whole run     {r['steps']:,} steps: {r['train_flops_total']:.3g} FLOPs",
        f"  sampling      {r['sampler']} {r['sampling_steps']} steps{guidance}: {g(r['sample_flops'])} per image; "
        f"final FID over {r['final_num_samples']:,} samples: {r['final_fid_sampling_flops']:.3g} FLOPs "
        f"(codec decode not counted)",
        f"  latent set    {r['train_images']:,} x {c}x{s}x{s} float32 = {r['latent_bytes'] / 1e9:,.1f} GB "
        f"(msdm.diffusion_training.train_loop holds all of it on every worker's device)",
        "  (FLOPs by torch.utils.flop_counter: matmuls, convolutions, attention; 2 per multiply-add)",
    ])
