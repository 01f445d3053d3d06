"""LSTM layers that compute from packed gate matrices.

:class:`PackedLSTMLayer` replaces an mpnas :class:`~search_spaces.models.lstm_lm.LSTMLayer`:
the input projections of all time steps are computed at once, a block of gate rows at a time
(as :class:`~search_spaces.packed_runtime.modules.PackedLinear` does); the recurrent matrix,
used at every step, is dequantized per :class:`PackedOptions` ``recurrent`` (once per call, or
a block at a time at every step). The arithmetic is the unpacked layer's, op for op.

:class:`PackedTorchLSTM` replaces a plain ``nn.LSTM`` (unidirectional, no projection) with the
same math written out (ATen's CPU cell: ``linear(x, W_ih, b_ih)`` for all steps, then per step
``linear(h, W_hh, b_hh) + that``); torch's fused kernel orders its float32 sums its own way, so
its logits agree to rounding, not bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from search_spaces.models.lstm_lm import LSTMLayer
from search_spaces.packed_runtime.modules import (
    PackedLinear,
    PackedModule,
    PackedOptions,
    blocked_linear,
    linear_blocks,
)
from search_spaces.packed_runtime.tensor import PackedTensor


def _recurrent(gate_blocks: list[tuple[int, object]], projected_t: torch.Tensor, h: torch.Tensor,
               full: torch.Tensor | None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``projected_t + linear(h, W_hh, bias)`` from the whole matrix ``full`` or from gate blocks."""
    if full is not None:
        return projected_t + torch.nn.functional.linear(h, full, bias)
    z = torch.empty_like(projected_t)
    for offset, blocks in gate_blocks:
        for lo, hi, weight in blocks():  # type: ignore[operator]
            part = torch.mm(h, weight.t()) if bias is None else torch.addmm(bias[offset + lo : offset + hi], h,
                                                                              weight.t())
            z[:, offset + lo : offset + hi] = projected_t[:, offset + lo : offset + hi] + part
    return z


def _cell(z: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM step from the gate pre-activations ``z`` (i, f, g, o) - the unpacked layer's expressions."""
    i, f, g, o = z.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


class PackedLSTMLayer(PackedModule):
    """An mpnas ``LSTMLayer`` whose gates (``PackedLinear`` or ``nn.Linear``) may be packed."""

    def __init__(self, layer: LSTMLayer, options: PackedOptions) -> None:
        super().__init__()
        self.hidden_dim = layer.hidden_dim
        for name, gate in layer.named_children():
            self.add_module(name, gate)
        self._gate_names = [name for name, _ in layer.named_children()]
        self.options = options
        self.training = False

    def gates(self) -> list[nn.Module]:
        """The gate modules (each with ``ih`` and ``hh``), in i, f, g, o order."""
        return [getattr(self, name) for name in self._gate_names]

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Run ``x`` ([batch, time, input]) from ``state`` = (h, c), as ``LSTMLayer.forward``."""
        gates = self.gates()
        hidden = self.hidden_dim
        batch, time = x.shape[:2]
        x2 = x.reshape(batch * time, -1)
        projected = torch.empty(batch * time, 4 * hidden, dtype=x.dtype, device=x.device)
        rows = self.options.block_rows(x2.shape[1])
        for k, gate in enumerate(gates):
            blocked_linear(x2, linear_blocks(gate.ih, rows), gate.ih.bias, projected, k * hidden)
        projected = projected.view(batch, time, 4 * hidden)
        full, gate_blocks = None, []
        if self.options.recurrent == "matrix" or not any(isinstance(g.hh, PackedLinear) for g in gates):
            full = torch.cat([_dense(g.hh) for g in gates])  # freed when the layer returns
        else:
            rows = self.options.block_rows(hidden)
            gate_blocks = [(k * hidden, lambda g=g: linear_blocks(g.hh, rows)) for k, g in enumerate(gates)]
        h, c = state
        outputs = []
        for t in range(time):
            h, c = _cell(_recurrent(gate_blocks, projected[:, t], h, full), c)
            outputs.append(h)
        return torch.stack(outputs, dim=1), (h, c)


def _dense(module: nn.Module) -> torch.Tensor:
    return module.weight_packed.dequantize() if isinstance(module, PackedLinear) else module.weight


class PackedTorchLSTM(PackedModule):
    """A plain ``nn.LSTM`` (``batch_first`` or not, unidirectional, no projection) with packed weights.

    ``weights[k]`` is ``(W_ih, W_hh, b_ih, b_hh)`` of layer ``k``: a :class:`PackedTensor` (gate
    row pieces) or a float32 tensor each; biases may be None.
    """

    def __init__(self, lstm: nn.LSTM, weights: list[tuple[object, object, torch.Tensor | None, torch.Tensor | None]],
                 options: PackedOptions) -> None:
        super().__init__()
        if lstm.bidirectional or lstm.proj_size or lstm.mode != "LSTM":
            raise ValueError("PackedTorchLSTM supports unidirectional nn.LSTM without projections")
        self.batch_first = lstm.batch_first
        self.hidden_size = lstm.hidden_size
        self.num_layers = lstm.num_layers
        self.packed_tensors = tuple(f"_w{k}_{i}" for k in range(len(weights)) for i in range(2)
                                    if isinstance(weights[k][i], PackedTensor))
        for k, (w_ih, w_hh, b_ih, b_hh) in enumerate(weights):
            for i, w in enumerate((w_ih, w_hh)):
                if isinstance(w, PackedTensor):
                    object.__setattr__(self, f"_w{k}_{i}", w)
                else:
                    self.register_buffer(f"_w{k}_{i}", w.detach(), persistent=False)  # type: ignore[union-attr]
            for i, b in enumerate((b_ih, b_hh)):
                self.register_buffer(f"_b{k}_{i}", None if b is None else b.detach(), persistent=False)
        self.options = options
        self.training = False

    def _blocks(self, weight: object, cols: int) -> object:
        if isinstance(weight, PackedTensor):
            return weight.blocks(self.options.block_rows(cols))
        return [(0, weight.shape[0], weight)]  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """``(output, (h_n, c_n))`` as ``nn.LSTM.forward`` returns them."""
        if x.dim() != 3:
            raise ValueError("PackedTorchLSTM expects a batched 3-D input")
        if not self.batch_first:
            x = x.transpose(0, 1)
        batch, time = x.shape[:2]
        hidden = self.hidden_size
        if state is None:
            zeros = torch.zeros(self.num_layers, batch, hidden, dtype=x.dtype, device=x.device)
            state = (zeros, zeros)
        h_n, c_n = [], []
        for k in range(self.num_layers):
            w_ih, w_hh = getattr(self, f"_w{k}_0"), getattr(self, f"_w{k}_1")
            b_ih, b_hh = getattr(self, f"_b{k}_0"), getattr(self, f"_b{k}_1")
            x2 = x.reshape(batch * time, -1)
            projected = torch.empty(batch * time, 4 * hidden, dtype=x.dtype, device=x.device)
            blocked_linear(x2, self._blocks(w_ih, x2.shape[1]), b_ih, projected)
            projected = projected.view(batch, time, 4 * hidden)
            full = w_hh.dequantize() if isinstance(w_hh, PackedTensor) else w_hh
            h, c = state[0][k], state[1][k]
            outputs = []
            for t in range(time):
                h, c = _cell(_recurrent([], projected[:, t], h, full, b_hh), c)
                outputs.append(h)
            x = torch.stack(outputs, dim=1)
            h_n.append(h)
            c_n.append(c)
        out = x if self.batch_first else x.transpose(0, 1)
        return out, (torch.stack(h_n), torch.stack(c_n))
