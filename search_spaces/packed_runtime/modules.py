"""Inference modules that compute from :class:`PackedTensor` weights block by block.

- :class:`PackedLinear` replaces ``nn.Linear``: the output features are computed a block of
  weight rows at a time (dequantize the block, one ``addmm``, drop it), so the extra memory is
  one block, not the matrix. Each block's ``addmm`` is the one ``F.linear`` makes for the whole
  matrix, restricted to those output features.
- :class:`PackedEmbedding` replaces ``nn.Embedding``: only the looked-up rows are decoded.
- :func:`pack_parameter` is the fallback for any other module holding a packed parameter
  (e.g. ``nn.MultiheadAttention.in_proj_weight``): the parameter becomes a read-only attribute
  that dequantizes the whole tensor each time the module's own code reads it (transient, one
  matrix), so any module runs unchanged.

Packed modules are inference-only: ``train(True)`` raises :class:`PackedModelError`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nas.core.errors import MpnasError
from search_spaces.packed_runtime.tensor import MIN_BLOCK_ROWS, PackedTensor


class PackedModelError(MpnasError):
    """A model loaded with ``keep_packed=True`` was asked for something only float weights can do."""


_TRAIN_MESSAGE = ("a model loaded with keep_packed=True is inference-only (its weights are packed codes, there "
                  "is nothing to train); load it with load_packed(path) (keep_packed=False) to train or fine-tune")


@dataclass(frozen=True)
class PackedOptions:
    """How packed modules compute.

    ``block_bytes``: float32 bytes of weight dequantized at once (a block of rows of one piece, at
    least :data:`MIN_BLOCK_ROWS` rows); the peak extra memory of a matmul (the PTB decoder, 7.7 MB
    as float32, goes in blocks of 1365 rows).

    ``recurrent``: how an LSTM's recurrent matrix is used at every time step. ``"matrix"``
    (default) dequantizes the layer's ``[4H, H]`` matrix once per forward call and frees it when
    the layer returns (transient: one matrix, 640 KB for H=200, within one default block; the FP
    model's speed);
    ``"blocks"`` dequantizes it a block at a time at every step (peak extra memory one block, but
    every step pays the unpacking again: several times slower).
    """

    block_bytes: int = 1 << 20  # 1 MiB: measured 5-10% faster than 256 KiB or 4 MiB on the PTB models
    recurrent: str = "matrix"

    def __post_init__(self) -> None:
        if self.block_bytes < 4:
            raise ValueError(f"PackedOptions.block_bytes must be >= 4, got {self.block_bytes}")
        if self.recurrent not in ("matrix", "blocks"):
            raise ValueError(f"PackedOptions.recurrent must be 'matrix' or 'blocks', got {self.recurrent!r}")

    def block_rows(self, cols: int) -> int:
        """Rows of ``cols`` float32 values per block (at least :data:`MIN_BLOCK_ROWS`)."""
        return max(MIN_BLOCK_ROWS, self.block_bytes // (4 * max(cols, 1)))


class PackedModule(nn.Module):
    """Base of the packed modules: no training, packed tensors follow ``Module.to``."""

    packed_tensors: tuple[str, ...] = ()

    def train(self, mode: bool = True) -> PackedModule:
        """Eval only: ``train(True)`` raises :class:`PackedModelError`."""
        if mode:
            raise PackedModelError(_TRAIN_MESSAGE)
        return super().train(False)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], *args: Any, **kwargs: Any) -> PackedModule:
        for name in self.packed_tensors:
            getattr(self, name).apply(fn)
        return super()._apply(fn, *args, **kwargs)


def linear_blocks(module: nn.Module, block_rows: int) -> list[tuple[int, int, torch.Tensor]] | Any:
    """``(lo, hi, weight rows)`` blocks of a linear layer's weight: packed blocks, or one dense block."""
    if isinstance(module, PackedLinear):
        return module.weight_packed.blocks(block_rows)
    weight = module.weight
    return [(0, weight.shape[0], weight)]


def blocked_linear(x2: torch.Tensor, blocks: Any, bias: torch.Tensor | None, out: torch.Tensor,
                   col0: int = 0) -> torch.Tensor:
    """``out[:, col0 + lo : col0 + hi] = x2 @ w.T + bias[lo:hi]`` for every ``(lo, hi, w)`` block.

    ``addmm`` with the bias, as ``F.linear`` computes a 2-D input with a bias, so each output
    element is the same dot product the unpacked layer computes.
    """
    for lo, hi, weight in blocks:
        if bias is None:
            out[:, col0 + lo : col0 + hi] = torch.mm(x2, weight.t())
        else:
            out[:, col0 + lo : col0 + hi] = torch.addmm(bias[lo:hi], x2, weight.t())
    return out


class PackedLinear(PackedModule):
    """``nn.Linear`` whose weight stays packed; see the module docstring."""

    packed_tensors = ("weight_packed",)

    def __init__(self, weight: PackedTensor, bias: torch.Tensor | None, options: PackedOptions) -> None:
        super().__init__()
        if len(weight.shape) != 2:
            raise ValueError(f"{weight.name}: a linear weight must be 2-D, got shape {list(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.weight_packed = weight
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.options = options
        self.training = False

    @property
    def weight(self) -> torch.Tensor:
        """The whole weight as float32, built on each access (for code that reads ``.weight``)."""
        return self.weight_packed.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        out = torch.empty(x2.shape[0], self.out_features, dtype=x2.dtype, device=x2.device)
        blocks = self.weight_packed.blocks(self.options.block_rows(self.in_features))
        blocked_linear(x2, blocks, self.bias, out)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight={self.weight_packed!r}"


class PackedEmbedding(PackedModule):
    """``nn.Embedding`` (without ``max_norm``) whose table stays packed: a lookup decodes its rows only."""

    packed_tensors = ("weight_packed",)

    def __init__(self, weight: PackedTensor) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.weight_packed = weight
        self.training = False

    @property
    def weight(self) -> torch.Tensor:
        """The whole table as float32, built on each access (for code that reads ``.weight``)."""
        return self.weight_packed.dequantize()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        flat = tokens.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"token id out of range [0, {self.num_embeddings})")
        return self.weight_packed.gather(flat).view(*tokens.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, weight={self.weight_packed!r}"


def pack_parameter(module: nn.Module, name: str, tensor: PackedTensor) -> None:
    """Make ``module.<name>`` a read-only attribute that dequantizes ``tensor`` on each read.

    The module's class is swapped for a subclass of it (per module) with that property, an
    inference-only ``train`` and a ``_apply`` that moves the packed tensor too.
    """
    module._parameters.pop(name, None)
    cls = type(module)
    if not getattr(cls, "_mpnas_packed_fallback", False):
        base = cls

        def train(self: nn.Module, mode: bool = True) -> nn.Module:
            if mode:
                raise PackedModelError(_TRAIN_MESSAGE)
            return base.train(self, False)

        def _apply(self: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], *args: Any, **kwargs: Any
                   ) -> nn.Module:
            for packed in self._mpnas_packed.values():
                packed.apply(fn)
            return base._apply(self, fn, *args, **kwargs)

        cls = type(f"Packed{base.__name__}", (base,), {"_mpnas_packed_fallback": True, "train": train,
                                                        "_apply": _apply})
        module.__class__ = cls
        object.__setattr__(module, "_mpnas_packed", {})
    module._mpnas_packed[name] = tensor
    setattr(cls, name, property(lambda self, _n=name: self._mpnas_packed[_n].dequantize()))
    module.training = False
