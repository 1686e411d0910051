"""Atomic writes and safe loads.

Every file a later stage trusts is written to a temporary sibling and renamed into
place, so an interrupted write never leaves a half file behind. Checkpoints are
loaded with `weights_only=True`: a pickled payload is refused, not executed.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch


_UMASK = os.umask(0)
os.umask(_UMASK)


class CorruptFileError(RuntimeError):
    """A file exists but cannot be read as what it should be."""


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it onto `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; outputs get the usual permissions
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_write_text(text: str, path: str | Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(obj: Any, path: str | Path) -> None:
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def safe_torch_load(path: str | Path) -> Any:
    """Load a torch file with `weights_only=True`, turning every failure into a clear error.

    The message names the file and what is wrong with it; the caller (a stage) adds how to
    remake it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for corrupt/unsafe files
        raise CorruptFileError(
            f"{path}: cannot be loaded as a weights-only torch file "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). "
            f"It is truncated, corrupt, or carries a pickled payload that is refused."
        ) from None


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, streamed (an imported SD VAE is a 335 MB file)."""
    import hashlib

    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
