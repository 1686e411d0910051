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


# ---------------------------------------------------------------------------- artefacts
#
# Every model and checkpoint the pipeline writes carries a record of what it is and a hash of
# its content: {"artefact": {"kind", "format", "sha256"}, ...payload}. torch's zip container
# does not check its data on load, so a flipped byte in a weight loads silently without this.

ARTEFACT_FORMAT = 1
# The kinds, one per file the pipeline trusts (models/*.pt and the training checkpoints)
AUTOENCODER_ARTEFACT = "autoencoder"            # multi-space or imported SD-VAE: models/autoencoder.pt
FEATURENET_ARTEFACT = "featurenet"              # models/featurenet.pt
DIFFUSION_CHECKPOINT_ARTEFACT = "diffusion training checkpoint"  # state.pt in each Ray Train checkpoint
DIFFUSION_MODEL_ARTEFACT = "diffusion model"    # models/diffusion.pt: the EMA weights


def content_digest(obj: Any) -> str:
    """SHA-256 of a payload's content: every tensor's dtype, shape and bytes, every other value's
    repr, in a fixed order. The same content hashes the same however it was serialised."""
    import hashlib

    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.view(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}|".encode())
        for key in sorted(obj, key=repr):
            _feed(h, key)
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}|".encode())
        for item in obj:
            _feed(h, item)
    else:
        h.update(f"S{obj!r}|".encode())


def save_artefact(payload: dict, path: str | Path, kind: str) -> None:
    """Atomically write `payload` with its kind, format and content hash."""
    record = {"kind": kind, "format": ARTEFACT_FORMAT, "sha256": content_digest(payload)}
    atomic_torch_save({**payload, "artefact": record}, path)


def load_artefact(path: str | Path, kind: str) -> dict:
    """The payload `save_artefact` wrote, after checking that it is a `kind` and that its content
    still matches its hash; anything else is a CorruptFileError naming the file."""
    payload = safe_torch_load(path)
    record = payload.get("artefact") if isinstance(payload, dict) else None
    if not isinstance(record, dict):
        raise CorruptFileError(f"{path}: not a pipeline artefact of kind {kind!r} (it has no kind/format/hash "
                               f"record, so it was not written by this pipeline, or by an older version of it)")
    if record.get("kind") != kind:
        raise CorruptFileError(f"{path}: holds a {record.get('kind')!r} artefact, expected {kind!r}")
    if record.get("format") != ARTEFACT_FORMAT:
        raise CorruptFileError(f"{path}: {kind} format {record.get('format')!r}, this code reads {ARTEFACT_FORMAT}")
    payload = {k: v for k, v in payload.items() if k != "artefact"}
    if content_digest(payload) != record.get("sha256"):
        raise CorruptFileError(f"{path}: content does not match the SHA-256 recorded when it was written; the "
                               f"file was damaged or changed since")
    return payload
