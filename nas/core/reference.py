"""Reference FP checkpoints: weights-only ``.safetensors`` files that can be committed.

A reference file holds the ``state_dict`` of an FP model (tensors as they are, no pickle)
and, in the safetensors header metadata, what a ``best.pt`` of ``mpnas train`` holds besides
(config, vocabulary, epoch) plus the provenance of the file: its valid/test perplexity,
the command that trained it, the git revision and the creation date. Every metadata value
is JSON-encoded (safetensors metadata maps strings to strings).

Tied weights (a Transformer's, or a ``tie_weights`` LSTM's ``decoder.weight`` is its
``embedding.weight``) are stored once; the metadata entry ``aliases`` maps each alias to
the stored key, and :func:`load_reference` returns both keys bound to the same tensor.

:func:`nas.core.checkpoint.load_checkpoint` reads these files too, so every ``--checkpoint``
option accepts ``benchmarks/checkpoints/ptb_lstm.safetensors`` as it accepts a ``best.pt``.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from nas.core.atomic import atomic_write_bytes
from nas.core.errors import CheckpointError

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "SUFFIX", "is_reference", "load_reference", "save_reference"]

logger = logging.getLogger(__name__)

FORMAT_NAME = "mpnas-reference"
FORMAT_VERSION = 1
SUFFIX = ".safetensors"

# Metadata entries every reference file has (each value JSON-encoded).
_REQUIRED = ("format", "format_version", "config", "vocab", "valid_ppl", "test_ppl", "epoch", "command",
             "revision", "created", "aliases")


def is_reference(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a reference checkpoint (by its ``.safetensors`` suffix)."""
    return Path(path).suffix == SUFFIX


def _storage_key(tensor: torch.Tensor) -> tuple[int, int, tuple[int, ...], tuple[int, ...], torch.dtype]:
    """Identifies a tensor's exact view of its storage: equal keys mean the same values, always."""
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
            tuple(tensor.stride()), tensor.dtype)


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors to store (each storage view once) and the aliases ``{alias: stored key}``."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict entry {name!r} is a {type(value).__name__}, not a tensor")
        key = _storage_key(value)
        if key in seen and value.numel() > 0:  # empty tensors may all report data_ptr 0
            aliases[name] = seen[key]
            continue
        # A tie that a clone broke (best.pt of older runs holds the tied decoder as a copy):
        # an equal tensor of the same shape is stored once too; loading copies values anyway.
        # Matrices only: equal vectors (an untrained model's zero biases, LayerNorm ones) are not ties.
        twin = next((n for n, t in tensors.items() if value.dim() >= 2 and t.shape == value.shape
                     and t.dtype == value.dtype and torch.equal(t, value.detach().cpu())), None)
        if twin is not None:
            aliases[name] = twin
            continue
        seen[key] = name
        # A private, contiguous CPU copy: safetensors refuses tensors that share memory, and
        # views that only partly overlap another entry (none in mpnas models) are stored apart.
        tensors[name] = value.detach().to("cpu", copy=True).contiguous()
    return tensors, aliases


def save_reference(path: str | os.PathLike, ckpt: dict[str, Any], *, valid_ppl: float, test_ppl: float,
                   command: str, revision: str, extra: dict[str, Any] | None = None) -> Path:
    """Write ``ckpt`` (a ``best.pt`` of ``mpnas train``) as a reference ``.safetensors`` file, atomically.

    ``ckpt`` needs ``model`` (a state_dict), ``config`` (``{'type': ..., **kwargs}``) and
    ``vocab``; ``epoch`` is kept when present. ``valid_ppl``/``test_ppl`` are the perplexities
    the file is published with, ``command`` the command line that trained it and
    ``revision`` the git revision. ``extra`` adds JSON-serialisable metadata entries (e.g.
    ``valid_slice_tokens``/``valid_slice_ppl``); it may not replace the entries above.
    Returns the path written.
    """
    path = Path(path)
    if not is_reference(path):
        raise CheckpointError(f"{path}: a reference checkpoint needs the {SUFFIX} suffix")
    for key in ("model", "config", "vocab"):
        if key not in ckpt:
            raise CheckpointError(f"checkpoint for {path} has no '{key}' (expected a best.pt of `mpnas train`)")
    config = ckpt["config"]
    if not isinstance(config, dict) or not isinstance(config.get("type"), str):
        raise CheckpointError(f"checkpoint for {path}: 'config' must be a dict with a 'type', got {config!r}")
    tensors, aliases = _dedupe(ckpt["model"])
    entries: dict[str, Any] = {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION, "config": config, "vocab": list(ckpt["vocab"]),
        "valid_ppl": float(valid_ppl), "test_ppl": float(test_ppl), "epoch": ckpt.get("epoch"),
        "command": command, "revision": revision, "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "aliases": aliases,
    }
    for key, value in (extra or {}).items():
        if key in entries:
            raise CheckpointError(f"extra metadata {key!r} would replace a standard entry of {path}")
        entries[key] = value
    metadata = {key: json.dumps(value, sort_keys=True) for key, value in entries.items()}
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata=metadata))
    logger.info("wrote %s: %d tensors (%d aliases), %d bytes", path, len(tensors), len(aliases),
                path.stat().st_size)
    return path


def _decode(path: Path, metadata: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, text in metadata.items():
        try:
            meta[key] = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: metadata entry {key!r} is not JSON ({exc})") from None
    return meta


def load_reference(path: str | os.PathLike) -> dict[str, Any]:
    """Read a file of :func:`save_reference`; returns the shape of a ``best.pt``.

    ``{"model": state_dict, "config", "vocab", "valid_ppl", "test_ppl", "epoch", "meta"}``,
    where aliased keys of the state_dict are the same tensor as their stored key and ``meta``
    holds every metadata entry, decoded. Raises :class:`FileNotFoundError` for a missing
    file and :class:`nas.core.errors.CheckpointError` (a ``ValueError``), naming the file, for a
    truncated or corrupted file, a safetensors file that is not an mpnas reference, or an
    unknown format version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            raw = handle.metadata()
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors reports a truncated or corrupt file in several ways
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    if not raw or "format" not in raw:
        raise CheckpointError(f"{path}: a safetensors file without mpnas metadata; not an mpnas reference checkpoint")
    if raw["format"] != json.dumps(FORMAT_NAME):  # e.g. {"format": "pt"} of Hugging Face files
        raise CheckpointError(f"{path}: metadata format {raw['format']!r}, not an mpnas reference checkpoint "
                              f"({FORMAT_NAME!r})")
    meta = _decode(path, raw)
    missing = [key for key in _REQUIRED if key not in meta]
    if missing:
        raise CheckpointError(f"{path}: not a complete mpnas reference checkpoint "
                              f"(metadata lacks {', '.join(missing)})")
    if meta["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: {FORMAT_NAME} format version {meta['format_version']!r}; "
                              f"this mpnas reads version {FORMAT_VERSION}")
    config, aliases = meta["config"], meta["aliases"]
    if not isinstance(config, dict) or not isinstance(config.get("type"), str):
        raise CheckpointError(f"{path}: metadata 'config' must be an object with a 'type', got {config!r}")
    if not isinstance(meta["vocab"], list):
        raise CheckpointError(f"{path}: metadata 'vocab' must be a list of words")
    if not isinstance(aliases, dict):
        raise CheckpointError(f"{path}: metadata 'aliases' must be an object, got {aliases!r}")
    for alias, target in aliases.items():
        if target not in state:
            raise CheckpointError(f"{path}: alias {alias!r} points to {target!r}, which the file does not store")
        state[alias] = state[target]
    return {"model": state, "config": config, "vocab": meta["vocab"], "valid_ppl": meta["valid_ppl"],
            "test_ppl": meta["test_ppl"], "epoch": meta["epoch"], "meta": meta}
