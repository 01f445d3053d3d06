"""Read a ``.mpq`` file straight into packed tensors, one region at a time.

The payload is streamed in file order: the code bytes of each piece are read directly into the
uint8 tensor that keeps them (no second copy of the file in memory, so the peak resident memory
of a load is the packed model itself plus one small float32 piece); scales, float32 rows and
affine leftovers are small and decoded as they come. The CRC32 of the whole payload is checked
and the tensor table validated before a model is touched, so a truncated or corrupted file
raises :class:`~search_spaces.packed.PackedFileError` before anything runs.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from search_spaces.packed_format import PackedFileError, read_packed_header, unpack_unsigned
from search_spaces.packed_runtime.tensor import PackedPiece, PackedTensor, byte_table, code_values
from search_spaces.quant import SUPPORTED_BITS, dequantize_affine

_CODE_BITS = tuple(b for b in SUPPORTED_BITS if b <= 16)  # widths a "codes" piece can have


@dataclass
class PackedContents:
    """A packed file in memory: packed tensors and the float32 ones, by state-dict key (aliases included).

    ``header`` is the file's header without its ``tensors`` table (consumed here; its Python objects
    would otherwise stay alive next to the model: 0.2 MB for the PTB Transformer's 100 tensors).
    """

    header: dict[str, Any]
    packed: dict[str, PackedTensor] = field(default_factory=dict)
    dense: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class _Region:
    offset: int
    nbytes: int
    target: torch.Tensor | None = None  # uint8 tensor the bytes go into; None: kept as bytes
    data: bytes = b""


class _PayloadStream:
    """Reads payload regions in offset order, keeping a running CRC32 of every byte read."""

    def __init__(self, handle: BinaryIO, path: Path) -> None:
        self.handle, self.path, self.cursor, self.crc = handle, path, 0, 0

    def _read(self, nbytes: int) -> bytes:
        data = self.handle.read(nbytes)
        if len(data) != nbytes:
            raise PackedFileError(f"{self.path}: truncated while reading the payload")
        self.crc = zlib.crc32(data, self.crc)
        return data

    def skip_to(self, offset: int) -> None:
        while self.cursor < offset:  # bytes no piece points at still count for the CRC
            self.cursor += len(self._read(min(offset - self.cursor, 1 << 20)))

    def read(self, region: _Region) -> None:
        if region.offset < self.cursor:
            raise PackedFileError(f"{self.path}: malformed tensor table (overlapping payload regions)")
        self.skip_to(region.offset)
        if region.target is None:
            region.data = self._read(region.nbytes)
        else:
            view = memoryview(region.target.numpy()).cast("B")
            if self.handle.readinto(view) != region.nbytes:
                raise PackedFileError(f"{self.path}: truncated while reading the payload")
            self.crc = zlib.crc32(view, self.crc)
        self.cursor += region.nbytes


def read_packed_contents(path: str | Path) -> PackedContents:
    """The tensors of a packed file, the quantized ones kept packed (see the module docstring)."""
    path = Path(path)
    header, start = read_packed_header(path)
    try:
        plans = [_plan_tensor(entry) for entry in header["tensors"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise PackedFileError(f"{path}: malformed tensor table ({exc})") from exc
    regions = sorted((r for _, _, regs in plans for r in regs), key=lambda r: r.offset)
    if regions and regions[-1].offset + regions[-1].nbytes > header["payload_bytes"]:
        raise PackedFileError(f"{path}: malformed tensor table (a region ends past the payload)")
    try:
        with path.open("rb") as handle:
            handle.seek(start)
            stream = _PayloadStream(handle, path)
            for region in regions:
                stream.read(region)
            stream.skip_to(header["payload_bytes"])
    except OSError as exc:
        raise PackedFileError(f"{path}: cannot read: {exc}") from exc
    if stream.crc != header.get("payload_crc32"):
        raise PackedFileError(f"{path}: corrupted payload (CRC32 mismatch)")
    contents = PackedContents(header)
    tables: dict[int, torch.Tensor] = {}
    try:
        for entry, pieces, _ in plans:
            _finish_tensor(entry, pieces, header["format_version"], tables, contents)
    except (KeyError, TypeError, ValueError) as exc:
        raise PackedFileError(f"{path}: malformed tensor table ({exc})") from exc
    del header["tensors"], plans, regions
    return contents


def _plan_tensor(entry: dict[str, Any]) -> tuple[dict[str, Any], list[tuple[dict[str, Any], list[_Region]]],
                                                 list[_Region]]:
    """The payload regions one tensor entry needs, with the code bytes' destination tensors allocated."""
    shape = [int(s) for s in entry["shape"]]
    cols = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    pieces, regions = [], []
    for piece in entry["pieces"]:
        lo, hi = (int(v) for v in piece["rows"])
        count = (hi - lo) * cols
        if piece["kind"] == "codes":
            bits = int(piece["bits"])
            if bits not in _CODE_BITS or int(piece["nbytes"]) != (bits * count + 7) // 8:
                raise ValueError(f"tensor {entry['name']}: {count} codes of {bits} bits in {piece['nbytes']} bytes")
            codes = _Region(int(piece["offset"]), int(piece["nbytes"]), torch.empty(int(piece["nbytes"]),
                                                                                   dtype=torch.uint8))
            scales = _Region(int(piece["scale_offset"]), 4 * int(piece["scale_count"]))
            own = [codes, scales]
        elif piece["kind"] == "affine":
            own = [_Region(int(piece["offset"]), int(piece["nbytes"])), _Region(int(piece["scale_offset"]), 8)]
        elif piece["kind"] == "fp32":
            if int(piece["nbytes"]) != 4 * count:
                raise ValueError(f"tensor {entry['name']}: {count} float32 values in {piece['nbytes']} bytes")
            own = [_Region(int(piece["offset"]), int(piece["nbytes"]))]
        else:
            raise ValueError(f"unknown piece kind {piece['kind']!r} in tensor {entry['name']}")
        pieces.append((piece, own))
        regions.extend(own)
    return entry, pieces, regions


def _finish_tensor(entry: dict[str, Any], pieces: list[tuple[dict[str, Any], list[_Region]]], version: int,
                   tables: dict[int, torch.Tensor], contents: PackedContents) -> None:
    """Turn one entry's read regions into a :class:`PackedTensor` (any codes) or a float32 tensor."""
    shape = tuple(int(s) for s in entry["shape"])
    names = [entry["name"], *entry["aliases"]]
    if not any(piece["kind"] == "codes" for piece, _ in pieces):
        cols = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        flat = [_dense_piece(piece, own, version, entry["name"], cols) for piece, own in pieces]
        tensor = (torch.cat(flat) if len(flat) > 1 else flat[0]).reshape(shape)
        contents.dense.update(dict.fromkeys(names, tensor))
        return
    cols = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    packed_pieces = []
    for piece, own in pieces:
        lo, hi = (int(v) for v in piece["rows"])
        if piece["kind"] != "codes":
            values = _dense_piece(piece, own, version, entry["name"], cols).view(hi - lo, cols)
            packed_pieces.append(PackedPiece(lo, hi, None, values))
            continue
        bits = int(piece["bits"])
        if bits not in tables:
            tables[bits] = (byte_table(bits) if 8 % bits == 0 else code_values(bits) if bits < 16
                            else torch.empty(0))  # 16 bits decode arithmetically
        scales = torch.from_numpy(np.frombuffer(own[1].data, dtype="<f4").copy())
        if scales.numel() not in (1, hi - lo):
            raise ValueError(f"tensor {entry['name']}: {scales.numel()} scales for {hi - lo} rows")
        scale = scales.reshape(()) if scales.numel() == 1 else scales.view(-1, 1)
        data = _row_aligned(own[0].target, bits, hi - lo, cols)
        packed_pieces.append(PackedPiece(lo, hi, bits, data, scale, tables[bits]))
    tensor = PackedTensor(entry["name"], shape, packed_pieces)
    contents.packed.update(dict.fromkeys(names, tensor))


def _dense_piece(piece: dict[str, Any], own: list[_Region], version: int, name: str, cols: int) -> torch.Tensor:
    """A float32 or affine piece as flat float32 values."""
    lo, hi = piece["rows"]
    count = (int(hi) - int(lo)) * cols
    if piece["kind"] == "fp32":
        return torch.from_numpy(np.frombuffer(own[0].data, dtype="<f4", count=count).copy())
    if piece["kind"] == "affine" and version >= 2:
        codes = unpack_unsigned(own[0].data, int(piece["bits"]), count)
        scale, low = torch.from_numpy(np.frombuffer(own[1].data, dtype="<f4", count=2).copy())
        return dequantize_affine(codes, scale, low)
    raise ValueError(f"unknown piece kind {piece['kind']!r} in tensor {name}")


def _row_aligned(data: torch.Tensor, bits: int, rows: int, cols: int) -> torch.Tensor:
    """The packed bytes as ``[rows, row_bytes]``; rows that do not fill whole bytes are re-laid out,
    each padded to whole bytes (LSB-first bit order kept)."""
    row_bits = cols * bits
    if row_bits % 8 == 0:
        return data.view(rows, row_bits // 8)  # the file's bytes as they are
    bit_array = np.unpackbits(data.numpy(), count=rows * row_bits, bitorder="little").reshape(rows, row_bits)
    padded = np.packbits(bit_array, axis=1, bitorder="little")  # pads each row with zero bits
    return torch.from_numpy(padded)
