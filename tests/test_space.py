"""SearchSpace: YAML resolution, precedence, errors naming file and key, budgets vs model_size."""

from __future__ import annotations

import json
import random

import pytest
import torch
import yaml

from search_spaces.clusters import find_clusters
from search_spaces.models import build_model
from search_spaces.precision import PrecisionMap
from search_spaces.size import model_size
from search_spaces.space import DEFAULT_BITS, Budget, SearchSpace
from search_spaces.space_parsing import SpaceError

SRC = "exp.yaml"
GATES = [f"layers.{k}.{g}_gate.{m}" for k in (0, 1)
         for g in ("input", "forget", "cell", "output") for m in ("ih", "hh")]


@pytest.fixture(scope="module")
def lstm() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("lstm", vocab_size=50, embed_dim=8, hidden_dim=8, num_layers=2)


@pytest.fixture(scope="module")
def tfm() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("transformer", vocab_size=50, d_model=8, num_layers=2, num_heads=2, d_ff=16, context=16)


def space_of(model: torch.nn.Module, space: dict | None = None, budget: dict | None = None) -> SearchSpace:
    return SearchSpace.from_config(space, budget, model, SRC)


def random_maps(space: SearchSpace, n: int, seed: int = 0) -> list[PrecisionMap]:
    rng = random.Random(seed)
    return [PrecisionMap({c: rng.choice(b) for c, b in space.candidates.items()}, space.granularity)
            for _ in range(n)]


DOC_EXAMPLE = """
space:
  bits: [1, 2, 4, 8]
  granularity: matrix
  min_bits: 1
  overrides:
    - {match: "embedding", bits: [2, 4, 8]}
    - {match: "layers.*.forget_gate.*", bits: [4, 8]}
budget: {avg_bits: 2.0}
"""


def test_docstring_example_resolves(lstm) -> None:
    raw = yaml.safe_load(DOC_EXAMPLE)
    space = SearchSpace.from_config(raw["space"], raw["budget"], lstm, SRC)
    assert list(space.candidates) == list(find_clusters(lstm))  # model order
    assert space.candidates["embedding"] == (2, 4, 8)
    assert space.candidates["decoder"] == (1, 2, 4, 8)
    for name in GATES:
        assert space.candidates[name] == ((4, 8) if "forget" in name else (1, 2, 4, 8))
    assert space.sizes["embedding"] == 400 and space.sizes["layers.0.input_gate.ih"] == 64
    assert space.budget == Budget("avg_bits", 2.0)
    assert space.source == SRC and space.granularity == "matrix"


def test_defaults(lstm) -> None:
    space = space_of(lstm)
    assert set(space.candidates.values()) == {DEFAULT_BITS}
    assert space.budget is None and space.granularity == "matrix"
    assert space.searchable == space.free == tuple(find_clusters(lstm))


def test_exact_name_beats_pattern_listed_earlier(lstm) -> None:
    space = space_of(lstm, {"overrides": [{"match": "layers.*", "bits": [8]},
                                          {"match": "layers.0.forget_gate.ih", "bits": [2]}]})
    assert space.candidates["layers.0.forget_gate.ih"] == (2,)
    assert all(space.candidates[n] == (8,) for n in GATES if n != "layers.0.forget_gate.ih")
    assert space.candidates["embedding"] == DEFAULT_BITS


def test_first_matching_pattern_wins(lstm) -> None:
    space = space_of(lstm, {"overrides": [{"match": "layers.0.*", "bits": [4]},
                                          {"match": "layers.*", "bits": [8, 2]}]})
    assert all(space.candidates[n] == ((4,) if n.startswith("layers.0.") else (2, 8)) for n in GATES)


def test_keep_fp_beats_overrides_and_min_bits_floors_everything(tfm) -> None:
    space = space_of(tfm, {"keep_fp": ["pos_embedding", "blocks.1.*"], "min_bits": 2,
                           "overrides": [{"match": "blocks.*", "bits": [1, 2, 4]}]})
    assert space.candidates["pos_embedding"] == (32,)
    assert space.candidates["blocks.1.attn.q"] == (32,)
    assert space.candidates["blocks.0.attn.q"] == (2, 4)  # override, 1 dropped by min_bits
    assert space.candidates["embedding"] == (2, 3, 4, 8)  # default, 1 dropped by min_bits
    assert "pos_embedding" not in space.searchable and "pos_embedding" not in space.to_nni()


def _override(match: str, bits: object = (4,)) -> dict:
    return {"overrides": [{"match": match, "bits": list(bits) if isinstance(bits, tuple) else bits}]}


ERRORS = [  # (space, budget, key, fragment)
    ({"bitz": [1]}, None, "space.bitz", "unknown key"),
    ({"overrides": [{"match": "embedding", "bits": [2], "min": 1}]}, None, "space.overrides[0].min", "unknown key"),
    (None, {"avg_bit": 2}, "budget.avg_bit", "unknown key"),
    ({"overrides": [{"match": "embedding", "bits": [2]}, {"match": "layrs.*", "bits": [4]}]}, None,
     "space.overrides[1].match", "'layrs.*' matches no cluster"),
    (_override("embeding"), None, "space.overrides[0].match", "did you mean embedding"),
    ({"keep_fp": ["pos_embedding"]}, None, "space.keep_fp[0]", "matches no cluster"),
    ({"keep_fp": ["blocks.*"]}, None, "space.keep_fp[0]", "matches no cluster"),
    ({"bits": [1, 7]}, None, "space.bits[1]", "7 is not a bit width the quantizer supports; allowed: [1, 2, 3"),
    (_override("decoder", [0, 2]), None, "space.overrides[0].bits[0]", "allowed"),
    ({"bits": [True, 2]}, None, "space.bits[0]", "True is not a bit width"),
    ({"bits": []}, None, "space.bits", "non-empty list"),
    ({"bits": "1,2"}, None, "space.bits", "non-empty list"),
    ({"min_bits": 4, **_override("layers.*", [1, 2])}, None, "space.min_bits",
     "leaves no candidate for cluster 'layers.0.input_gate.ih' (space.overrides[0].bits = [1, 2])"),
    ({"min_bits": 16}, None, "space.min_bits", "(space.bits = [1, 2, 3, 4, 8])"),
    ({"min_bits": 1.5}, None, "space.min_bits", "expected an int"),
    ({"min_bits": 0}, None, "space.min_bits", "expected an int"),
    ({"granularity": "layer"}, None, "space.granularity", "'layer' is not one of"),
    ("matrix", None, "space", "expected a mapping"),
    ({"keep_fp": "embedding"}, None, "space.keep_fp", "expected a list"),
    ({"keep_fp": [3]}, None, "space.keep_fp[0]", "expected a cluster name"),
    ({"overrides": {"match": "embedding"}}, None, "space.overrides", "expected a list"),
    ({"overrides": [["embedding", [2]]]}, None, "space.overrides[0]", "expected a mapping"),
    ({"overrides": [{"match": "embedding"}]}, None, "space.overrides[0]", "needs both keys match and bits"),
    (_override(3), None, "space.overrides[0].match", "expected a cluster name"),
    ({"overrides": [{"match": "layers.*", "bits": [8]}, {"match": "layers.0.*", "bits": [4]}]}, None,
     "space.overrides[1].match", "never applies"),
    ({"keep_fp": ["layers.*"], **_override("layers.1.*")}, None, "space.overrides[0].match", "never applies"),
    ({"overrides": [{"match": "decoder", "bits": [4]}, {"match": "decoder", "bits": [8]}]}, None,
     "space.overrides[1].match", "already set by space.overrides[0]"),
    ({"keep_fp": ["decoder"], **_override("decoder")}, None, "space.overrides[0].match",
     "already set by space.keep_fp"),
    (None, {}, "budget", "exactly one of avg_bits, size_mb, compression; got none"),
    (None, {"avg_bits": 2, "size_mb": 1}, "budget", "got avg_bits, size_mb"),
    (None, [2.0], "budget", "expected a mapping"),
    (None, {"avg_bits": 0}, "budget.avg_bits", "positive"),
    (None, {"size_mb": -1.0}, "budget.size_mb", "positive"),
    (None, {"compression": float("nan")}, "budget.compression", "positive finite"),
    (None, {"avg_bits": "2"}, "budget.avg_bits", "number"),
    (None, {"avg_bits": True}, "budget.avg_bits", "number"),
    (None, {"avg_bits": 0.5}, "budget.avg_bits", "0.5 bits is infeasible: the smallest reachable map"),
    (None, {"size_mb": 1e-4}, "budget.size_mb", "0.0001 MB is infeasible"),
    (None, {"compression": 100}, "budget.compression", "100x is infeasible"),
]


@pytest.mark.parametrize(("space", "budget", "key", "fragment"), ERRORS,
                         ids=[f"{e[2]}-{i}" for i, e in enumerate(ERRORS)])
def test_errors_name_file_and_key(lstm, space, budget, key, fragment) -> None:
    with pytest.raises(SpaceError) as info:
        space_of(lstm, space, budget)
    assert str(info.value).startswith(f"{SRC}: {key}: "), str(info.value)
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_infeasible_message_gives_both_numbers(lstm) -> None:
    smallest = model_size(lstm, space_of(lstm).smallest_map())
    with pytest.raises(SpaceError, match=r"budget\.size_mb: 0\.0005 MB is infeasible") as info:
        space_of(lstm, None, {"size_mb": 0.0005})
    assert f"{smallest['theoretical_bytes'] / 1e6:.6g} MB" in str(info.value)
    assert f"average {smallest['avg_bits']:.4g} bits" in str(info.value)
    # The smallest reachable size itself is feasible.
    space_of(lstm, None, {"size_mb": smallest["theoretical_bytes"] / 1e6})


def test_budget_direct_construction_validates() -> None:
    assert Budget("size_mb", 2).value == 2.0
    for kind, value in (("bits", 2.0), ("avg_bits", -1.0), ("avg_bits", float("inf"))):
        with pytest.raises(SpaceError, match=f"budget.{kind}"):
            Budget(kind, value)
    assert Budget.from_config(None) is None


SPACES = {  # name -> (model fixture, space section)
    "lstm-matrix": ("lstm", {"overrides": [{"match": "embedding", "bits": [2, 4, 8]}]}),
    "lstm-row-fp-choice": ("lstm", {"granularity": "row", "bits": [1, 3, 8, 32], "keep_fp": ["decoder"]}),
    "tfm-row-keep": ("tfm", {"granularity": "row", "keep_fp": ["pos_embedding"], "bits": [2, 4, 16]}),
    "tfm-matrix": ("tfm", {"bits": [1, 2, 5, 6], "overrides": [{"match": "blocks.*.ffn.*", "bits": [4, 8]}]}),
    "tfm-matrix-fp-choice": ("tfm", {"bits": [2, 4, 32]}),
}


@pytest.mark.parametrize("name", list(SPACES))
def test_theoretical_bytes_equal_model_size(name, request) -> None:
    model_name, section = SPACES[name]
    model = request.getfixturevalue(model_name)
    space = space_of(model, section)
    for pm in [space.smallest_map(), space.largest_map(), *random_maps(space, 20)]:
        size = model_size(model, pm)
        assert space.theoretical_bytes(pm) == size["theoretical_bytes"]
        assert space.fp32_bytes == size["fp32_bytes"]
        avg = (space.weight_bits(pm) + 32 * space.pinned_params) / space.total_params
        assert avg == pytest.approx(size["avg_bits"])
    assert space.size_range(model) == (space.theoretical_bytes(space.smallest_map()),
                                       space.theoretical_bytes(space.largest_map()))
    lo, hi = space.size_range(model)
    assert lo < hi


def _budget_for(kind: str, size: dict) -> dict:
    """A budget exactly at ``size`` (a model_size result) in unit ``kind``."""
    return {"avg_bits": {"avg_bits": size["avg_bits"]},
            "size_mb": {"size_mb": size["theoretical_bytes"] / 1e6},
            "compression": {"compression": size["compression"]}}[kind]


@pytest.mark.parametrize("kind", ["avg_bits", "size_mb", "compression"])
@pytest.mark.parametrize("name", list(SPACES))
def test_budget_conversions_agree_with_model_size(name, kind, request) -> None:
    model_name, section = SPACES[name]
    model = request.getfixturevalue(model_name)
    plain = space_of(model, section)
    maps = random_maps(plain, 30, seed=1)
    sizes = [model_size(model, pm) for pm in maps]
    exact = 32 not in {b for n in plain.searchable for b in plain.candidates[n]}
    for target in maps[:6]:
        tsize = sizes[maps.index(target)]
        space = space_of(model, section, _budget_for(kind, tsize))
        bound = space.budget.max_weight_bits(space)
        if exact or kind == "avg_bits":
            # A budget set at a map's own size admits exactly that map's weight bits (no float slack lost).
            assert bound == space.weight_bits(target)
            assert space.fits_budget(target)
        for pm, size in zip(maps, sizes, strict=True):
            if space.weight_bits(pm) <= bound:  # meeting the bound means meeting the budget
                assert size["theoretical_bytes"] <= tsize["theoretical_bytes"] * (1 + 1e-12) or kind == "avg_bits"
                assert size["avg_bits"] <= tsize["avg_bits"] + 1e-12 or kind != "avg_bits"
            elif exact or kind == "avg_bits":  # and, without 32-bit choices, the bound is not conservative
                assert (size["theoretical_bytes"] > tsize["theoretical_bytes"] if kind != "avg_bits"
                        else size["avg_bits"] > tsize["avg_bits"])


def test_max_bytes_and_units(lstm) -> None:
    space = space_of(lstm, None, {"size_mb": 0.002})
    assert space.budget.max_bytes(space) == 2000.0
    assert space.budget.max_weight_bits(space) == 8 * (2000 - space.fixed_bytes)
    comp = space_of(lstm, None, {"compression": 4.0})
    assert comp.budget.max_bytes(comp) == model_size(lstm, comp.largest_map())["fp32_bytes"] / 4


def test_contains_and_maps(lstm) -> None:
    space = space_of(lstm, {"keep_fp": ["decoder"], "overrides": [{"match": "layers.*.forget_gate.*", "bits": [4, 8]}]})
    for pm in (space.smallest_map(), space.largest_map(), space.uniform_map(2), *random_maps(space, 5)):
        assert space.contains(pm)
        pm.validate(lstm)
    small = space.smallest_map().bits
    assert small["decoder"] == 32 and small["layers.1.forget_gate.hh"] == 4 and small["embedding"] == 1
    assert space.largest_map().bits["embedding"] == 8
    uni = space.uniform_map(2).bits
    assert uni["embedding"] == 2 and uni["layers.0.forget_gate.ih"] == 4 and uni["decoder"] == 32
    assert space.uniform_map(6).bits["embedding"] == 4
    bad = dict(small, embedding=5)  # not a default candidate (3 is)
    assert not space.contains(PrecisionMap(bad))
    assert not space.contains(PrecisionMap({k: v for k, v in small.items() if k != "embedding"}))
    assert not space.contains(PrecisionMap(dict(small), "row"))
    assert not space.contains(PrecisionMap(dict(small, extra=2)))


def test_to_nni_round_trip(tfm) -> None:
    space = space_of(tfm, {"keep_fp": ["pos_embedding"], "overrides": [{"match": "blocks.1.ffn.fc_out", "bits": [8]},
                                                                      {"match": "blocks.*.attn.*", "bits": [2, 4]}]})
    nni = json.loads(json.dumps(space.to_nni()))  # NNI reads it as JSON
    assert "pos_embedding" not in nni and "blocks.1.ffn.fc_out" not in nni  # single-candidate: not searched
    assert nni["blocks.0.attn.q"] == {"_type": "choice", "_value": [2, 4]}
    assert nni["embedding"] == {"_type": "choice", "_value": list(DEFAULT_BITS)}
    rng = random.Random(3)
    for _ in range(10):
        params = {name: rng.choice(spec["_value"]) for name, spec in nni.items()}
        pm = space.from_nni_params(params)
        assert space.contains(pm)
        assert {k: v for k, v in pm.bits.items() if k in nni} == params
        assert pm.bits["blocks.1.ffn.fc_out"] == 8 and pm.bits["pos_embedding"] == 32
        assert space.from_nni_params({k: pm.bits[k] for k in nni}) == pm


def test_from_nni_params_errors(tfm) -> None:
    space = space_of(tfm, {"bits": [2, 4]})
    params = {name: 2 for name in space.to_nni()}
    with pytest.raises(SpaceError, match=r"exp\.yaml: NNI parameters .* unknown \['bogus'\]"):
        space.from_nni_params({**params, "bogus": 2})
    with pytest.raises(SpaceError, match=r"missing \['embedding'\]"):
        space.from_nni_params({k: v for k, v in params.items() if k != "embedding"})
    with pytest.raises(SpaceError, match=r"exp\.yaml: NNI parameter 'blocks.0.attn.q' = 8 is not one of \[2, 4\]"):
        space.from_nni_params({**params, "blocks.0.attn.q": 8})
    with pytest.raises(SpaceError, match="NNI parameters"):
        space.from_nni_params([2, 4])


def test_describe(lstm) -> None:
    space = space_of(lstm, {"keep_fp": ["decoder"]}, {"avg_bits": 12.0})
    text = space.describe(lstm)
    lo, hi = (model_size(lstm, m) for m in (space.smallest_map(), space.largest_map()))
    assert text.startswith("exp.yaml: 18 clusters (17 with a choice, 1 kept at 32 bits), granularity matrix")
    assert "layers.1.output_gate.hh" in text and "decoder" in text and "1 2 3 4 8" in text
    assert f"{lo['theoretical_bytes'] / 1e6:.6f}" in text and f"{hi['theoretical_bytes'] / 1e6:.6f}" in text
    assert f"{lo['compression']:.2f}" in text and f"{hi['avg_bits']:.3f}" in text
    assert "budget: avg_bits 12 -> at most" in text


def test_direct_construction_is_validated() -> None:
    with pytest.raises(SpaceError, match="ascending unique"):
        SearchSpace({"a": (4, 2)}, {"a": 10})
    with pytest.raises(SpaceError, match="same clusters"):
        SearchSpace({"a": (2,)}, {"b": 10})
    with pytest.raises(SpaceError, match="space.granularity"):
        SearchSpace({"a": (2,)}, {"a": 10}, "row")
    space = SearchSpace({"a": (2, 4), "b": (32,)}, {"a": 10, "b": 6}, leftover_params=3)
    assert space.fp32_bytes == 4 * 19 and space.searchable == ("a",)
    assert space.theoretical_bytes(space.largest_map()) == 4 * 10 / 8 + 4 + 4 * 6 + 4 * 3
