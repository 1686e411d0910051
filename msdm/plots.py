"""Image grids for the pipeline's PNG outputs."""
from __future__ import annotations

from pathlib import Path

import torch


def save_class_grid(images_u8: torch.Tensor, rows: int, columns: int, path: str | Path, *,
                    dataset: str = "", title: str = "") -> None:
    """One row per class, labelled with the class name where the dataset has names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .data import CLASS_NAMES
    from .io import atomic_path

    names = CLASS_NAMES if dataset == "fashion_mnist" else None
    fig, axes = plt.subplots(rows, columns, figsize=(columns * 0.9 + 1.4, rows * 0.9), squeeze=False)
    for r in range(rows):
        for c in range(columns):
            ax = axes[r][c]
            img = images_u8[r * columns + c]
            if img.shape[0] == 1:
                ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=255)
            else:
                ax.imshow(img.permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0 and names is not None:
                ax.set_ylabel(names[r], rotation=0, ha="right", va="center", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(pad=0.2)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def save_row_grid(rows: list[torch.Tensor], labels: list[str], path: str | Path, *, title: str = "") -> None:
    """Rows of uint8 images [N, C, H, W] (all N equal), each row labelled, with a title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .io import atomic_path

    n = len(rows[0])
    fig, axes = plt.subplots(len(rows), n, figsize=(n * 0.9 + 1.6, len(rows) * 0.95 + 0.5), squeeze=False)
    for r, (images, label) in enumerate(zip(rows, labels)):
        for c in range(n):
            ax = axes[r][c]
            img = images[c]
            if img.shape[0] == 1:
                ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=255)
            else:
                ax.imshow(img.permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(pad=0.3)
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
