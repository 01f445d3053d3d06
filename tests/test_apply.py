"""quantize_ / fake_quantize_ on our LMs and on user models of torch layers.

Tolerances: weights and forward outputs are compared exactly where both sides run the same
float32 ops on the same values; 1e-6 (relative) where op order differs (fused vs explicit).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from search_spaces.apply import fake_quantize_, quantize_, remove_fake_quantize_
from search_spaces.clusters import cluster_parameter, cluster_weight, find_clusters
from search_spaces.models import LSTMLM, LSTMConfig, TransformerConfig, TransformerLM
from search_spaces.precision import PrecisionMap
from search_spaces.quant import dequantize, levels, qmax, quantize


class UserLSTM(nn.Module):
    """A user LM on torch's fused nn.LSTM."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 6)
        self.rnn = nn.LSTM(6, 5, num_layers=2, batch_first=True)
        self.head = nn.Linear(5, 12)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.emb(tokens))[0])


class UserEncoder(nn.Module):
    """A user LM on nn.TransformerEncoderLayer (packed MultiheadAttention)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 12)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.emb(tokens)))


def _lstm_lm(tie: bool) -> nn.Module:
    return LSTMLM(LSTMConfig(vocab_size=12, embed_dim=8, hidden_dim=8, num_layers=2, tie_weights=tie))


def _transformer_lm() -> nn.Module:
    return TransformerLM(TransformerConfig(vocab_size=12, d_model=8, num_layers=2, num_heads=2, d_ff=16,
                                           context=8, dropout=0.0))


BUILDERS: dict[str, Callable[[], nn.Module]] = {
    "lstm_lm": lambda: _lstm_lm(False), "lstm_lm_tied": lambda: _lstm_lm(True),
    "transformer_lm": _transformer_lm, "user_lstm": UserLSTM, "user_encoder": UserEncoder,
}


def build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    return BUILDERS[kind]().eval()


def logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    out = model(tokens)
    return out if isinstance(out, torch.Tensor) else out.logits


def tokens() -> torch.Tensor:
    return torch.randint(0, 12, (3, 7), generator=torch.Generator().manual_seed(1))


def mixed_map(model: nn.Module, granularity: str = "matrix") -> PrecisionMap:
    """Cycle through bit widths, incl. 32, so row slices of one tensor get different bits."""
    cycle = (2, 4, 32, 1, 8, 3)
    return PrecisionMap({n: cycle[i % len(cycle)] for i, n in enumerate(find_clusters(model))}, granularity)


@pytest.mark.parametrize("kind", list(BUILDERS))
@pytest.mark.parametrize("granularity", ["matrix", "row"])
def test_quantize_puts_each_cluster_on_its_table(kind: str, granularity: str) -> None:
    model = build(kind)
    pm = mixed_map(model, granularity)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    results = quantize_(model, pm)
    clusters = find_clusters(model)
    assert set(results) == {n for n, b in pm.bits.items() if b != 32}
    for name, res in results.items():
        bits, view = pm.bits[name], cluster_weight(model, clusters[name])
        assert res.weight.data_ptr() == view.data_ptr()  # a view of the live weights, not a copy
        assert res.codes.abs().max() <= qmax(bits)
        assert torch.equal(view, dequantize(res.codes, res.alpha).to(view.dtype))
        rows = [view] if granularity == "matrix" else list(view)
        assert res.alpha.numel() == len(rows)
        for row in rows:
            assert row.unique().numel() <= levels(bits)
    # Biases, LayerNorm and 32-bit clusters are bit-identical; every low-bit cluster moved.
    after = model.state_dict()
    weight_keys = {f"{c.module}.{c.param}" for c in clusters.values()}
    leftovers = [k for k in before if k not in weight_keys and k != "decoder.weight"]  # tied alias
    assert leftovers and all(torch.equal(before[k], after[k]) for k in leftovers)
    for name, c in clusters.items():
        rows = slice(*c.rows) if c.rows else slice(None)
        key = f"{c.module}.{c.param}"
        assert torch.equal(after[key][rows], before[key][rows]) == (pm.bits[name] == 32), name


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_quantize_is_idempotent(kind: str) -> None:
    model = build(kind)
    pm = mixed_map(model, "row")
    first = quantize_(model, pm)
    snapshot = {n: r.weight.clone() for n, r in first.items()}
    second = quantize_(model, pm)
    for name, res in second.items():
        assert torch.equal(res.codes, first[name].codes)
        # Re-solving alpha from float32 table values can move it by an ulp: allow a couple of ulps.
        torch.testing.assert_close(res.weight, snapshot[name], rtol=4e-7, atol=0)


def test_user_lstm_forward_matches_explicit_reference() -> None:
    model = build("user_lstm")
    ref = copy.deepcopy(model)
    pm = PrecisionMap.uniform(model, 3)
    pm = PrecisionMap({**pm.bits, "rnn.weight_hh_l1.forget_gate": 32, "rnn.weight_ih_l0.output_gate": 1})
    quantize_(model, pm)
    with torch.no_grad():
        for k in range(2):
            for kind in ("ih", "hh"):
                w = getattr(ref.rnn, f"weight_{kind}_l{k}")
                names = [f"rnn.weight_{kind}_l{k}.{g}" for g in ("input_gate", "forget_gate", "cell_gate",
                                                                  "output_gate")]
                w.copy_(torch.cat([quantize(chunk, pm.bits[n]).weight for chunk, n in zip(w.chunk(4), names,
                                                                                           strict=True)]))
        for m in (ref.emb, ref.head):
            m.weight.copy_(quantize(m.weight, 3).weight)
    x = tokens()
    assert torch.equal(model.rnn.weight_hh_l1[5:10], ref.rnn.weight_hh_l1[5:10])
    assert not torch.equal(logits(model, x), logits(build("user_lstm"), x))
    assert torch.equal(logits(model, x), logits(ref, x))


def test_user_encoder_forward_matches_explicit_reference() -> None:
    model = build("user_encoder")
    ref = copy.deepcopy(model)
    bits = {"emb": 8, "layer.self_attn.in_proj.q": 2, "layer.self_attn.in_proj.k": 4,
            "layer.self_attn.in_proj.v": 32, "layer.self_attn.out_proj": 3, "layer.linear1": 2,
            "layer.linear2": 5, "head": 6}
    quantize_(model, PrecisionMap(bits))
    with torch.no_grad():
        q, k, v = ref.layer.self_attn.in_proj_weight.chunk(3)
        ref.layer.self_attn.in_proj_weight.copy_(torch.cat([quantize(q, 2).weight, quantize(k, 4).weight, v]))
        for name, m in (("layer.self_attn.out_proj", ref.layer.self_attn.out_proj), ("emb", ref.emb),
                        ("layer.linear1", ref.layer.linear1), ("layer.linear2", ref.layer.linear2),
                        ("head", ref.head)):
            m.weight.copy_(quantize(m.weight, bits[name]).weight)
    x = tokens()
    assert torch.equal(logits(model, x), logits(ref, x))


def test_invalid_map_writes_nothing() -> None:
    model = build("lstm_lm")
    before = copy.deepcopy(model.state_dict())
    bits = dict(PrecisionMap.uniform(model, 2).bits)
    bits["decoder"] = 7
    with pytest.raises(ValueError, match="decoder=7"):
        quantize_(model, PrecisionMap(bits))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    # Latent weights when fake-quantized, plain parameters otherwise; biases by their names.
    out = {n: cluster_parameter(model, c).grad for n, c in find_clusters(model).items()}
    weights = {id(cluster_parameter(model, c)) for c in find_clusters(model).values()}
    out.update({n: p.grad for n, p in model.named_parameters() if id(p) not in weights})
    return out


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_fake_quantize_equals_hard_quantize_with_ste_grads(kind: str) -> None:
    fake, hard = build(kind), build(kind)
    pm = mixed_map(fake, "row" if kind.startswith("user") else "matrix")
    latent_before = {n: cluster_weight(fake, c).detach().clone() for n, c in find_clusters(fake).items()}
    fake_quantize_(fake, pm)
    quantize_(hard, pm)
    assert list(find_clusters(fake)) == list(latent_before)
    x = tokens()
    out_fake, out_hard = logits(fake, x), logits(hard, x)
    assert torch.equal(out_fake, out_hard)
    assert not torch.equal(out_fake, logits(build(kind), x))  # the forward really sees quantized weights
    with torch.no_grad():  # inference fast paths (nn.TransformerEncoderLayer) read parametrized weights too
        assert torch.equal(logits(fake, x), logits(hard, x))
    target = torch.randint(0, 12, x.shape, generator=torch.Generator().manual_seed(2))
    for out in (out_fake, out_hard):
        F.cross_entropy(out.reshape(-1, 12), target.reshape(-1)).backward()
    g_fake, g_hard = _grads(fake), _grads(hard)
    assert g_fake.keys() == g_hard.keys()
    for name in g_fake:  # straight-through: the latent gets the gradient of the quantized weight
        torch.testing.assert_close(g_fake[name], g_hard[name], rtol=1e-5, atol=1e-7)
    for name, c in find_clusters(fake).items():  # latents stay FP (not projected)
        assert torch.equal(cluster_weight(fake, c).detach(), latent_before[name])


@pytest.mark.parametrize("kind", ["lstm_lm", "user_lstm"])
def test_fake_quantize_trains_latents_and_re_solves_alpha(kind: str) -> None:
    model = build(kind)
    pm = PrecisionMap.uniform(model, 2)
    fake_quantize_(model, pm)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = tokens()
    out0 = logits(model, x).detach()
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(logits(model, x).reshape(-1, 12), x.reshape(-1)).backward()
        opt.step()
    head = model.decoder if kind == "lstm_lm" else model.head
    latent = head.parametrizations.weight.original
    assert latent.unique().numel() > 3  # the latent is free, the forward weight is on the table
    assert head.weight.unique().numel() <= 3
    assert torch.equal(head.weight, quantize(latent.detach(), 2).weight)
    # The forward follows the trained latents (torch's LSTM must not keep stale cached weights).
    # (Not deepcopy: torch's parametrize shares one injected class between copies.)
    hard = build(kind)
    hard.load_state_dict({k.replace("parametrizations.", "").replace(".original", ""): v
                          for k, v in model.state_dict().items()})
    quantize_(hard, pm)
    out = logits(model, x)
    assert not torch.equal(out, out0) and torch.equal(out, logits(hard, x))


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_remove_restores_or_bakes(kind: str) -> None:
    model, hard = build(kind), build(kind)
    original = copy.deepcopy(model.state_dict())
    params_before = [id(p) for p in model.parameters()]
    pm = mixed_map(model)
    fake_quantize_(model, pm)
    remove_fake_quantize_(model, bake=False)
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert [id(p) for p in model.parameters()] == params_before
    assert list(model.state_dict()) == list(original)  # same order: checkpoints and zips line up
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())
    fake_quantize_(model, pm)
    remove_fake_quantize_(model, bake=True)
    quantize_(hard, pm)
    assert all(torch.equal(hard.state_dict()[k], v) for k, v in model.state_dict().items())
    x = tokens()
    assert torch.equal(logits(model, x), logits(hard, x))  # torch's LSTM sees the baked weights
    if kind == "lstm_lm_tied":
        assert model.decoder.weight is model.embedding.weight


def test_fake_quantize_again_replaces_the_map() -> None:
    model, hard = build("user_lstm"), build("user_lstm")
    fake_quantize_(model, PrecisionMap.uniform(model, 2))
    pm = PrecisionMap.uniform(model, 4, keep_fp="head")
    fake_quantize_(model, pm)
    assert not parametrize.is_parametrized(model.head)
    assert len(model.rnn.parametrizations.weight_ih_l0) == 1
    quantize_(hard, pm)
    assert torch.equal(logits(model, tokens()), logits(hard, tokens()))
    remove_fake_quantize_(model)  # bake
    remove_fake_quantize_(model)  # nothing left: a no-op
    assert torch.equal(logits(model, tokens()), logits(hard, tokens()))


def test_quantize_on_fake_quantized_model_projects_latents() -> None:
    model = build("transformer_lm")
    pm = PrecisionMap.uniform(model, 4)
    fake_quantize_(model, pm)
    quantize_(model, pm)
    latent = model.blocks[0].ffn.fc_in.parametrizations.weight.original
    assert latent.unique().numel() <= levels(4)


def test_foreign_parametrization_is_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    parametrize.register_parametrization(model[0], "weight", nn.Identity())
    with pytest.raises(ValueError, match="not mpnas fake quantization"):
        find_clusters(model)
