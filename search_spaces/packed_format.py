"""Packed model files: low-bit codes stored at their real width, no pickle.

Layout of a ``.mpq`` file (all integers little-endian):

====================  =====================================================================
bytes                 content
====================  =====================================================================
8                     magic ``b"MPNASPK1"``
8                     ``H``: length of the JSON header in bytes (uint64)
H                     JSON header (UTF-8), see below
rest                  payload: the byte blocks the header points at, back to back
====================  =====================================================================

The header holds ``format_version``, ``model`` (the config :func:`~search_spaces.models.model_from_config` takes),
``precision`` (the precision map as a dict), ``payload_bytes``, ``payload_crc32`` and
``tensors``: one entry per state-dict tensor (tied tensors once, with ``aliases``), each a
list of ``pieces`` covering its rows in order. A piece is one of:

- ``{"kind": "fp32", "rows", "offset", "nbytes"}``: raw float32.
- ``{"kind": "codes", "cluster", "bits", "rows", "offset", "nbytes", "scale_offset",
  "scale_count"}``: ``numel`` codes bit-packed at ``bits`` bits each (code ``q`` stored as
  ``q + qmax``, or ``(q + 1) / 2`` at 1 bit, least significant bit first) followed by
  ``scale_count`` float32 scales (one per cluster, or one per row at row granularity).
  Dequantization is ``codes * scale`` exactly as :func:`search_spaces.quant.dequantize`
  computes it, so a reload is bit-identical.
- ``{"kind": "affine", "bits", "rows", "offset", "nbytes", "scale_offset"}`` (format 2): a
  leftover tensor (bias, LayerNorm; the map's ``leftover_bits``) as ``numel`` unsigned codes,
  uint8 at 8 bits or little-endian uint16 at 16, and at ``scale_offset`` two float32, the
  scale and the minimum ``low``; the value is ``low + scale * code`` exactly as
  :func:`search_spaces.quant.dequantize_affine` computes it.

``format_version`` is the lowest version that describes the file: 1 without affine pieces
(the files of every earlier mpnas, still written that way so they stay readable by it), 2 with
them, so an older reader refuses a file it cannot decode with a clear message instead of
failing on an unknown piece. This reader reads both.

Writing and loading models: :mod:`search_spaces.packed`.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nas.core.errors import MpnasError
from search_spaces.quant import dequantize, dequantize_affine, qmax

MAGIC = b"MPNASPK1"


FORMAT_VERSION = 2  # the newest layout this module reads and writes


READ_VERSIONS = (1, 2)


AFFINE_VERSION = 2  # first format with "affine" pieces


PLAIN_MODULE = "module"  # the header's model type of a plain torch module (no config to rebuild it from)


_UNSIGNED = {8: np.dtype("<u1"), 16: np.dtype("<u2")}  # storage of affine codes by bit width


class PackedFileError(MpnasError):
    """A packed file is truncated, corrupted or not a packed file; the message names it."""


def pack_codes(codes: torch.Tensor, bits: int) -> bytes:
    """Bit-pack integer codes at ``bits`` bits each (LSB first)."""
    flat = codes.detach().cpu().reshape(-1).to(torch.int64).numpy()
    unsigned = (flat + 1) // 2 if bits == 1 else flat + qmax(bits)
    bit_matrix = ((unsigned[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
    return np.packbits(bit_matrix.reshape(-1), bitorder="little").tobytes()


def signed_codes(stored: Any, bits: int) -> Any:
    """The signed codes of stored unsigned ones (numpy or torch integers): ``2u - 1`` at 1 bit, else ``u - qmax``."""
    return stored * 2 - 1 if bits == 1 else stored - qmax(bits)


def unpack_codes(payload: bytes, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``count`` signed codes as int64."""
    if len(payload) * 8 < bits * count:
        raise PackedFileError(f"{count} codes of {bits} bits need {(bits * count + 7) // 8} bytes, "
                              f"got {len(payload)}")
    bit_array = np.unpackbits(np.frombuffer(payload, dtype=np.uint8), count=bits * count, bitorder="little")
    unsigned = (bit_array.reshape(count, bits).astype(np.int64) << np.arange(bits)).sum(axis=1)
    return torch.from_numpy(signed_codes(unsigned, bits))


def pack_unsigned(codes: torch.Tensor, bits: int) -> bytes:
    """Unsigned affine codes as uint8 (8 bits) or little-endian uint16 (16 bits)."""
    return codes.detach().cpu().reshape(-1).numpy().astype(_UNSIGNED[bits]).tobytes()


def unpack_unsigned(payload: bytes, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_unsigned`: ``count`` codes as int32."""
    dtype = _UNSIGNED.get(bits)
    if dtype is None:
        raise PackedFileError(f"affine codes of {bits} bits are not supported; expected one of {sorted(_UNSIGNED)}")
    if len(payload) < dtype.itemsize * count:
        raise PackedFileError(f"{count} codes of {bits} bits need {dtype.itemsize * count} bytes, got {len(payload)}")
    return torch.from_numpy(np.frombuffer(payload, dtype=dtype, count=count).astype(np.int32))


def _parse_header(path: Path, head: bytes, file_size: int) -> tuple[dict[str, Any], int]:
    """The checked header of a packed file and where its payload starts.

    ``head`` holds at least the file's first 16 bytes and, when they are right, its whole header;
    ``file_size`` is the file's length in bytes. Every failure is a :class:`PackedFileError`
    naming ``path``. The payload's CRC is the caller's to check.
    """
    if file_size < 16 or len(head) < 16 or head[:8] != MAGIC:
        raise PackedFileError(f"{path}: not an mpnas packed file (bad magic; expected {MAGIC!r})")
    (header_len,) = struct.unpack("<Q", head[8:16])
    if 16 + header_len > file_size or 16 + header_len > len(head):
        raise PackedFileError(f"{path}: truncated: header of {header_len} bytes, file has {file_size}")
    try:
        header = json.loads(bytes(head[16 : 16 + header_len]).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PackedFileError(f"{path}: corrupted header ({exc})") from exc
    if not isinstance(header, dict) or header.get("format_version") not in READ_VERSIONS:
        version = header.get("format_version") if isinstance(header, dict) else None
        raise PackedFileError(f"{path}: format_version {version!r} is not supported "
                              f"(this mpnas reads {', '.join(map(str, READ_VERSIONS))}); upgrade mpnas")
    payload_bytes = file_size - 16 - header_len
    if payload_bytes != header.get("payload_bytes"):
        raise PackedFileError(f"{path}: truncated or padded: payload has {payload_bytes} bytes, header says "
                              f"{header.get('payload_bytes')}")
    return header, 16 + header_len


def read_packed_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """The checked header of a packed file and the offset of its payload, without reading the payload.

    The payload's size is checked against the header; its CRC is not (that needs the payload).
    """
    path = Path(path)
    try:
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            head = handle.read(16)
            if len(head) == 16 and head[:8] == MAGIC:
                # never more than the file holds: a corrupted length must not allocate exabytes
                head += handle.read(min(struct.unpack("<Q", head[8:16])[0], size - 16))
    except OSError as exc:
        raise PackedFileError(f"{path}: cannot read: {exc}") from exc
    return _parse_header(path, head, size)


def read_packed(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a packed file into ``(header, state_dict)``; every failure names the file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PackedFileError(f"{path}: cannot read: {exc}") from exc
    header, start = _parse_header(path, raw, len(raw))
    payload = raw[start:]
    if zlib.crc32(payload) != header.get("payload_crc32"):
        raise PackedFileError(f"{path}: corrupted payload (CRC32 mismatch)")
    try:
        state = {}
        for entry in header["tensors"]:
            tensor = _decode_tensor(entry, payload, header["format_version"])
            for name in [entry["name"], *entry["aliases"]]:
                state[name] = tensor
    except (KeyError, TypeError, ValueError) as exc:
        raise PackedFileError(f"{path}: malformed tensor table ({exc})") from exc
    return header, state


def _decode_tensor(entry: dict[str, Any], payload: bytes, version: int) -> torch.Tensor:
    shape = entry["shape"]
    rows = shape[0] if shape else 1
    parts = []
    for piece in entry["pieces"]:
        block = payload[piece["offset"] : piece["offset"] + piece["nbytes"]]
        lo, hi = piece["rows"]
        count = (hi - lo) * (int(np.prod(shape[1:])) if len(shape) > 1 else 1)
        if piece["kind"] == "fp32":
            parts.append(torch.from_numpy(np.frombuffer(block, dtype=np.float32, count=count).copy()))
        elif piece["kind"] == "codes":
            codes = unpack_codes(block, piece["bits"], count)
            start = piece["scale_offset"]
            scales = torch.from_numpy(np.frombuffer(payload[start : start + 4 * piece["scale_count"]],
                                                    dtype=np.float32).copy())
            sub_shape = [hi - lo, *shape[1:]] if shape else []
            alpha = scales.reshape([] if piece["scale_count"] == 1 else [hi - lo] + [1] * (len(shape) - 1))
            parts.append(dequantize(codes.reshape(sub_shape), alpha).reshape(-1))
        elif piece["kind"] == "affine" and version >= AFFINE_VERSION:
            parts.append(_decode_affine(piece, block, payload, count))
        else:
            raise ValueError(f"unknown piece kind {piece['kind']!r} in tensor {entry['name']}")
    flat = torch.cat(parts) if parts else torch.zeros(0)
    if flat.numel() != int(np.prod(shape)) or rows == 0 and shape:
        raise ValueError(f"tensor {entry['name']} decodes to {flat.numel()} values, shape {shape} needs "
                         f"{int(np.prod(shape))}")
    return flat.reshape(shape)


def _decode_affine(piece: dict[str, Any], block: bytes, payload: bytes, count: int) -> torch.Tensor:
    codes = unpack_unsigned(block, piece["bits"], count)
    start = piece["scale_offset"]
    scale, low = torch.from_numpy(np.frombuffer(payload[start : start + 8], dtype=np.float32, count=2).copy())
    return dequantize_affine(codes, scale, low)
