"""Image grids for the pipeline's PNG outputs."""
from __future__ import annotations

from pathlib import Path

import torch


def save_class_grid(images_u8: torch.Tensor, rows: int, columns: int, path: str | Path, *,
                    dataset: str = "", title: str = "") -> None:
    """One row per class, labelled with the class name where the dataset has names."""
    from .data import CLASS_NAMES

    names = CLASS_NAMES if dataset == "fashion_mnist" else [""] * rows
    save_row_grid([images_u8[r * columns:(r + 1) * columns] for r in range(rows)], list(names[:rows]), path,
                  title=title)


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
    height = len(rows) * 0.95 + 0.5
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(pad=0.3, rect=(0, 0, 1, 1 - 0.35 / height if title else 1))  # room for the title
    with atomic_path(Path(path)) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
