"""The four tiny LMs the contract suites run on: mpnas and plain torch, LSTM and Transformer.

Each has a vocabulary of :data:`~tests.plain_lms.VOCAB` words, width 16 and one layer (a few
hundred weights per matrix). :func:`pretrained_lm` trains one for a few dozen Adam steps on
:func:`~tests.plain_lms.token_stream` so that its weights are not random; the session fixtures
of ``tests/conftest.py`` build each once and hand every test a deep copy.
"""

from __future__ import annotations

import torch
from torch import nn

from search_spaces.models import build_model
from tests.plain_lms import VOCAB, PlainLSTM, PlainTransformer, pretrain

LM_KINDS = ("mpnas_lstm", "mpnas_transformer", "plain_lstm", "plain_transformer")
PRETRAIN_STEPS = 30
MPNAS_CONTEXT = 32  # below the data section's default window (64): the verbs must use the model's own


def build_lm(kind: str, seed: int = 0) -> nn.Module:
    """An untrained LM of ``kind`` (one of :data:`LM_KINDS`), initialised from ``seed``.

    The global RNG is left as it was. The mpnas models have dropout, so that a strategy or a
    retraining method that runs in the wrong mode, or draws from an unseeded RNG, shows.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if kind == "mpnas_lstm":
            return build_model("lstm", vocab_size=VOCAB, embed_dim=16, hidden_dim=16, num_layers=1, dropout=0.1)
        if kind == "mpnas_transformer":
            return build_model("transformer", vocab_size=VOCAB, d_model=16, num_layers=1, num_heads=2, d_ff=32,
                               context=MPNAS_CONTEXT, dropout=0.1)
        if kind == "plain_lstm":
            return PlainLSTM(seed)
        if kind == "plain_transformer":
            return PlainTransformer(seed)
    raise ValueError(f"unknown LM kind {kind!r}; expected one of {LM_KINDS}")


def pretrained_lm(kind: str, stream: torch.Tensor, steps: int = PRETRAIN_STEPS) -> nn.Module:
    """:func:`build_lm` trained ``steps`` Adam steps on ``stream``, in eval mode; the global RNG is left as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(0)  # dropout
        return pretrain(build_lm(kind), stream, steps=steps)
