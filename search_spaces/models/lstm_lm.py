"""LSTM language model built from explicit per-gate Linear ops.

Each gate owns two ``nn.Linear`` modules, ``ih`` (input, with the bias) and ``hh``
(recurrent, no bias), so every gate matrix can be its own quantization cluster and
second-order autograd (Hessian-vector products) works on every device, which torch's
fused cuDNN LSTM does not allow. The forward pass concatenates the four gates' weights
once per call so each time step still costs one matmul.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from search_spaces.gates import LSTM_GATES

GATES = LSTM_GATES  # one module per gate, in torch's order

LSTMState = list[tuple[torch.Tensor, torch.Tensor]]


class LMOutput(NamedTuple):
    """What every LM's forward returns."""

    logits: torch.Tensor  # [batch, time, vocab]
    loss: torch.Tensor | None  # mean token cross-entropy when targets are given
    state: object  # recurrent state to carry into the next chunk (None for Transformers)


@dataclass
class LSTMConfig:
    """Shape and regularisation of an :class:`LSTMLM`."""

    vocab_size: int = 10000
    embed_dim: int = 200
    hidden_dim: int = 200
    num_layers: int = 2
    dropout: float = 0.0
    tie_weights: bool = False
    init_range: float = 0.1  # uniform(-r, r) for every weight, as in Zaremba et al. 2014

    def __post_init__(self) -> None:
        for name in ("vocab_size", "embed_dim", "hidden_dim", "num_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"LSTMConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LSTMConfig.dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.init_range < math.inf:
            raise ValueError(f"LSTMConfig.init_range must be a finite number > 0, got {self.init_range}")
        if self.tie_weights and self.embed_dim != self.hidden_dim:
            raise ValueError("LSTMConfig.tie_weights needs embed_dim == hidden_dim, got "
                             f"{self.embed_dim} and {self.hidden_dim}")


class LSTMGate(nn.Module):
    """One gate: ``ih`` maps the layer input, ``hh`` the previous hidden state."""

    def __init__(self, input_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.ih = nn.Linear(input_dim, hidden_dim, bias=True)
        self.hh = nn.Linear(hidden_dim, hidden_dim, bias=False)


class LSTMLayer(nn.Module):
    """A single LSTM layer with named gates (input, forget, cell, output)."""

    def __init__(self, input_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.hidden_dim = hidden_dim
        for gate in GATES:
            self.add_module(gate, LSTMGate(input_dim, hidden_dim))

    def gates(self) -> list[LSTMGate]:
        return [getattr(self, g) for g in GATES]

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Run ``x`` ([batch, time, input]) from ``state`` = (h, c), each [batch, hidden]."""
        gates = self.gates()
        # `.weight` goes through any parametrization (fake quantization) on the gate.
        w_ih = torch.cat([g.ih.weight for g in gates])
        b_ih = torch.cat([g.ih.bias for g in gates])
        w_hh = torch.cat([g.hh.weight for g in gates])
        projected = F.linear(x, w_ih, b_ih)  # all time steps at once: [batch, time, 4H]
        h, c = state
        outputs = []
        for t in range(x.size(1)):
            z = projected[:, t] + F.linear(h, w_hh)
            i, f, g, o = z.chunk(4, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        return torch.stack(outputs, dim=1), (h, c)


class LSTMLM(nn.Module):
    """Embedding -> stacked LSTM -> softmax ("decoder"), Zaremba-style dropout between."""

    is_mpnas_lm = True  # implements search_spaces.models.protocol.RecurrentLanguageModel

    def __init__(self, config: LSTMConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embed_dim)
        dims = [config.embed_dim] + [config.hidden_dim] * config.num_layers
        self.layers = nn.ModuleList(LSTMLayer(dims[i], dims[i + 1]) for i in range(config.num_layers))
        self.dropout = nn.Dropout(config.dropout)
        self.decoder = nn.Linear(config.hidden_dim, config.vocab_size)
        self.reset_parameters()
        if config.tie_weights:
            self.decoder.weight = self.embedding.weight

    def reset_parameters(self) -> None:
        """Uniform(-init_range, init_range) on every parameter, biases included."""
        for p in self.parameters():
            nn.init.uniform_(p, -self.config.init_range, self.config.init_range)

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> LSTMState:
        """Zero (h, c) for every layer."""
        device = device if device is not None else self.decoder.bias.device
        zeros = torch.zeros(batch_size, self.config.hidden_dim, device=device)
        return [(zeros, zeros) for _ in self.layers]

    def forward(self, tokens: torch.Tensor, state: LSTMState | None = None,
                targets: torch.Tensor | None = None) -> LMOutput:
        """``tokens`` [batch, time] -> logits [batch, time, vocab], mean loss, new state."""
        if state is None:
            state = self.init_state(tokens.size(0), tokens.device)
        x = self.dropout(self.embedding(tokens))
        new_state: LSTMState = []
        for layer, layer_state in zip(self.layers, state, strict=True):
            x, layer_state = layer(x, layer_state)
            x = self.dropout(x)
            new_state.append(layer_state)
        logits = self.decoder(x)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return LMOutput(logits, loss, new_state)

    @staticmethod
    def detach_state(state: LSTMState) -> LSTMState:
        """Cut the graph between chunks (truncated BPTT)."""
        return [(h.detach(), c.detach()) for h, c in state]

    @staticmethod
    def select_state(state: LSTMState, rows: slice) -> LSTMState:
        """The state of batch rows ``rows`` only."""
        return [(h[rows], c[rows]) for h, c in state]


def from_torch_lstm(embedding: nn.Embedding, lstm: nn.LSTM, decoder: nn.Linear,
                    dropout: float = 0.0) -> LSTMLM:
    """Build an :class:`LSTMLM` holding the weights of a fused ``nn.LSTM`` language model.

    torch stacks gates as (i, f, g, o) rows of ``weight_ih_l{k}``; its two biases are
    summed into our single ``ih`` bias (the sum is all the cell ever uses).
    """
    if not lstm.batch_first:
        raise ValueError("from_torch_lstm expects nn.LSTM(batch_first=True)")
    if lstm.bidirectional or lstm.proj_size:
        raise ValueError("from_torch_lstm supports unidirectional LSTMs without projections")
    config = LSTMConfig(vocab_size=embedding.num_embeddings, embed_dim=embedding.embedding_dim,
                        hidden_dim=lstm.hidden_size, num_layers=lstm.num_layers, dropout=dropout,
                        tie_weights=decoder.weight is embedding.weight)
    model = LSTMLM(config)
    with torch.no_grad():
        model.embedding.weight.copy_(embedding.weight)
        if not config.tie_weights:
            model.decoder.weight.copy_(decoder.weight)
        model.decoder.bias.copy_(decoder.bias)
        for k, layer in enumerate(model.layers):
            w_ih = getattr(lstm, f"weight_ih_l{k}").chunk(4)
            w_hh = getattr(lstm, f"weight_hh_l{k}").chunk(4)
            bias = (getattr(lstm, f"bias_ih_l{k}") + getattr(lstm, f"bias_hh_l{k}")
                    if lstm.bias else torch.zeros(4 * lstm.hidden_size)).chunk(4)
            for gate, wi, wh, b in zip(layer.gates(), w_ih, w_hh, bias, strict=True):
                gate.ih.weight.copy_(wi)
                gate.hh.weight.copy_(wh)
                gate.ih.bias.copy_(b)
    return model


def to_torch_lstm(model: LSTMLM) -> tuple[nn.Embedding, nn.LSTM, nn.Linear]:
    """The inverse of :func:`from_torch_lstm`: fused modules with the same weights.

    Our single bias goes into ``bias_ih``; ``bias_hh`` is zero.
    """
    cfg = model.config
    embedding = nn.Embedding(cfg.vocab_size, cfg.embed_dim)
    lstm = nn.LSTM(cfg.embed_dim, cfg.hidden_dim, cfg.num_layers, batch_first=True,
                   dropout=cfg.dropout if cfg.num_layers > 1 else 0.0)
    decoder = nn.Linear(cfg.hidden_dim, cfg.vocab_size)
    with torch.no_grad():
        embedding.weight.copy_(model.embedding.weight)
        decoder.weight.copy_(model.decoder.weight)
        decoder.bias.copy_(model.decoder.bias)
        for k, layer in enumerate(model.layers):
            gates = layer.gates()
            getattr(lstm, f"weight_ih_l{k}").copy_(torch.cat([g.ih.weight for g in gates]))
            getattr(lstm, f"weight_hh_l{k}").copy_(torch.cat([g.hh.weight for g in gates]))
            getattr(lstm, f"bias_ih_l{k}").copy_(torch.cat([g.ih.bias for g in gates]))
            getattr(lstm, f"bias_hh_l{k}").zero_()
    if cfg.tie_weights:
        decoder.weight = embedding.weight
    return embedding, lstm, decoder
