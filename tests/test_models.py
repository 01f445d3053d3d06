"""The LSTM and Transformer LMs: shapes, names, fused-LSTM conversion, double backward, causality."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from evaluators.perplexity import perplexity
from search_spaces.models import (
    LSTMLM,
    LMOutput,
    LSTMConfig,
    TransformerConfig,
    TransformerLM,
    build_model,
    from_torch_lstm,
    model_config_dict,
    to_torch_lstm,
)


def _lstm(**kw: object) -> LSTMLM:
    torch.manual_seed(0)
    return LSTMLM(LSTMConfig(vocab_size=50, embed_dim=12, hidden_dim=16, num_layers=2, **kw))


def test_lstm_forward_shapes_and_state_carry() -> None:
    model = _lstm()
    tokens = torch.randint(0, 50, (3, 7))
    out = model(tokens, targets=tokens)
    assert out.logits.shape == (3, 7, 50)
    assert len(out.state) == 2 and out.state[0][0].shape == (3, 16)
    # Running 7 steps at once equals 3 + 4 steps with the state carried.
    first = model(tokens[:, :3])
    second = model(tokens[:, 3:], first.state)
    torch.testing.assert_close(torch.cat([first.logits, second.logits], 1), out.logits)


def test_lstm_parameter_names_are_readable_clusters() -> None:
    names = {n for n, _ in _lstm().named_parameters()}
    assert "layers.0.forget_gate.ih.weight" in names
    assert "layers.1.output_gate.hh.weight" in names
    assert "layers.1.output_gate.hh.bias" not in names  # one bias per gate, on ih
    assert {"embedding.weight", "decoder.weight", "decoder.bias"} <= names


def test_lstm_matches_torch_cell_math() -> None:
    """Our gate layout reproduces torch.nn.LSTM exactly (after conversion)."""
    torch.manual_seed(1)
    emb, lstm, dec = nn.Embedding(40, 8), nn.LSTM(8, 10, 2, batch_first=True), nn.Linear(10, 40)
    ours = from_torch_lstm(emb, lstm, dec)
    tokens = torch.randint(0, 40, (4, 9))
    with torch.no_grad():
        reference = dec(lstm(emb(tokens))[0])
        torch.testing.assert_close(ours(tokens).logits, reference, rtol=1e-5, atol=1e-6)


class FusedLSTMLM(nn.Module):
    """A user's LM built on torch's fused nn.LSTM, exposing our per-layer state layout."""

    def __init__(self, emb: nn.Embedding, lstm: nn.LSTM, dec: nn.Linear) -> None:
        super().__init__()
        self.emb, self.lstm, self.dec = emb, lstm, dec

    def init_state(self, batch: int, device: object = None) -> None:
        return None

    def forward(self, tokens: torch.Tensor, state: object = None, targets: object = None) -> LMOutput:
        torch_state = None
        if state is not None:  # list of per-layer (h, c) -> torch's stacked (h, c)
            torch_state = (torch.stack([h for h, _ in state]), torch.stack([c for _, c in state]))
        out, (h, c) = self.lstm(self.emb(tokens), torch_state)
        return LMOutput(self.dec(out), None, [(h[i], c[i]) for i in range(h.size(0))])


def test_fused_lstm_conversion_same_perplexity() -> None:
    """Same weights through both converters give the same perplexity on a token stream."""
    model = _lstm()
    stream = torch.randint(0, 50, (400,))
    emb, lstm, dec = to_torch_lstm(model)
    for batch_size in (1, 3):
        ppl_ours = perplexity(model, stream, 0, batch_size=batch_size, bptt=13)["ppl"]
        ppl_fused = perplexity(FusedLSTMLM(emb, lstm, dec), stream, 0, batch_size=batch_size, bptt=13)["ppl"]
        assert ppl_ours == pytest.approx(ppl_fused, rel=1e-5)
    back = from_torch_lstm(emb, lstm, dec)
    for (name, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def test_lstm_double_backward_hessian_vector_product() -> None:
    model = _lstm()
    tokens = torch.randint(0, 50, (2, 6))
    params = [p for p in model.parameters() if p.requires_grad]
    loss = model(tokens, targets=tokens).loss
    grads = torch.autograd.grad(loss, params, create_graph=True)
    probe = [torch.randn_like(p) for p in params]
    hvp = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, probe, strict=True)), params)
    assert all(torch.isfinite(h).all() for h in hvp)
    assert sum(float(h.abs().sum()) for h in hvp) > 0


def test_tied_lstm_shares_one_matrix() -> None:
    model = LSTMLM(LSTMConfig(vocab_size=30, embed_dim=8, hidden_dim=8, tie_weights=True))
    assert model.decoder.weight is model.embedding.weight
    with pytest.raises(ValueError, match="tie_weights needs embed_dim == hidden_dim"):
        LSTMConfig(embed_dim=8, hidden_dim=9, tie_weights=True)


def test_transformer_is_causal_and_names_projections() -> None:
    torch.manual_seed(0)
    model = TransformerLM(TransformerConfig(vocab_size=40, d_model=16, num_layers=2, num_heads=2, d_ff=32,
                                            context=12, dropout=0.0)).eval()
    tokens = torch.randint(0, 40, (2, 10))
    changed = tokens.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 40
    a, b = model(tokens).logits, model(changed).logits
    torch.testing.assert_close(a[:, :6], b[:, :6])  # the future does not leak into the past
    assert not torch.allclose(a[:, 6:], b[:, 6:])
    names = {n for n, _ in model.named_parameters()}
    assert {"blocks.0.attn.q.weight", "blocks.1.ffn.fc_out.weight", "blocks.0.ln1.weight"} <= names
    assert model.decoder.weight is model.embedding.weight
    with pytest.raises(ValueError, match="exceeds the model's context"):
        model(torch.zeros(1, 13, dtype=torch.long))


def test_transformer_default_has_six_layers_and_double_backward() -> None:
    assert TransformerConfig().num_layers == 6
    model = TransformerLM(TransformerConfig(vocab_size=20, d_model=8, num_layers=1, num_heads=2, d_ff=16,
                                            context=8, dropout=0.0))
    tokens = torch.randint(0, 20, (2, 8))
    params = list(model.parameters())
    grads = torch.autograd.grad(model(tokens, targets=tokens).loss, params, create_graph=True)
    hvp = torch.autograd.grad(sum(g.sum() for g in grads), params, allow_unused=True)
    assert any(h is not None and h.abs().sum() > 0 for h in hvp)


def test_build_model_round_trips_its_config() -> None:
    model = build_model("transformer", vocab_size=20, d_model=8, num_layers=1, num_heads=2, d_ff=16, context=8)
    config = model_config_dict(model)
    rebuilt = build_model(config.pop("type"), **config)
    assert rebuilt.config == model.config
    with pytest.raises(ValueError, match="unknown model type 'gru'"):
        build_model("gru")
