"""Atomic checkpoint files: write to a temporary file in the same folder, then rename.

:func:`load_checkpoint` also reads the weights-only ``.safetensors`` reference files of
:mod:`nas.core.reference`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from nas.core.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from nas.core.errors import CheckpointError
from nas.core.reference import is_reference, load_reference

__all__ = ["atomic_write_bytes", "atomic_write_json", "atomic_write_text", "load_checkpoint", "save_checkpoint"]


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` a dict of tensors and plain values atomically."""
    path = Path(path)
    if is_reference(path):
        raise ValueError(f"{path}: save_checkpoint writes torch.save files; write .safetensors references "
                         "with nas.core.reference.save_reference")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors and plain values only).

    A ``.safetensors`` path is read with :func:`nas.core.reference.load_reference`: the same keys
    as a ``best.pt`` (``model``, ``config``, ``vocab``, ...) plus its ``meta``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    if is_reference(path):
        return load_reference(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated or foreign files surface as many torch/pickle errors
        raise CheckpointError(f"{path}: not a readable mpnas checkpoint ({exc})") from exc
