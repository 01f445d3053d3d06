"""Cluster discovery and the PrecisionMap value object: names, views, round trips, errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from search_spaces.clusters import Cluster, cluster_weight, find_clusters
from search_spaces.models import LSTMLM, LSTMConfig, TransformerConfig, TransformerLM
from search_spaces.models.lstm_lm import GATES
from search_spaces.precision import FORMAT_VERSION, PrecisionMap


def lstm_lm(tie: bool = False) -> LSTMLM:
    torch.manual_seed(0)
    return LSTMLM(LSTMConfig(vocab_size=30, embed_dim=8, hidden_dim=8, num_layers=2, tie_weights=tie))


def transformer_lm(tie: bool = True) -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(TransformerConfig(vocab_size=30, d_model=8, num_layers=2, num_heads=2, d_ff=16,
                                           context=8, dropout=0.0, tie_weights=tie))


class UserLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(12, 6)
        self.rnn = nn.LSTM(6, 5, num_layers=2, batch_first=True)
        self.head = nn.Linear(5, 12)


def test_lstm_lm_cluster_names() -> None:
    clusters = find_clusters(lstm_lm())
    gates = [f"layers.{k}.{g}.{m}" for k in range(2) for g in GATES for m in ("ih", "hh")]
    assert list(clusters) == ["embedding", *gates, "decoder"]
    c = clusters["layers.1.forget_gate.ih"]
    assert c == Cluster("layers.1.forget_gate.ih", "layers.1.forget_gate.ih", "weight", None, (8, 8))
    assert clusters["embedding"].numel == 240 and clusters["decoder"].shape == (30, 8)


def test_tied_lstm_lm_has_one_embedding_cluster() -> None:
    model = lstm_lm(tie=True)
    clusters = find_clusters(model)
    assert "decoder" not in clusters and list(clusters)[0] == "embedding"
    assert len(clusters) == 1 + 2 * 4 * 2
    assert cluster_weight(model, clusters["embedding"]) is model.decoder.weight


@pytest.mark.parametrize("tie", [True, False])
def test_transformer_lm_cluster_names(tie: bool) -> None:
    per_block = [f"blocks.{k}.{p}" for k in range(2) for p in ("attn.q", "attn.k", "attn.v", "attn.o",
                                                                  "ffn.fc_in", "ffn.fc_out")]
    expected = ["embedding", "pos_embedding", *per_block] + ([] if tie else ["decoder"])
    assert list(find_clusters(transformer_lm(tie))) == expected


def test_user_torch_lstm_clusters_are_gate_row_slices() -> None:
    model = UserLSTM()
    clusters = find_clusters(model)
    rnn = [f"rnn.weight_{kind}_l{k}.{g}" for k in range(2) for kind in ("ih", "hh") for g in GATES]
    assert list(clusters) == ["emb", *rnn, "head"]
    c = clusters["rnn.weight_ih_l1.cell_gate"]
    assert (c.module, c.param, c.rows, c.shape) == ("rnn", "weight_ih_l1", (10, 15), (5, 5))
    assert clusters["rnn.weight_ih_l0.output_gate"].shape == (5, 6)
    view = cluster_weight(model, c)
    assert view.data_ptr() == model.rnn.weight_ih_l1[10].data_ptr()
    assert torch.equal(view, model.rnn.weight_ih_l1[10:15])


def test_cluster_weight_is_a_live_view_for_writes_and_autograd() -> None:
    model = UserLSTM()
    c = find_clusters(model)["rnn.weight_hh_l0.forget_gate"]
    view = cluster_weight(model, c)
    view.square().sum().backward()
    grad = model.rnn.weight_hh_l0.grad
    assert torch.equal(grad[5:10], 2 * model.rnn.weight_hh_l0.detach()[5:10])
    assert torch.count_nonzero(grad[:5]) == 0 and torch.count_nonzero(grad[10:]) == 0
    with torch.no_grad():
        view.fill_(0.5)
    assert torch.all(model.rnn.weight_hh_l0[5:10] == 0.5) and not torch.any(model.rnn.weight_hh_l0[:5] == 0.5)


def test_encoder_layer_packed_attention_clusters() -> None:
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    clusters = find_clusters(nn.Sequential(layer))
    assert list(clusters) == ["0.self_attn.in_proj.q", "0.self_attn.in_proj.k", "0.self_attn.in_proj.v",
                              "0.self_attn.out_proj", "0.linear1", "0.linear2"]
    assert clusters["0.self_attn.in_proj.v"].rows == (16, 24)
    assert clusters["0.self_attn.in_proj.v"].param == "in_proj_weight"


def test_unpacked_attention_gru_rnn_and_bare_root() -> None:
    mha = nn.MultiheadAttention(8, 2, kdim=4, vdim=6)
    assert list(find_clusters(mha)) == ["q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj"]
    gru = find_clusters(nn.GRU(3, 4))
    assert list(gru)[:3] == ["weight_ih_l0.reset_gate", "weight_ih_l0.update_gate", "weight_ih_l0.new_gate"]
    assert list(find_clusters(nn.RNN(3, 4))) == ["weight_ih_l0", "weight_hh_l0"]
    assert list(find_clusters(nn.Linear(3, 2))) == ["weight"]


def test_shared_module_and_fp_leftovers() -> None:
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.LayerNorm(4), nn.Conv1d(4, 4, 1), shared)
    assert list(find_clusters(model)) == ["0"]


def test_lazy_module_raises() -> None:
    with pytest.raises(ValueError, match="not initialized"):
        find_clusters(nn.Sequential(nn.LazyLinear(3)))


# ---------------------------------------------------------------------------- PrecisionMap

def test_uniform_keep_fp_and_errors() -> None:
    model = lstm_lm()
    pm = PrecisionMap.uniform(model, 4, keep_fp=("embedding", "layers.*.cell_gate.*"))
    assert pm.bits["embedding"] == 32 and pm.bits["layers.1.cell_gate.hh"] == 32
    assert pm.bits["decoder"] == 4 and pm.bits["layers.0.input_gate.ih"] == 4
    assert list(pm.bits) == list(find_clusters(model))
    pm.validate(model)
    with pytest.raises(ValueError, match="match no cluster.*'decoderr'"):
        PrecisionMap.uniform(model, 4, keep_fp="decoderr")
    with pytest.raises(ValueError, match="bits=7"):
        PrecisionMap.uniform(model, 7)


def test_map_is_immutable_and_hashable() -> None:
    a = PrecisionMap({"x": 2, "y": 4}, meta={"scores": [1.5, 2], "nested": {"k": [None, True]}})
    b = PrecisionMap({"y": 4, "x": 2}, meta={"nested": {"k": [None, True]}, "scores": (1.5, 2)})
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a.bits == {"x": 2, "y": 4} and dict(a.bits) == {"x": 2, "y": 4}
    with pytest.raises(TypeError):
        a.bits["x"] = 3  # type: ignore[index]
    with pytest.raises(TypeError):
        a.meta["nested"]["k"] = 1  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.granularity = "row"  # type: ignore[misc]
    assert a != dataclasses.replace(a, granularity="row")


def test_source_dict_is_copied() -> None:
    bits = {"x": 2}
    pm = PrecisionMap(bits)
    bits["x"] = 8
    assert pm.bits["x"] == 2


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"bits": {"x": True}}, r"'bits\.x' must be an int"),
    ({"bits": {"x": 4.0}}, r"'bits\.x' must be an int"),
    ({"bits": {"x": "4"}}, r"'bits\.x' must be an int"),
    ({"bits": [("x", 4)]}, "'bits' must be a mapping"),
    ({"bits": {"": 4}}, "non-empty strings"),
    ({"bits": {}, "granularity": "column"}, "'granularity'"),
    ({"bits": {}, "version": FORMAT_VERSION + 1}, "newer than this mpnas"),
    ({"bits": {}, "version": 0}, "'version' must be an int >= 1"),
    ({"bits": {}, "meta": {"t": torch.ones(1)}}, r"'meta\.t': Tensor"),
    ({"bits": {}, "meta": {"s": {2: 0.1}}}, r"'meta\.s': keys must be strings"),
])
def test_constructor_rejects_bad_values(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        PrecisionMap(**kwargs)


def test_numpy_integers_become_ints() -> None:
    pm = PrecisionMap({"x": np.int64(4)}, meta={"seed": np.int32(3), "score": np.float32(0.5)})
    assert type(pm.bits["x"]) is int and pm.meta == {"seed": 3, "score": 0.5}
    assert PrecisionMap.from_json(pm.to_json()) == pm


MAPS = [
    PrecisionMap({}),
    PrecisionMap.uniform(lstm_lm(), 2),
    PrecisionMap.uniform(transformer_lm(), 8, granularity="row", keep_fp="embedding"),
    PrecisionMap({"a.b": 1, "c": 32, "d.weight_ih_l0.input_gate": 16}, granularity="row",
                 meta={"strategy": "kl", "seed": 7, "budget": 0.125, "ok": False, "none": None,
                       "scores": {"a.b": [0.1, 1e-12, -3.5e20]}, "tags": ["x", "y"], "note": "ünïcode: yes"}),
]


@pytest.mark.parametrize("pm", MAPS)
@pytest.mark.parametrize("fmt", ["yaml", "json"])
def test_round_trip_text(pm: PrecisionMap, fmt: str) -> None:
    text = pm.to_yaml() if fmt == "yaml" else pm.to_json()
    back = PrecisionMap.from_yaml(text) if fmt == "yaml" else PrecisionMap.from_json(text)
    assert back == pm and hash(back) == hash(pm)
    assert list(back.bits) == list(pm.bits)  # file order is map (model) order
    assert PrecisionMap.from_dict(pm.to_dict()) == pm


@pytest.mark.parametrize("pm", MAPS)
@pytest.mark.parametrize("name", ["p.yaml", "p.yml", "p.json", "P.JSON"])
def test_save_load(tmp_path: Path, pm: PrecisionMap, name: str) -> None:
    path = tmp_path / "run" / name
    pm.save(path)
    assert PrecisionMap.load(path) == pm
    assert [p.name for p in path.parent.iterdir()] == [name]  # no temporary files left behind


def test_save_load_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"p\.txt.*expected \.yaml"):
        PrecisionMap({}).save(tmp_path / "p.txt")
    with pytest.raises(ValueError, match=r"p\.toml"):
        PrecisionMap.load(tmp_path / "p.toml")


def test_validate_lists_every_problem_at_once() -> None:
    model = lstm_lm()
    bits = dict(PrecisionMap.uniform(model, 4).bits)
    del bits["decoder"], bits["layers.0.cell_gate.hh"]
    bits["layers.0.cell_gate.HH"] = 4
    bits["nope"] = 2
    bits["embedding"] = 7
    bits["layers.1.input_gate.ih"] = 0
    with pytest.raises(ValueError) as info:
        PrecisionMap(bits).validate(model)
    msg = str(info.value)
    for piece in ("unknown clusters", "layers.0.cell_gate.HH", "nope", "missing clusters", "decoder",
                  "layers.0.cell_gate.hh", "invalid bit widths", "embedding=7", "layers.1.input_gate.ih=0"):
        assert piece in msg
    assert msg.count("\n") == 3  # one header + one line per kind of problem


GOOD = "version: 1\ngranularity: matrix\nbits:\n  a: 4\nmeta: {}\n"


@pytest.mark.parametrize(("text", "key"), [
    (GOOD.replace("bits:", "bitz:"), "bitz"),
    (GOOD.replace("version: 1\n", ""), "'version'"),
    (GOOD.replace("version: 1", "version: 2"), "'version' is 2, newer"),
    (GOOD.replace("version: 1", "version: one"), "'version' must be an int"),
    (GOOD.replace("bits:\n  a: 4\n", ""), "missing key 'bits'"),
    (GOOD.replace("a: 4", "a: four"), "'bits.a' must be an int"),
    (GOOD.replace("a: 4", "a: true"), "'bits.a' must be an int"),
    (GOOD.replace("a: 4", "a: 4.5"), "'bits.a' must be an int"),
    (GOOD.replace("  a: 4\n", "  - a\n"), "'bits' must be a mapping"),
    (GOOD.replace("matrix", "column"), "'granularity'"),
    (GOOD.replace("meta: {}", "meta: [1]"), "'meta' must be a mapping"),
    (GOOD.replace("meta: {}", "meta: {s: {2: 0.5}}"), "'meta.s': keys must be strings"),
    (GOOD.replace("  a: 4\n", "  a: 4\n  a: 2\n"), "duplicate key 'a'"),
    ("- 1\n- 2\n", "must be a mapping"),
    ("bits: [unclosed\n", "not valid YAML"),
])
def test_bad_yaml_names_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "precision.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        PrecisionMap.load(path)
    assert str(path) in str(info.value) and key in str(info.value)


@pytest.mark.parametrize(("text", "key"), [
    ('{"version": 1, "bits": {"a": "4"}}', "'bits.a' must be an int"),
    ('{"version": 1, "bits": {"a": 4}, "extra": 1}', "extra"),
    ('{"version": 3, "bits": {}}', "newer"),
    ('{"version": 1, "bits": {"a": 4, "a": 2}}', "duplicate key 'a'"),
    ('{"version": 1, "bits": ', "not valid JSON"),
])
def test_bad_json_names_file_and_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "precision.json"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        PrecisionMap.load(path)
    assert str(path) in str(info.value) and key in str(info.value)


def test_minimal_file_defaults() -> None:
    pm = PrecisionMap.from_yaml("version: 1\nbits: {a: 4}\n")
    assert pm == PrecisionMap({"a": 4}) and pm.granularity == "matrix" and pm.meta == {}


def test_missing_file_names_path(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="absent.yaml"):
        PrecisionMap.load(tmp_path / "absent.yaml")
