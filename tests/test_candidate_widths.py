"""Candidate widths (issue 13, item 6): 3 bits by default, every supported width in a space, and a
``uniform`` search that says which width it used when the budget is not a candidate."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from nas.config.sections import SearchSection
from nas.search.base import SearchData
from nas.search.strategies import get_strategy
from search_spaces.apply import quantize_
from search_spaces.models import build_model
from search_spaces.packed import export_packed, load_packed
from search_spaces.packed_format import read_packed
from search_spaces.precision import PrecisionMap
from search_spaces.space import DEFAULT_BITS, SearchSpace
from search_spaces.space_parsing import SpaceError

ALL_WIDTHS = [1, 2, 3, 4, 5, 6, 8, 16]
NO_DATA = SearchData(train=torch.zeros(0, dtype=torch.long), valid=torch.zeros(0, dtype=torch.long))


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("lstm", vocab_size=50, embed_dim=8, hidden_dim=8, num_layers=1)


def _uniform(space: SearchSpace) -> PrecisionMap:
    return get_strategy("uniform").search(_model(), space, NO_DATA, SearchSection(strategy="uniform"))


def test_default_candidates_include_3_bits() -> None:
    assert DEFAULT_BITS == (1, 2, 3, 4, 8)
    space = SearchSpace.from_config({}, {"avg_bits": 3.0}, _model())
    assert set(space.candidates.values()) == {(1, 2, 3, 4, 8)}
    found = _uniform(space)
    assert set(found.bits.values()) == {3} and found.meta["uniform_bits"] == 3 and "note" not in found.meta


def test_a_space_may_list_every_supported_width() -> None:
    space = SearchSpace.from_config({"bits": ALL_WIDTHS}, None, _model())
    assert set(space.candidates.values()) == {tuple(ALL_WIDTHS)}
    for bad in (7, 0, 12):
        with pytest.raises(SpaceError, match=r"space\.bits\[1\]"):
            SearchSpace.from_config({"bits": [1, bad]}, None, _model())


@pytest.mark.parametrize("bits", [3, 5, 6])
def test_uniform_map_at_3_5_6_bits_packs_and_reloads_exactly(bits: int, tmp_path: Path) -> None:
    """The searched uniform map at an odd width: packed at that many bits per weight, reloaded
    bit for bit equal to the model quantized in memory."""
    space = SearchSpace.from_config({"bits": ALL_WIDTHS}, {"avg_bits": float(bits)}, _model())
    found = _uniform(space)
    assert set(found.bits.values()) == {bits} and found.meta["uniform_bits"] == bits and "note" not in found.meta
    expected = _model()
    quantize_(expected, found)
    path = tmp_path / "model.mpq"
    export_packed(_model(), found, path)
    header, _ = read_packed(path)
    codes = [(p, math.prod(e["shape"][1:])) for e in header["tensors"] for p in e["pieces"] if p["kind"] == "codes"]
    assert codes and {p["bits"] for p, _ in codes} == {bits}
    for piece, row_size in codes:  # bit-packed at exactly `bits` bits a weight
        count = (piece["rows"][1] - piece["rows"][0]) * row_size
        assert piece["nbytes"] == (count * bits + 7) // 8
    loaded, loaded_map = load_packed(path)
    assert dict(loaded_map.bits) == dict(found.bits)
    for key, tensor in expected.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key


def test_uniform_says_which_width_it_used(caplog: pytest.LogCaptureFixture) -> None:
    """Budget 3.0 over candidates 1, 2, 4, 8: the largest candidate width that fits is 2, and the
    map's meta and a warning say so."""
    space = SearchSpace.from_config({"bits": [1, 2, 4, 8]}, {"avg_bits": 3.0}, _model())
    with caplog.at_level("WARNING", logger="nas.search.strategies"):
        found = _uniform(space)
    assert set(found.bits.values()) == {2}
    assert found.meta["uniform_bits"] == 2 and found.meta["budget_avg_bits"] == pytest.approx(3.0)
    note = found.meta["note"]
    assert "avg_bits=3" in note and "3 is not a candidate" in note and "used 2" in note
    assert note in caplog.text
    # A fractional budget: no width matches it.
    found = _uniform(SearchSpace.from_config({"bits": [1, 2, 4, 8]}, {"avg_bits": 2.5}, _model()))
    assert found.meta["uniform_bits"] == 2 and "no uniform width matches" in found.meta["note"]


def test_uniform_note_names_pinned_clusters_and_overrides() -> None:
    model = _model()
    # Pinned clusters count at 32 bits inside avg_bits: the searched weights get less than the budget.
    pinned = SearchSpace.from_config({"bits": [1, 2, 4, 8], "keep_fp": ["layers.0.forget_gate.hh"]},
                                     {"avg_bits": 4.0}, model)
    found = _uniform(pinned)
    searched = sum(pinned.sizes[n] for n in pinned.searchable)
    assert found.meta["budget_avg_bits"] == pytest.approx(pinned.budget.max_weight_bits(pinned) / searched, rel=1e-6)
    assert 2 < found.meta["budget_avg_bits"] < 4 and found.meta["uniform_bits"] == 2
    assert "kept at 32 bits" in found.meta["note"]
    # An override without the width: those clusters take their largest candidate below it.
    space = SearchSpace.from_config({"bits": [1, 2, 4, 8], "overrides": [{"match": "decoder", "bits": [1, 2]}]},
                                    {"avg_bits": 4.0}, model)
    found = _uniform(space)
    assert found.meta["uniform_bits"] == 4 and found.meta["off_width"] == {"decoder": 2}


def test_uniform_without_a_budget_takes_the_widest_width() -> None:
    found = _uniform(SearchSpace.from_config({"bits": [1, 2, 3]}, None, _model()))
    assert set(found.bits.values()) == {3} and found.meta["budget_avg_bits"] is None and "note" not in found.meta
