"""Writing and loading packed model files (``.mpq``): :func:`export_packed`, :func:`load_packed`.

The file layout, and reading it back to tensors: :mod:`search_spaces.packed_format`. Loading with
``keep_packed`` keeps the codes packed in memory: :mod:`search_spaces.packed_runtime`.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nas.core.atomic import atomic_write_bytes
from search_spaces.apply import quantize_all_
from search_spaces.clusters import Cluster, find_clusters
from search_spaces.models import model_config_dict, model_from_config
from search_spaces.models.protocol import unwrap
from search_spaces.packed_format import (
    AFFINE_VERSION,
    MAGIC,
    PLAIN_MODULE,
    PackedFileError,
    pack_codes,
    pack_unsigned,
    read_packed,
)
from search_spaces.packed_runtime import load_packed_model
from search_spaces.precision import PrecisionMap
from search_spaces.quant import FULL_PRECISION, AffineResult


def _state_key(cluster: Cluster) -> str:
    return f"{cluster.module}.{cluster.param}" if cluster.module else cluster.param


def _scales_bytes(alpha: torch.Tensor) -> bytes:
    return alpha.detach().cpu().to(torch.float32).reshape(-1).numpy().tobytes()


def export_packed(model: nn.Module, precision: PrecisionMap, path: str | Path) -> dict[str, Any]:
    """Quantize ``model`` in place at ``precision`` and write it packed to ``path`` (atomically).

    Returns the header, which holds an mpnas model's config (a plain torch module's class only:
    :func:`load_packed` then fills a skeleton). After the call the model's weights equal what
    :func:`load_packed` returns, bit for bit.
    """
    quantized = quantize_all_(model, precision)
    results = quantized.clusters
    # Leftover results hold views of the live tensors: find each one's entry by its storage.
    leftovers = {(r.weight.data_ptr(), tuple(r.weight.shape)): r for r in quantized.leftovers.values()}
    clusters = find_clusters(model)
    by_tensor: dict[str, list[Cluster]] = {}
    for cluster in clusters.values():
        by_tensor.setdefault(_state_key(cluster), []).append(cluster)
    payload = bytearray()

    def put(block: bytes) -> tuple[int, int]:
        offset = len(payload)
        payload.extend(block)
        return offset, len(block)

    groups: dict[tuple[int, tuple[int, ...]], list[str]] = {}  # tied tensors share storage and shape
    state = model.state_dict(keep_vars=True)
    for key, tensor in state.items():
        groups.setdefault((tensor.data_ptr(), tuple(tensor.shape)), []).append(key)
    entries: list[dict[str, Any]] = []
    for group, keys in groups.items():
        key, tensor = keys[0], state[keys[0]]
        entry: dict[str, Any] = {"name": key, "shape": list(tensor.shape), "aliases": keys[1:], "pieces": []}
        entries.append(entry)
        data = tensor.detach().cpu()
        rows = data.shape[0] if data.dim() else 1
        if group in leftovers:  # a leftover is a whole tensor outside every cluster
            entry["pieces"].append(_affine_piece(leftovers[group], precision.leftover_bits, rows, put))
            continue
        owners = sorted((c for k in keys for c in by_tensor.get(k, [])), key=lambda c: (c.rows or (0, rows))[0])
        entry["pieces"] += _row_pieces(data, rows, owners, precision, results, put)
    version = AFFINE_VERSION if leftovers else 1
    header = {"format_version": version, "model": _model_header(model),
              "precision": precision.to_dict(), "tensors": entries, "payload_bytes": len(payload),
              "payload_crc32": zlib.crc32(payload)}
    blob = json.dumps(header, sort_keys=True).encode("utf-8")
    atomic_write_bytes(Path(path), MAGIC + struct.pack("<Q", len(blob)) + blob + bytes(payload))
    return header


def _row_pieces(data: torch.Tensor, rows: int, owners: list[Cluster], precision: PrecisionMap,
                results: dict[str, Any], put: Any) -> list[dict[str, Any]]:
    """The pieces of one tensor, in row order: its clusters' codes (or FP32 at 32 bits), FP32 between."""
    pieces: list[dict[str, Any]] = []
    cursor = 0
    for cluster in owners:
        lo, hi = cluster.rows or (0, rows)
        if lo > cursor:  # rows no cluster claims stay FP32
            pieces.append(_fp32_piece(data[cursor:lo], (cursor, lo), put))
        bits = int(precision.bits[cluster.name])
        if bits >= FULL_PRECISION:
            pieces.append(_fp32_piece(data[lo:hi], (lo, hi), put))
        else:
            result = results[cluster.name]
            offset, nbytes = put(pack_codes(result.codes, bits))
            scale_offset, scale_bytes = put(_scales_bytes(result.alpha))
            pieces.append({"kind": "codes", "cluster": cluster.name, "bits": bits, "rows": [lo, hi],
                           "offset": offset, "nbytes": nbytes, "scale_offset": scale_offset,
                           "scale_count": scale_bytes // 4})
        cursor = hi
    if cursor < rows or not pieces:
        pieces.append(_fp32_piece(data.reshape(rows, -1)[cursor:] if data.dim() else data, (cursor, rows), put))
    return pieces


def _model_header(model: nn.Module) -> dict[str, Any]:
    """The header's ``model``: an mpnas model's config, else ``{"type": "module", "class": ...}``."""
    try:
        return model_config_dict(model)
    except TypeError:
        cls = type(unwrap(model))
        return {"type": PLAIN_MODULE, "class": f"{cls.__module__}.{cls.__qualname__}"}


def _fp32_piece(data: torch.Tensor, rows: tuple[int, int], put: Any) -> dict[str, Any]:
    offset, nbytes = put(data.to(torch.float32).contiguous().numpy().tobytes())
    return {"kind": "fp32", "rows": list(rows), "offset": offset, "nbytes": nbytes}


def _affine_piece(result: AffineResult, bits: int, rows: int, put: Any) -> dict[str, Any]:
    offset, nbytes = put(pack_unsigned(result.codes, bits))
    scale_offset, _ = put(torch.stack([result.scale, result.low]).to(torch.float32).cpu().numpy().tobytes())
    return {"kind": "affine", "bits": bits, "rows": [0, rows], "offset": offset, "nbytes": nbytes,
            "scale_offset": scale_offset}


def load_packed(path: str | Path, model: nn.Module | None = None, *, keep_packed: bool = False,
                options: Any = None) -> tuple[nn.Module, PrecisionMap]:
    """The runnable model stored in a packed file, and its precision map.

    Without ``model`` the mpnas model the header describes is built. With ``model`` (a skeleton:
    the same architecture, any weights; a plain torch module or an mpnas model) its weights are
    overwritten in place with the file's and it is returned; a file of a plain torch module needs
    one. The map is checked against the model's clusters.

    ``keep_packed=True`` keeps the quantized weights bit-packed in memory and dequantizes them
    block by block inside the matmuls (:mod:`search_spaces.packed_runtime`; ``options``: its
    ``PackedOptions``): the same logits in a fraction of the memory, inference only.
    """
    if keep_packed:
        return load_packed_model(path, model, options)
    header, state = read_packed(path)
    config = dict(header.get("model") or {})
    if model is None and config.get("type") == PLAIN_MODULE:
        raise PackedFileError(f"{path}: holds the weights of a plain torch module ({config.get('class')}), not "
                              "an mpnas model; pass model= a skeleton of that module to fill")
    try:
        if model is None:
            model = model_from_config(config)
        model.load_state_dict(state)
        precision = PrecisionMap.from_dict(header["precision"])
        precision.validate(model)
    except (KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise PackedFileError(f"{path}: header does not describe a loadable model ({exc})") from exc
    return model, precision
