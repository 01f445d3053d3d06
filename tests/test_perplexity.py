"""The exact perplexity evaluator: every token scored once, batch layouts agree."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from evaluators.perplexity import perplexity
from search_spaces.models import LSTMLM, LMOutput, LSTMConfig, TransformerConfig, TransformerLM


class UniformLM(nn.Module):
    """Assigns equal probability to every word; perplexity must equal the vocabulary size."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(1))

    def init_state(self, batch: int, device: object = None) -> None:
        return None

    def forward(self, tokens: torch.Tensor, state: object = None, targets: object = None) -> LMOutput:
        return LMOutput(torch.zeros(*tokens.shape, self.vocab) + self.dummy, None, [])


def _manual_lstm_nll(model: LSTMLM, stream: torch.Tensor, start: int) -> float:
    """Token-by-token reference: one stream, state carried through every token."""
    full = torch.cat([torch.tensor([start]), stream])
    logits = model(full[:-1].view(1, -1)).logits[0]
    return float(F.cross_entropy(logits, full[1:], reduction="sum"))


def test_uniform_model_has_vocab_size_perplexity() -> None:
    result = perplexity(UniformLM(37), torch.randint(0, 37, (101,)), 0, batch_size=4, bptt=7)
    assert result["tokens"] == 101
    assert result["ppl"] == pytest.approx(37.0, rel=1e-6)


@torch.no_grad()
def test_lstm_single_stream_equals_manual_sum() -> None:
    torch.manual_seed(0)
    model = LSTMLM(LSTMConfig(vocab_size=30, embed_dim=8, hidden_dim=8)).eval()
    stream = torch.randint(0, 30, (157,))
    expected = _manual_lstm_nll(model, stream, start=3) / 157
    for bptt in (1, 10, 35, 500):
        assert perplexity(model, stream, 3, batch_size=1, bptt=bptt)["loss"] == pytest.approx(expected, rel=1e-5)


@torch.no_grad()
def test_lstm_batched_counts_every_token() -> None:
    """B rows plus the continued tail score all N tokens; rows restart from zero state."""
    torch.manual_seed(0)
    model = LSTMLM(LSTMConfig(vocab_size=30, embed_dim=8, hidden_dim=8)).eval()
    stream = torch.randint(0, 30, (157,))
    full = torch.cat([torch.tensor([3]), stream])
    batch, length = 4, 157 // 4  # 39 targets per row, a tail of 1 continues the last row
    expected = 0.0
    for b in range(batch):
        end = (b + 1) * length + (157 - batch * length if b == batch - 1 else 0)
        logits = model(full[b * length : end].view(1, -1)).logits[0]
        expected += float(F.cross_entropy(logits, full[b * length + 1 : end + 1], reduction="sum"))
    result = perplexity(model, stream, 3, batch_size=batch, bptt=6)
    assert result["tokens"] == 157
    assert result["loss"] == pytest.approx(expected / 157, rel=1e-5)


@torch.no_grad()
def test_transformer_windows_score_each_token_once_with_context() -> None:
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=25, d_model=16, num_layers=1, num_heads=2, d_ff=16,
                                            context=8, dropout=0.0)).eval()
    stream = torch.randint(0, 25, (45,))
    full = torch.cat([torch.tensor([0]), stream])
    # Reference for stride 3: token i (predicted from full[:i+1]) is scored in the first window
    # whose end covers it, i.e. with the window [end-8, end).
    ends = list(range(8, 45, 3)) + [45]
    expected, previous = 0.0, 0
    for end in ends:
        start = max(0, end - 8)
        logits = model(full[start:end].view(1, -1)).logits[0]
        nll = F.cross_entropy(logits, full[start + 1 : end + 1], reduction="none")
        expected += float(nll[len(nll) - (end - previous):].sum())
        previous = end
    for batch_size in (1, 5):
        result = perplexity(model, stream, 0, batch_size=batch_size, stride=3)
        assert result["tokens"] == 45
        assert result["loss"] == pytest.approx(expected / 45, rel=1e-5)


def test_rejects_empty_stream_and_restores_training_mode() -> None:
    model = UniformLM(5)
    model.train()
    with pytest.raises(ValueError, match="non-empty 1-D token stream"):
        perplexity(model, torch.tensor([], dtype=torch.long), 0)
    perplexity(model, torch.tensor([1, 2]), 0)
    assert model.training and math.isfinite(perplexity(model, torch.tensor([1]), 0)["ppl"])
