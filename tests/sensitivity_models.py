"""Tiny learnable LMs and stand-in prototypes shared by the sensitivity tests (kl, hessian)."""

from __future__ import annotations

import torch
from torch import nn

from search_spaces.clusters import cluster_weight, find_clusters
from search_spaces.models import LSTMLM, LSTMConfig, TransformerConfig, TransformerLM

VOCAB = 12


def pattern(rows: int, time: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows that mostly count up by one (mod VOCAB), 30% random jumps: learnable, not trivial."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (rows, 1), generator=g)
    steps = torch.where(torch.rand(rows, time, generator=g) < 0.3,
                        torch.randint(0, VOCAB, (rows, time), generator=g), torch.ones(rows, time, dtype=torch.long))
    seq = torch.cat([start, (start + steps.cumsum(1)) % VOCAB], 1)
    return seq[:, :-1], seq[:, 1:]


def tiny_lstm(init_range: float = 1.0) -> LSTMLM:
    torch.manual_seed(0)
    return LSTMLM(LSTMConfig(vocab_size=VOCAB, embed_dim=4, hidden_dim=4, num_layers=1, init_range=init_range))


def tiny_transformer(dropout: float = 0.0) -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(TransformerConfig(vocab_size=VOCAB, d_model=4, num_layers=1, num_heads=2, d_ff=8, context=6,
                                           dropout=dropout, tie_weights=False, init_std=1.0))


def train_briefly(model: nn.Module, time: int, steps: int = 50) -> nn.Module:
    """A few Adam steps: at random init the per-cluster Hessians are tiny next to their off-diagonal
    and cross-cluster blocks, so Hutchinson would need far more probes than a unit test can pay."""
    inputs, targets = pattern(32, time, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        model(inputs, targets=targets).loss.backward()
        opt.step()
    return model.eval()


def noisy_prototypes(model: nn.Module, widths: list[int], seed: int = 0) -> dict[int, dict[str, torch.Tensor]]:
    """Stand-in prototypes: each cluster's FP weight plus noise that shrinks with the width."""
    generator = torch.Generator().manual_seed(seed)
    return {b: {name: cluster_weight(model, c).detach() + torch.randn(c.shape, generator=generator) / 2**b
                for name, c in find_clusters(model).items()} for b in widths}
