"""Leftover quantization (``space.leftover_bits``): biases and norms at 8/16 bits, per-tensor affine.

Checked: the option's validation, the map field and its files (old ones included), the size
accounting against hand counts and against the packed payload, the packed round trip, and that a
model evaluated in memory (hard or fake quantized) equals the one loaded from its packed file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

from evaluators.perplexity import perplexity
from nas.config.sections import SearchSection, load_config
from nas.search.strategies import get_strategy
from search_spaces.apply import fake_quantize_, quantize_, quantize_all_, remove_fake_quantize_
from search_spaces.clusters import find_clusters, find_leftovers
from search_spaces.models import build_model
from search_spaces.packed import export_packed, load_packed
from search_spaces.packed_format import PackedFileError, read_packed
from search_spaces.precision import LEFTOVER_BITS, PrecisionMap
from search_spaces.quant import dequantize_affine, quantize_affine
from search_spaces.size import model_size
from search_spaces.space import SearchSpace
from search_spaces.space_parsing import SpaceError

SRC = "exp.yaml"
LSTM = dict(vocab_size=3000, embed_dim=16, hidden_dim=16, num_layers=1)  # decoder bias: 3000 of ~150k
TFM = dict(vocab_size=500, d_model=16, num_layers=2, num_heads=2, d_ff=32, context=8, dropout=0.0)


def _model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model(kind, **(LSTM if kind == "lstm" else TFM))
    with torch.no_grad():  # trained-looking leftovers: biases off zero, LayerNorm gains around 1
        for name, tensor in find_leftovers(model).items():
            tensor.copy_(torch.randn_like(tensor) * 0.5 + (1.0 if name.endswith("ln1.weight") else -2.0))
    return model


def _header(path: Path) -> dict:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[8:16])
    return json.loads(raw[16 : 16 + length])


def _payload_bytes(path: Path) -> int:
    return path.stat().st_size - 16 - struct.unpack("<Q", path.read_bytes()[8:16])[0]


# --- the option: validation and the map field ---------------------------------------------------

@pytest.mark.parametrize("value", [4, 0, 64, "8", 8.0, True, None])
def test_space_rejects_bad_leftover_bits_naming_file_key_and_value(value: object) -> None:
    model = _model("lstm")
    with pytest.raises(SpaceError, match=rf"^exp\.yaml: space\.leftover_bits: {value!r}.* allowed: \[8, 16, 32\]"):
        SearchSpace.from_config({"leftover_bits": value}, None, model, SRC)


def test_experiment_file_with_bad_leftover_bits_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("model: {type: lstm, embed_dim: 16, hidden_dim: 16, num_layers: 1}\n"
                    "space: {bits: [2], leftover_bits: 4}\n")
    exp = load_config(path)
    with pytest.raises(SpaceError, match=r"exp\.yaml: space\.leftover_bits: 4 is not supported"):
        SearchSpace.from_config(exp.space, None, _model("lstm"), exp.source)


@pytest.mark.parametrize("bits", [8, 16])
def test_every_map_of_the_space_carries_leftover_bits(bits: int) -> None:
    model = _model("lstm")
    space = SearchSpace.from_config({"bits": [2, 4], "leftover_bits": bits}, {"avg_bits": 3.0}, model, SRC)
    maps = [space.smallest_map(), space.largest_map(), space.uniform_map(4),
            get_strategy("uniform").search(model, space, None, SearchSection()),
            get_strategy("random").search(model, space, None, SearchSection())]
    assert all(pm.leftover_bits == bits and space.contains(pm) for pm in maps)
    assert not space.contains(PrecisionMap(dict(maps[0].bits)))  # same bits, float32 leftovers
    assert SearchSpace.from_config({"bits": [2]}, None, model, SRC).smallest_map().leftover_bits == 32


def test_map_field_round_trips_and_is_part_of_equality(tmp_path: Path) -> None:
    model = _model("transformer")
    pm = PrecisionMap.uniform(model, 2, leftover_bits=8)
    assert pm != PrecisionMap.uniform(model, 2) and hash(pm) != hash(PrecisionMap.uniform(model, 2))
    assert pm.to_dict()["leftover_bits"] == 8 and "leftover_bits" not in PrecisionMap.uniform(model, 2).to_dict()
    for name in ("m.yaml", "m.json"):
        pm.save(tmp_path / name)
        assert PrecisionMap.load(tmp_path / name) == pm
    kept = pm.with_meta({"label": "x"})
    assert kept.leftover_bits == 8 and dict(kept.bits) == dict(pm.bits) and dict(kept.meta) == {"label": "x"}
    with pytest.raises(ValueError, match=r"key 'leftover_bits' is 4; expected one of \(8, 16, 32\)"):
        PrecisionMap(dict(pm.bits), leftover_bits=4)
    with pytest.raises(ValueError, match=r"m\.yaml: key 'leftover_bits' is 'eight'"):
        PrecisionMap.from_yaml("version: 1\nbits: {a: 2}\nleftover_bits: eight\n", "m.yaml")


def test_old_precision_map_file_loads_with_float32_leftovers(tmp_path: Path) -> None:
    path = tmp_path / "old.yaml"
    path.write_text("version: 1\ngranularity: matrix\nbits:\n  embedding: 2\n  decoder: 4\nmeta:\n  strategy: kl\n")
    pm = PrecisionMap.load(path)
    assert pm.leftover_bits == 32 == LEFTOVER_BITS[-1]
    assert pm.to_yaml() == path.read_text()  # and it is written back byte for byte


# --- size accounting -----------------------------------------------------------------------------

class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)  # cluster of 12 weights; bias: leftover of 3
        self.norm = nn.LayerNorm(3)  # leftovers: weight 3, bias 3
        self.bn = nn.BatchNorm1d(3)  # leftovers 3 + 3 (parameters); buffers 3 + 3 + 1 stay FP32


def test_hand_computed_sizes() -> None:
    model = _Tiny()
    fp = model_size(model, PrecisionMap({"fc": 2}))
    # fc: 2*12/8 = 3 B + scale 4 B; 5 leftover parameters of 3 and 7 buffer elements: 22 * 4 B.
    assert fp["theoretical_bytes"] == 3 + 4 + 22 * 4 and fp["leftover_bytes"] == 88
    for bits in (8, 16):
        size = model_size(model, PrecisionMap({"fc": 2}, leftover_bits=bits))
        # 15 parameter elements at bits/8 B + (scale, min) = 8 B per tensor for 5 tensors; buffers FP32.
        leftover = bits * 15 / 8 + 5 * 8 + 7 * 4
        assert size["leftover_bytes"] == leftover and size["theoretical_bytes"] == 3 + 4 + leftover
        assert (size["quantized_leftover_params"], size["fp_leftover_params"]) == (15, 7)
        assert size["avg_bits"] == fp["avg_bits"] == 2.0  # over the clusters only, as the budgets define
        assert size["fp32_bytes"] == fp["fp32_bytes"]


def test_decoder_bias_share_of_a_two_bit_model_shrinks() -> None:
    model = _model("lstm")
    fp32, int8 = (model_size(model, PrecisionMap.uniform(model, 2, leftover_bits=b)) for b in (32, 8))
    bias = model.decoder.bias.numel()
    assert 4 * bias / fp32["theoretical_bytes"] > 0.25  # the situation: a large FP32 softmax bias
    leftovers = find_leftovers(model)
    saved = sum(3 * t.numel() - 8 for t in leftovers.values())  # 4 B -> 1 B per element, + 8 B per tensor
    assert fp32["theoretical_bytes"] - int8["theoretical_bytes"] == saved


def test_space_accounting_and_byte_budgets_follow_leftover_bits() -> None:
    model = _model("transformer")
    spaces = {b: SearchSpace.from_config({"bits": [1, 2, 4], "leftover_bits": b}, {"size_mb": 0.02}, model, SRC)
              for b in (32, 8)}
    for space in spaces.values():
        for pm in (space.smallest_map(), space.largest_map()):
            assert space.theoretical_bytes(pm) == model_size(model, pm)["theoretical_bytes"]
    saved = spaces[32].leftover_bytes - spaces[8].leftover_bytes
    assert saved > 0 and spaces[32].fixed_bytes - spaces[8].fixed_bytes == saved
    # The same byte budget leaves 8 more weight bits per byte the leftovers no longer take.
    assert spaces[8].budget.max_weight_bits(spaces[8]) - spaces[32].budget.max_weight_bits(spaces[32]) == 8 * saved


# --- packed format ---------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["lstm", "transformer"])
def test_packed_file_shrinks_by_the_accounted_bytes(kind: str, tmp_path: Path) -> None:
    sizes, files = {}, {}
    for bits in (32, 8):
        model = _model(kind)
        pm = PrecisionMap.uniform(model, 2, leftover_bits=bits)
        files[bits] = tmp_path / f"m{bits}.mpq"
        export_packed(model, pm, files[bits])
        sizes[bits] = model_size(model, pm)["theoretical_bytes"]
        assert _payload_bytes(files[bits]) == sizes[bits]  # the payload is exactly the accounting
    saved_file = files[32].stat().st_size - files[8].stat().st_size
    header_growth = (files[8].stat().st_size - _payload_bytes(files[8])) - (
        files[32].stat().st_size - _payload_bytes(files[32]))
    assert saved_file == sizes[32] - sizes[8] - header_growth
    # An affine piece's JSON has two more fields than an fp32 one ("bits", "scale_offset"); only
    # tensors of a few elements (this tiny Transformer's) lose much of their saving to it.
    assert 0 <= header_growth <= 40 * len(find_leftovers(model)) + 40 and saved_file > 0
    if kind == "lstm":  # the large decoder bias dominates
        assert saved_file > 0.95 * (sizes[32] - sizes[8])
    header = _header(files[8])
    assert header["format_version"] == 2 and header["precision"]["leftover_bits"] == 8
    kinds = {p["kind"] for t in header["tensors"] for p in t["pieces"]}
    assert kinds == {"codes", "affine"}  # every parameter is a cluster or a leftover; no buffers here


@pytest.mark.parametrize("bits", [8, 16])
def test_packed_round_trip_is_bit_identical(bits: int, tmp_path: Path) -> None:
    model = _model("transformer")
    pm = PrecisionMap.uniform(model, 3, granularity="row", leftover_bits=bits)
    export_packed(model, pm, tmp_path / "m.mpq")
    loaded, loaded_map = load_packed(tmp_path / "m.mpq")
    assert loaded_map == pm
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    for name, tensor in find_leftovers(loaded).items():
        assert tensor.unique().numel() <= 2**bits, name  # really on the affine grid


def test_float32_leftovers_still_write_the_old_format(tmp_path: Path) -> None:
    model = _model("lstm")
    export_packed(model, PrecisionMap.uniform(model, 2), tmp_path / "m.mpq")
    header = _header(tmp_path / "m.mpq")
    assert header["format_version"] == 1 and "leftover_bits" not in header["precision"]
    assert {p["kind"] for t in header["tensors"] for p in t["pieces"]} == {"codes", "fp32"}
    assert load_packed(tmp_path / "m.mpq")[1].leftover_bits == 32


def _rewrite_header(path: Path, change: dict) -> None:
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[8:16])
    header = {**json.loads(raw[16 : 16 + length]), **change}
    blob = json.dumps(header, sort_keys=True).encode()
    path.write_bytes(raw[:8] + struct.pack("<Q", len(blob)) + blob + raw[16 + length :])


def test_affine_pieces_need_format_two_and_newer_formats_are_refused(tmp_path: Path) -> None:
    model = _model("lstm")
    path = tmp_path / "m.mpq"
    export_packed(model, PrecisionMap.uniform(model, 2, leftover_bits=8), path)
    _rewrite_header(path, {"format_version": 1})
    with pytest.raises(PackedFileError, match="unknown piece kind 'affine'"):
        read_packed(path)
    _rewrite_header(path, {"format_version": 3})
    with pytest.raises(PackedFileError, match=r"m\.mpq: format_version 3 is not supported .*upgrade mpnas"):
        read_packed(path)


# --- the evaluated model is the packed model -------------------------------------------------------

@pytest.mark.parametrize("kind", ["lstm", "transformer"])
@pytest.mark.parametrize("bits", [8, 16])
def test_logits_in_memory_equal_logits_from_the_packed_file(kind: str, bits: int, tmp_path: Path) -> None:
    pm = PrecisionMap.uniform(_model(kind), 2, leftover_bits=bits)
    hard, fake, packed, fp_leftovers = _model(kind), _model(kind), _model(kind), _model(kind)
    quantize_(hard, pm)
    fake_quantize_(fake, pm)
    export_packed(packed, pm, tmp_path / "m.mpq")
    loaded, _ = load_packed(tmp_path / "m.mpq")
    quantize_(fp_leftovers, PrecisionMap(dict(pm.bits)))
    stream = torch.randint(0, 500, (120,), generator=torch.Generator().manual_seed(1))
    idx = stream[:64].reshape(4, 16)[:, :8]
    logits = {}
    for name, model in {"hard": hard, "fake": fake, "loaded": loaded, "fp_leftovers": fp_leftovers}.items():
        model.eval()
        with torch.no_grad():
            logits[name] = model(idx)[0]
    assert torch.equal(logits["hard"], logits["loaded"]) and torch.equal(logits["fake"], logits["loaded"])
    assert not torch.equal(logits["fp_leftovers"], logits["loaded"])  # the leftovers were really quantized
    assert perplexity(hard, stream, 0)["ppl"] == perplexity(loaded, stream, 0)["ppl"]


def test_fake_quantization_of_leftovers_trains_and_bakes_to_the_hard_values() -> None:
    pm = PrecisionMap.uniform(_model("transformer"), 4, leftover_bits=8)
    fake, hard = _model("transformer"), _model("transformer")
    keys = list(fake.state_dict())
    names = [n for n, _ in fake.named_parameters()]
    fake_quantize_(fake, pm)
    assert len(find_leftovers(fake)) == len(find_leftovers(hard))  # latent leftovers, found again
    fake(torch.randint(0, 500, (2, 8)))[0].sum().backward()
    assert all(t.grad is not None for t in find_leftovers(fake).values())  # straight-through gradient
    remove_fake_quantize_(fake, bake=True)
    quantize_(hard, pm)
    assert list(fake.state_dict()) == keys and [n for n, _ in fake.named_parameters()] == names
    for key, tensor in hard.state_dict().items():
        assert torch.equal(fake.state_dict()[key], tensor), key


def test_quantize_all_returns_the_leftover_codes_it_wrote() -> None:
    model = _model("lstm")
    quantized = quantize_all_(model, PrecisionMap.uniform(model, 2, leftover_bits=8))
    assert set(quantized.clusters) == set(find_clusters(model))
    assert list(quantized.leftovers) == list(find_leftovers(model))
    for name, result in quantized.leftovers.items():
        live = find_leftovers(model)[name]
        assert torch.equal(live, dequantize_affine(result.codes, result.scale, result.low))
        assert int(result.codes.min()) == 0 and int(result.codes.max()) == 255  # min and max are kept exactly


def test_affine_quantizer_edges() -> None:
    constant = torch.full((5,), -1.25)
    assert torch.equal(quantize_affine(constant, 8).weight, constant)
    w = torch.linspace(-3.0, 1.0, 1000)
    err8 = (quantize_affine(w, 8).weight - w).abs().max()
    assert err8 <= 4.0 / 255 / 2 + 1e-6
    assert (quantize_affine(w, 16).weight - w).abs().max() < err8 / 100
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_affine(torch.tensor([0.0, float("nan")]), 8)
    with pytest.raises(ValueError, match="expected one of"):
        quantize_affine(w, 4)


@pytest.mark.parametrize("method", ["ste", "admm"])
def test_retraining_validates_and_ends_with_quantized_leftovers(method: str, tmp_path: Path) -> None:
    """Retraining with leftover_bits 8: the leftovers train in FP, best.pt holds them on their 8-bit grid,
    and the validated perplexity is the one of the model with quantized leftovers (what the packed file holds)."""
    from nas.config.sections import parse_config
    from nas.core.data import load_corpus
    from nas.retrain.loop import train
    from nas.retrain.run import retrain
    from tests.synthetic import write_synthetic_corpus

    exp = parse_config({"model": {"type": "lstm", "embed_dim": 12, "hidden_dim": 12, "num_layers": 1},
                        "data": {"batch_size": 4, "bptt": 8, "eval_batch_size": 2},
                        "train": {"optimizer": "adam", "lr": 0.02, "schedule": "constant", "epochs": 1, "seed": 1},
                        "retrain": {"method": method, "optimizer": "adam", "lr": 0.005, "schedule": "constant",
                                    "epochs": 1, "project_every": 5, "seed": 2}})
    corpus = load_corpus(write_synthetic_corpus(tmp_path / "corpus"))
    train(exp, corpus, tmp_path / "fp", progress=False)
    fp = torch.load(tmp_path / "fp" / "best.pt", weights_only=True)
    config = dict(fp["config"])
    model = build_model(config.pop("type"), **config)
    precision = PrecisionMap.uniform(model, 2, leftover_bits=8)
    metrics = retrain(exp, corpus, tmp_path / "fp" / "best.pt", precision, tmp_path / "q", progress=False)
    model.load_state_dict(torch.load(tmp_path / "q" / "best.pt", weights_only=True)["model"])
    for name, tensor in find_leftovers(model).items():
        assert torch.equal(quantize_affine(tensor, 8).weight, tensor.detach()), name  # a fixed point: on its grid
    from nas.retrain.loop import _evaluate

    assert metrics["valid_ppl"] == pytest.approx(_evaluate(model, exp, corpus, "valid", torch.device("cpu")), rel=1e-5)


def test_pipeline_stage_hash_includes_leftover_bits_only_when_set() -> None:
    """Changing leftover_bits reruns retrain/export; maps without it keep their old hashes."""
    from nas.pipeline.stages import canonical_hash, precision_hash

    model = _model("lstm")
    plain, eight = PrecisionMap.uniform(model, 2), PrecisionMap.uniform(model, 2, leftover_bits=8)
    assert precision_hash(plain) == canonical_hash({"bits": dict(plain.bits), "granularity": plain.granularity})
    assert precision_hash(eight) != precision_hash(plain)
    assert precision_hash(eight.with_meta({"label": "x"})) == precision_hash(eight)
