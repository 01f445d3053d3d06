"""Causal pre-LayerNorm Transformer language model.

Attention keeps separate ``q``, ``k``, ``v`` and ``o`` Linear modules (not one fused
qkv matrix) so each projection can be its own quantization cluster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from search_spaces.models.lstm_lm import LMOutput


@dataclass
class TransformerConfig:
    """Shape and regularisation of a :class:`TransformerLM`."""

    vocab_size: int = 10000
    d_model: int = 256
    num_layers: int = 6  # as in Xu et al., ICASSP 2021
    num_heads: int = 4
    d_ff: int = 1024
    context: int = 128  # longest window the positional table covers
    dropout: float = 0.1
    tie_weights: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "context"):
            if getattr(self, name) < 1:
                raise ValueError(f"TransformerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.num_heads:
            raise ValueError(f"TransformerConfig.d_model ({self.d_model}) must be divisible by "
                             f"num_heads ({self.num_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"TransformerConfig.dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 < self.init_std < math.inf:
            raise ValueError(f"TransformerConfig.init_std must be a finite number > 0, got {self.init_std}")


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with separate q/k/v/o projections."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.dropout = cfg.dropout
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        # No key bias: it adds the same q.b_k to every score of a query, which softmax
        # cancels, so its gradient is pure rounding noise (and Adam would amplify it).
        self.k = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.v = nn.Linear(cfg.d_model, cfg.d_model)
        self.o = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, time, width = x.shape
        q, k, v = (p(x).view(batch, time, self.num_heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        # Explicit attention math rather than F.scaled_dot_product_attention: the fused CPU
        # and flash kernels have no double backward, which Hessian traces need.
        scores = (q @ k.transpose(-2, -1)) * (q.size(-1) ** -0.5)
        future = torch.ones(time, time, dtype=torch.bool, device=x.device).triu(1)
        weights = F.dropout(scores.masked_fill(future, float("-inf")).softmax(-1), self.dropout, self.training)
        y = weights @ v
        return self.o(y.transpose(1, 2).reshape(batch, time, width))


class FeedForward(nn.Module):
    """Position-wise MLP: ``fc_in`` -> GELU -> ``fc_out``."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(cfg.d_model, cfg.d_ff)
        self.fc_out = nn.Linear(cfg.d_ff, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.dropout(F.gelu(self.fc_in(x))))


class Block(nn.Module):
    """Pre-LN residual block: x + attn(ln1(x)), then x + ffn(ln2(x))."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ffn = FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.dropout(self.attn(self.ln1(x)))
        return x + self.dropout(self.ffn(self.ln2(x)))


class TransformerLM(nn.Module):
    """Token + learned position embeddings -> blocks -> final LN -> softmax ("decoder")."""

    is_mpnas_lm = True  # implements search_spaces.models.protocol.LanguageModel (config.context: its window)

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_embedding = nn.Embedding(config.context, config.d_model)
        self.dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.decoder = nn.Linear(config.d_model, config.vocab_size)
        self.reset_parameters()
        if config.tie_weights:
            self.decoder.weight = self.embedding.weight

    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, 0.02), residual outputs scaled by 1/sqrt(2 * layers)."""
        std = self.config.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.zeros_(p) if name.endswith("bias") else nn.init.ones_(p)
            elif name.endswith(("attn.o.weight", "ffn.fc_out.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.config.num_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    def forward(self, tokens: torch.Tensor, state: object = None,
                targets: torch.Tensor | None = None) -> LMOutput:
        """``tokens`` [batch, time <= context] -> logits, mean loss; ``state`` is unused."""
        time = tokens.size(1)
        if time > self.config.context:
            raise ValueError(f"sequence of {time} tokens exceeds the model's context of "
                             f"{self.config.context}")
        positions = torch.arange(time, device=tokens.device)
        x = self.dropout(self.embedding(tokens) + self.pos_embedding(positions))
        for block in self.blocks:
            x = block(x)
        logits = self.decoder(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))
        return LMOutput(logits, loss, None)
