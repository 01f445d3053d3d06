"""A weight tensor kept bit-packed in memory, dequantized a block of rows (or a set of rows) at a time.

A :class:`PackedTensor` is the in-memory form of one tensor of a ``.mpq`` file: its row pieces
in order, each either codes at their real width (1-6 or 8 bits, exactly the file's bytes) with
their float32 scales, or float32 rows. Dequantizing rows gives exactly the values of
:func:`search_spaces.quant.dequantize` (``float32(code) * scale``), so a packed model computes
with the same weights as the unpacked one.

Decoding: rows whose codes fill whole bytes (``cols * bits % 8 == 0``, every PTB layer) are the
file's bytes viewed as ``[rows, row_bytes]``; other pieces are re-laid out at load with each row
padded to whole bytes (less than one byte per row more than the file). At 1, 2, 4 and 8 bits a
256-entry table maps each byte to its ``8 / bits`` code values as float32, so a block is one
``index_select`` and one multiply; at 3, 5 and 6 bits, 8 codes fill exactly ``bits`` bytes and
are cut out of one 64-bit integer by shifts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from search_spaces.packed_format import signed_codes
from search_spaces.quant import qmax

_BYTE_TABLE_BITS = (1, 2, 4, 8)  # widths whose codes never straddle a byte
# Measured on torch 2.13 CPU (MKL sgemm, 1 thread): an addmm over fewer than 16 output features takes
# another kernel whose float32 sums differ in the last bit from the full matrix's; from 16 rows on, each
# block's outputs are bit-identical to those of one addmm over the whole matrix.
MIN_BLOCK_ROWS = 16


def code_values(bits: int) -> torch.Tensor:
    """float32 value of each unsigned stored code ``0 .. 2^bits - 1`` (``2u - 1`` at 1 bit, else ``u - qmax``)."""
    return signed_codes(torch.arange(2**bits, dtype=torch.int64), bits).to(torch.float32)


def byte_table(bits: int) -> torch.Tensor:
    """``[256, 8 // bits]`` float32: the code values a packed byte holds, least significant code first."""
    per_byte = 8 // bits
    byte = torch.arange(256, dtype=torch.int64)
    shifts = torch.arange(per_byte, dtype=torch.int64) * bits
    unsigned = (byte[:, None] >> shifts) & (2**bits - 1)
    return code_values(bits)[unsigned]


def decode_rows(data: torch.Tensor, bits: int, cols: int, table: torch.Tensor) -> torch.Tensor:
    """float32 ``[rows, cols]`` code values of row-aligned packed bytes ``data`` ``[rows, row_bytes]``.

    ``table`` is :func:`byte_table` at 1/2/4/8 bits and :func:`code_values` at 3/5/6 bits (unused at 16).
    """
    rows, row_bytes = data.shape
    if bits == 16:  # little-endian uint16 codes; exact in float32 (|code| < 2^24)
        pairs = data.view(rows, row_bytes // 2, 2).to(torch.int32)
        return ((pairs[..., 0] | (pairs[..., 1] << 8)) - qmax(16)).to(torch.float32)[:, :cols]
    if bits in _BYTE_TABLE_BITS:
        values = table.index_select(0, data.reshape(-1).to(torch.int32))
        return values.view(rows, row_bytes * (8 // bits))[:, :cols]
    groups = -(-row_bytes // bits)  # 8 codes fill exactly `bits` bytes
    if groups * bits != row_bytes:
        data = torch.nn.functional.pad(data, (0, groups * bits - row_bytes))
    raw = data.reshape(rows, groups, bits).to(torch.int64)
    word = raw[..., 0].clone()
    for k in range(1, bits):
        word |= raw[..., k] << (8 * k)
    shifts = torch.arange(8, dtype=torch.int64) * bits
    unsigned = (word.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return table.index_select(0, unsigned.reshape(-1)).view(rows, groups * 8)[:, :cols]


@dataclass
class PackedPiece:
    """Rows ``[lo, hi)`` of a tensor: codes (``bits`` set) or float32 values (``bits`` None).

    ``data``: uint8 ``[hi - lo, row_bytes]`` packed codes, or float32 ``[hi - lo, cols]``.
    ``scale``: float32 ``[]`` (one per cluster) or ``[hi - lo, 1]`` (one per row); None for float32 rows.
    """

    lo: int
    hi: int
    bits: int | None
    data: torch.Tensor
    scale: torch.Tensor | None = None
    table: torch.Tensor | None = None  # decoding table of `bits`, shared by the pieces of one width

    def dequantize(self, lo: int, hi: int, cols: int) -> torch.Tensor:
        """float32 ``[hi - lo, cols]``: rows ``lo .. hi`` counted from the start of this piece."""
        if self.bits is None:
            return self.data[lo:hi]
        assert self.table is not None and self.scale is not None
        values = decode_rows(self.data[lo:hi], self.bits, cols, self.table)
        # The same float32 product as quant.dequantize (codes * alpha); contiguous for the matmul.
        return values * (self.scale if self.scale.dim() == 0 else self.scale[lo:hi])

    def gather(self, index: torch.Tensor, cols: int) -> torch.Tensor:
        """float32 ``[len(index), cols]``: the rows ``index`` (counted from this piece's start) only."""
        if self.bits is None:
            return self.data.index_select(0, index)
        assert self.table is not None and self.scale is not None
        values = decode_rows(self.data.index_select(0, index), self.bits, cols, self.table)
        return values * (self.scale if self.scale.dim() == 0 else self.scale.index_select(0, index))

    def resident_bytes(self) -> int:
        """Bytes this piece holds in memory (codes or values, and scales)."""
        scale = 0 if self.scale is None else self.scale.numel() * self.scale.element_size()
        return self.data.numel() * self.data.element_size() + scale


class PackedTensor:
    """A tensor of shape ``[rows, *rest]`` held as :class:`PackedPiece` row pieces (``cols = prod(rest)``)."""

    def __init__(self, name: str, shape: tuple[int, ...], pieces: list[PackedPiece]) -> None:
        if not shape:
            raise ValueError(f"{name}: a packed tensor needs at least one dimension")
        cursor = 0
        for piece in pieces:
            if piece.lo != cursor or piece.hi <= piece.lo:
                raise ValueError(f"{name}: row pieces must cover rows 0..{shape[0]} in order")
            cursor = piece.hi
        if cursor != shape[0]:
            raise ValueError(f"{name}: row pieces cover {cursor} of {shape[0]} rows")
        self.name = name
        self.shape = tuple(shape)
        self.cols = 1
        for size in shape[1:]:
            self.cols *= size
        self.pieces = pieces

    @property
    def rows(self) -> int:
        """Size of the first dimension."""
        return self.shape[0]

    def resident_bytes(self) -> int:
        """Bytes held in memory: packed codes, scales and float32 rows."""
        return sum(piece.resident_bytes() for piece in self.pieces)

    def code_bytes(self) -> int:
        """Bytes of packed codes only (the file's code bytes when rows fill whole bytes)."""
        return sum(p.data.numel() for p in self.pieces if p.bits is not None)

    def blocks(self, block_rows: int) -> Iterator[tuple[int, int, torch.Tensor]]:
        """``(lo, hi, weight rows lo..hi as float32 [hi - lo, cols])``, at most ``block_rows`` rows each.

        Blocks never span two pieces, so each one is dequantized with its own width and scale;
        only one block is alive at a time if the caller drops it before asking for the next. A
        piece's last block takes the rows left over if fewer than :data:`MIN_BLOCK_ROWS` would
        remain after it (a narrow tail would run another BLAS kernel).
        """
        for piece in self.pieces:
            start = piece.lo
            while start < piece.hi:
                stop = start + block_rows
                if piece.hi - stop < MIN_BLOCK_ROWS:
                    stop = piece.hi
                yield start, stop, piece.dequantize(start - piece.lo, stop - piece.lo, self.cols)
                start = stop

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """float32 ``[len(index), *rest]``: only the rows ``index`` (1-D int64) are decoded."""
        if len(self.pieces) == 1:
            out = self.pieces[0].gather(index, self.cols)
        else:
            out = torch.empty(index.numel(), self.cols, dtype=torch.float32, device=index.device)
            for piece in self.pieces:
                hit = ((index >= piece.lo) & (index < piece.hi)).nonzero().squeeze(1)
                if hit.numel():
                    out[hit] = piece.gather(index[hit] - piece.lo, self.cols)
        return out.view(index.numel(), *self.shape[1:])

    def dequantize(self) -> torch.Tensor:
        """The whole tensor as float32 (a new tensor of full size: for code that needs the matrix)."""
        parts = [piece.dequantize(0, piece.hi - piece.lo, self.cols) for piece in self.pieces]
        return torch.cat(parts).view(self.shape)

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``fn`` (e.g. a device move of ``Module.to``) to every stored tensor, in place."""
        for piece in self.pieces:
            piece.data = fn(piece.data)
            piece.scale = None if piece.scale is None else fn(piece.scale)
            piece.table = None if piece.table is None else fn(piece.table)

    def __repr__(self) -> str:
        widths = sorted({p.bits or 32 for p in self.pieces})
        return f"PackedTensor({self.name}, shape={list(self.shape)}, bits={widths}, bytes={self.resident_bytes()})"
