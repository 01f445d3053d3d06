"""Issue 14 item 2: the LM protocol and its adapter; every "Why" of the issue on a plain torch LM.

perplexity, kl, hessian, gumbel, export_packed and load_packed all failed on a plain
nn.Embedding + nn.LSTM + nn.Linear (or nn.TransformerEncoder) module before the adapter.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nas.config.sections import SearchSection
from nas.search.base import SearchData
from nas.search.strategies import get_strategy
from search_spaces.apply import quantize_
from search_spaces.clusters import find_clusters
from search_spaces.models import LSTMLM, from_torch_lstm
from search_spaces.precision import PrecisionMap
from search_spaces.space import SearchSpace
from tests.plain_lms import VOCAB, PlainLSTM, PlainTransformer, token_stream

LSTM_GATES = [f"lstm.weight_{m}_l0.{g}_gate" for m in ("ih", "hh") for g in ("input", "forget", "cell", "output")]


@pytest.fixture()
def stream(lm_tokens: torch.Tensor) -> torch.Tensor:
    return lm_tokens


@pytest.fixture()
def lstm(lm_copy: Callable[[str], torch.nn.Module]) -> PlainLSTM:
    """The session's pretrained plain LSTM (a copy: tests may change it)."""
    return lm_copy("plain_lstm")


@pytest.fixture()
def transformer(lm_copy: Callable[[str], torch.nn.Module]) -> PlainTransformer:
    return lm_copy("plain_transformer")


def _space(model: torch.nn.Module, avg_bits: float = 4.0) -> SearchSpace:
    return SearchSpace.from_config({"bits": [2, 4, 8]}, {"avg_bits": avg_bits}, model)


# ----------------------------------------------------------------------------- the adapter

def test_adapter_shares_the_modules_parameters_names_and_mode(lstm: PlainLSTM) -> None:
    from search_spaces.models import ModuleLM, as_lm, unwrap

    model = copy.deepcopy(lstm)
    lm = as_lm(model)
    assert isinstance(lm, ModuleLM) and hasattr(lm, "init_state") and unwrap(lm) is model
    assert list(lm.state_dict()) == list(model.state_dict())
    assert all(a is b for a, b in zip(lm.parameters(), model.parameters(), strict=True))
    assert list(find_clusters(lm)) == list(find_clusters(model)) == ["embedding", *LSTM_GATES, "decoder"]
    quantize_(lm, PrecisionMap.uniform(lm, 2))  # through the adapter: the user's module is quantized
    assert model.decoder.weight.unique().numel() <= 3
    lm.train()
    assert model.training and model.lstm.training
    lm.eval()
    assert not model.training
    twin = copy.deepcopy(lm)  # the copy shares parameters with its own copy of the module, not ours
    assert all(a is b for a, b in zip(twin.parameters(), twin.wrapped.parameters(), strict=True))
    assert twin.wrapped.decoder.weight is not model.decoder.weight


def test_adapter_output_and_loss(lstm: PlainLSTM, transformer: PlainTransformer) -> None:
    from search_spaces.models import as_lm

    tokens = token_stream(41)[None]
    out = as_lm(lstm)(tokens[:, :-1], None, tokens[:, 1:])
    logits, _ = lstm(tokens[:, :-1])
    torch.testing.assert_close(out.logits, logits)
    torch.testing.assert_close(out.loss, F.cross_entropy(logits.reshape(-1, VOCAB), tokens[0, 1:]))
    window = as_lm(transformer, context=16)
    assert not hasattr(window, "init_state") and window.config.context == 16
    with pytest.raises(ValueError, match="exceeds the model's context of 16"):
        window(tokens)
    assert as_lm(window, context=32) is window  # a context given once is kept


def test_mpnas_models_and_protocol_followers_pass_unchanged() -> None:
    from search_spaces.models import LSTMConfig, TransformerConfig, TransformerLM, as_lm

    ours = LSTMLM(LSTMConfig(vocab_size=10, embed_dim=4, hidden_dim=4, num_layers=1))
    assert as_lm(ours) is ours
    transformer = TransformerLM(TransformerConfig(vocab_size=10, d_model=4, num_layers=1, num_heads=1, d_ff=8))
    assert as_lm(transformer, context=3) is transformer


# ----------------------------------------------------------------------------- the failures

def test_perplexity_of_a_plain_lstm_equals_its_mpnas_conversion(lstm: PlainLSTM) -> None:
    """Was: 'PlainLSTM' object has no attribute 'config'. 103 tokens in 4 rows leave a tail that
    continues the last row's state (select_state on torch's [layers, batch, hidden] state)."""
    from evaluators.perplexity import perplexity

    tokens = token_stream(103, seed=3)
    plain = perplexity(lstm, tokens, 0, batch_size=4, bptt=7)
    converted = perplexity(from_torch_lstm(lstm.embedding, lstm.lstm, lstm.decoder), tokens, 0, batch_size=4, bptt=7)
    assert plain["tokens"] == 103
    assert plain["loss"] == pytest.approx(converted["loss"], rel=1e-5)


def test_perplexity_of_a_plain_transformer_takes_a_context(transformer: PlainTransformer) -> None:
    from evaluators.perplexity import perplexity

    tokens = token_stream(31, seed=4)
    with pytest.raises(ValueError, match="context="):
        perplexity(transformer, tokens, 0)
    result = perplexity(transformer, tokens, 0, context=32)  # one window holds the whole stream
    full = torch.cat([torch.tensor([0]), tokens])
    with torch.no_grad():
        nll = F.cross_entropy(transformer(full[None, :-1])[0], full[1:])
    assert result["ppl"] == pytest.approx(math.exp(float(nll)), rel=1e-5)


def test_kl_on_a_plain_transformer_takes_the_datas_window(transformer: PlainTransformer, stream: torch.Tensor) -> None:
    """Was: "... has no config.context; pass context=" with no way to pass it through the strategy."""
    space = _space(transformer)
    data = SearchData(train=stream, valid=stream, batch_size=4, length=32)
    precision = get_strategy("kl").search(transformer, space, data, SearchSection(kl_tokens=400))
    assert set(precision.bits) == set(find_clusters(transformer)) and space.fits_budget(precision)
    scores = precision.meta["scores"]["encoder.layers.0.self_attn.in_proj.q"]
    assert scores["2"] >= scores["8"] >= 0


@pytest.mark.parametrize("kind", ["lstm", "transformer"])
def test_hessian_on_plain_modules(kind: str, request: pytest.FixtureRequest, stream: torch.Tensor) -> None:
    """Was: forward() got an unexpected keyword argument 'targets' (and nn.MultiheadAttention's fused
    attention kernel has no double backward: the traces run on the math kernel)."""
    model = request.getfixturevalue(kind)
    before = copy.deepcopy(model.state_dict())
    space = _space(model)
    data = SearchData(train=stream, valid=stream, batch_size=4, length=16)
    settings = SearchSection(hessian_batches=1, hessian_max_iters=30)
    precision = get_strategy("hessian").search(model, space, data, settings)
    assert space.contains(precision) and space.fits_budget(precision)
    assert all(math.isfinite(t) for t in precision.meta["hutchinson"]["traces"].values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not model.training


def test_gumbel_on_a_plain_lstm_searches_its_fused_gate_rows(lstm: PlainLSTM, stream: torch.Tensor) -> None:
    """Was: 'cluster lstm.weight_ih_l0.input_gate is a row slice ...; the supernet needs whole-tensor clusters'."""
    space = _space(lstm, 3.0)
    data = SearchData(train=stream, valid=stream, batch_size=4, length=16)
    precision = get_strategy("gumbel").search(lstm, space, data, SearchSection(epochs=0.5))
    assert space.contains(precision) and space.fits_budget(precision)
    assert set(precision.meta["probabilities"]) == set(find_clusters(lstm))


def test_supernet_assembles_fused_parameters_from_their_clusters(lstm: PlainLSTM) -> None:
    from nas.search.gumbel import GumbelSupernet
    from search_spaces.models import as_lm

    lm = as_lm(copy.deepcopy(lstm))
    net = GumbelSupernet(lm, {"lstm.weight_ih_l0.forget_gate": (2,), "lstm.weight_ih_l0.cell_gate": (32,)})
    mixed = net.mixed_weights(1.0, None)
    assert list(mixed) == ["lstm.weight_ih_l0"]
    whole, rows = lm.lstm.weight_ih_l0, lm.lstm.hidden_size
    assert mixed["lstm.weight_ih_l0"].shape == whole.shape
    torch.testing.assert_close(mixed["lstm.weight_ih_l0"][: rows], whole[: rows], rtol=0, atol=0)
    torch.testing.assert_close(mixed["lstm.weight_ih_l0"][2 * rows :], whole[2 * rows :], rtol=0, atol=0)
    forget = mixed["lstm.weight_ih_l0"][rows : 2 * rows]
    assert forget.unique().numel() <= 3 and not torch.equal(forget, whole[rows : 2 * rows])


def test_export_packed_and_load_packed_into_a_skeleton(lstm: PlainLSTM, tmp_path: Path) -> None:
    """Was: export_packed raised 'not an mpnas model'."""
    from search_spaces.packed import export_packed, load_packed
    from search_spaces.packed_format import PackedFileError, read_packed

    model = copy.deepcopy(lstm)
    precision = PrecisionMap.uniform(model, 3, leftover_bits=8)
    header = export_packed(model, precision, tmp_path / "plain.mpq")
    assert header["model"] == {"type": "module", "class": "tests.plain_lms.PlainLSTM"}
    with pytest.raises(PackedFileError, match="pass model="):
        load_packed(tmp_path / "plain.mpq")
    skeleton = PlainLSTM(seed=9)
    loaded, again = load_packed(tmp_path / "plain.mpq", model=skeleton)
    assert loaded is skeleton and again == precision
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    tokens = token_stream(50, seed=5)[None]
    assert torch.equal(loaded(tokens)[0], model(tokens)[0])
    assert read_packed(tmp_path / "plain.mpq")[1].keys() == model.state_dict().keys()
    with pytest.raises(PackedFileError, match="loadable"):
        load_packed(tmp_path / "plain.mpq", model=PlainTransformer())
