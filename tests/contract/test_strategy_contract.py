"""The contract every search strategy passes on every kind of LM (issue 14, item 5).

Parametrised over every strategy of ``nas.api.STRATEGY_CONFIGS`` (a new one joins by being
registered there) and the four tiny LMs of ``tests/lms.py``, through the library verb
``nas.api.search`` on a token stream:

(a) the map names exactly the model's clusters, each at a width the space allows it (``bits``,
    ``overrides``, ``keep_fp``, ``min_bits``), with the space's granularity and leftover width,
    and meets the budget as ``search_spaces.size.model_size`` measures it;
(b) the same seed gives the same map (and the same evidence in ``meta``), whatever the global RNGs hold;
(c) the model's state dict is bit-identical after a search, and so are its modules, parameters,
    gradients and every module's train/eval flag, from train mode and from eval mode; the map does
    not depend on the mode the model came in;
(d) the map round-trips its dict, YAML and JSON forms and its files exactly.

Each space below is written out per LM, and the widths it allows are derived here from the
documented resolution rules (``search_spaces/space.py``), not from ``SearchSpace``; the budget is
halfway between the smallest and the largest map the space allows, in the budget's own unit.
"""

from __future__ import annotations

from collections.abc import Mapping
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from nas.api import STRATEGY_CONFIGS, PrecisionMap, StrategyConfig, make_space, search
from search_spaces.clusters import find_clusters
from search_spaces.size import model_size
from tests.contract.common import ambient_rng, assert_same_state, snapshot
from tests.lms import LM_KINDS

STRATEGIES = sorted(STRATEGY_CONFIGS)
# Small settings so that each search takes a fraction of a second; unlisted strategies run at their defaults.
FAST: dict[str, dict[str, Any]] = {
    "kl": {"kl_tokens": 200},
    "hessian": {"hessian_batches": 1, "hessian_max_iters": 30, "hessian_tol": 0.2},
    "gumbel": {"epochs": 1.0},
}
# Per LM: the space section, and the kind of budget. Between them every space key and budget kind is used.
SPACES: dict[str, tuple[dict[str, Any], str]] = {
    "mpnas_lstm": ({"bits": [1, 2, 4, 8], "keep_fp": ["embedding"],
                    "overrides": [{"match": "decoder", "bits": [2, 3, 4]},
                                  {"match": "*.forget_gate.*", "bits": [4, 8]}]}, "avg_bits"),
    "mpnas_transformer": ({"bits": [1, 2, 4, 8], "granularity": "row", "leftover_bits": 8,
                           "keep_fp": ["pos_embedding"],
                           "overrides": [{"match": "embedding", "bits": [2, 3, 4]},
                                         {"match": "blocks.*.attn.*", "bits": [4, 8]}]}, "size_mb"),
    "plain_lstm": ({"bits": [1, 2, 3, 8], "granularity": "row", "leftover_bits": 16, "min_bits": 2,
                    "keep_fp": ["embedding"],
                    "overrides": [{"match": "decoder", "bits": [1, 4, 8]},
                                  {"match": "lstm.weight_hh_l0.*", "bits": [3, 4]}]}, "compression"),
    "plain_transformer": ({"bits": [1, 2, 4, 8], "leftover_bits": 8, "keep_fp": ["positions"],
                           "overrides": [{"match": "decoder", "bits": [2, 3, 4]},
                                         {"match": "*.self_attn.*", "bits": [4, 8]}]}, "avg_bits"),
}
TIMINGS = ("wall_s", "score_seconds")  # the only meta that may differ between two runs


def strategy(name: str, seed: int = 0) -> StrategyConfig:
    return STRATEGY_CONFIGS[name](seed=seed, **FAST.get(name, {}))


def allowed_bits(spec: Mapping[str, Any], cluster: str) -> set[int]:
    """The widths ``spec`` allows ``cluster``: keep_fp, else the first matching override, else bits; >= min_bits."""
    if any(fnmatchcase(cluster, pattern) for pattern in spec.get("keep_fp", ())):
        return {32}
    bits = next((o["bits"] for o in spec.get("overrides", ()) if fnmatchcase(cluster, o["match"])), spec["bits"])
    return {b for b in bits if b >= spec.get("min_bits", 1)}


def extreme_map(model: nn.Module, spec: Mapping[str, Any], pick: Any) -> PrecisionMap:
    bits = {name: pick(allowed_bits(spec, name)) for name in find_clusters(model)}
    return PrecisionMap(bits, spec.get("granularity", "matrix"), leftover_bits=spec.get("leftover_bits", 32))


def budget_of(kind: str, model: nn.Module) -> dict[str, float]:
    """Halfway between the space's smallest and largest maps, as ``{budget kind: value}``."""
    spec, unit = SPACES[kind]
    lo, hi = (model_size(model, extreme_map(model, spec, pick)) for pick in (min, max))
    if unit == "avg_bits":
        return {unit: (lo["avg_bits"] + hi["avg_bits"]) / 2}
    middle = (lo["theoretical_bytes"] + hi["theoretical_bytes"]) / 2
    return {unit: middle / 1e6} if unit == "size_mb" else {unit: lo["fp32_bytes"] / middle}


def within(sizes: Mapping[str, float], budget: Mapping[str, float]) -> bool:
    (unit, value), = budget.items()
    slack = 1e-9 * value
    if unit == "avg_bits":
        return sizes["avg_bits"] <= value + slack
    if unit == "size_mb":
        return sizes["theoretical_bytes"] <= value * 1e6 * (1 + 1e-9)
    return sizes["compression"] >= value - slack


def decisions(precision: PrecisionMap) -> tuple[dict[str, int], str, int]:
    return dict(precision.bits), precision.granularity, precision.leftover_bits


def evidence(precision: PrecisionMap) -> dict[str, Any]:
    return {k: v for k, v in precision.meta.items() if k not in TIMINGS}


def run(name: str, kind: str, model: nn.Module, tokens: torch.Tensor, seed: int = 0) -> PrecisionMap:
    return search(model, SPACES[kind][0], strategy(name, seed), tokens, budget=budget_of(kind, model))


def test_every_lm_kind_has_a_space() -> None:
    assert set(SPACES) == set(LM_KINDS)
    assert set(FAST) <= set(STRATEGY_CONFIGS)


@pytest.mark.parametrize("kind", LM_KINDS)
@pytest.mark.parametrize("name", STRATEGIES)
def test_map_lies_in_the_space_and_meets_the_budget(name: str, kind: str, lm_copy: Any,
                                                    lm_tokens: torch.Tensor) -> None:
    model = lm_copy(kind)
    spec, budget = SPACES[kind][0], budget_of(kind, model)
    precision = run(name, kind, model, lm_tokens)

    assert set(precision.bits) == set(find_clusters(model))
    outside = {n: b for n, b in precision.bits.items() if b not in allowed_bits(spec, n)}
    assert not outside, f"widths the space does not allow: {outside}"
    assert precision.granularity == spec.get("granularity", "matrix")
    assert precision.leftover_bits == spec.get("leftover_bits", 32)
    sizes = model_size(model, precision)
    assert within(sizes, budget), (budget, sizes)
    assert precision.meta["strategy"] == name and precision.meta["budget"] == budget
    space = make_space(model, spec, budget)  # the library's own view agrees
    assert space.contains(precision) and space.fits_budget(precision)


@pytest.mark.parametrize("kind", LM_KINDS)
@pytest.mark.parametrize("name", STRATEGIES)
def test_same_seed_gives_the_same_map(name: str, kind: str, lm_copy: Any, lm_tokens: torch.Tensor) -> None:
    """Twice on the same model, the global RNGs seeded differently each time: only timings may differ."""
    model = lm_copy(kind)
    maps = []
    for ambient in (1, 2):
        with ambient_rng(ambient):
            maps.append(run(name, kind, model, lm_tokens, seed=3))
    assert decisions(maps[0]) == decisions(maps[1])
    assert evidence(maps[0]) == evidence(maps[1])
    assert maps[0].meta["seed"] == 3


@pytest.mark.parametrize("training", [True, False], ids=["train_mode", "eval_mode"])
@pytest.mark.parametrize("kind", LM_KINDS)
@pytest.mark.parametrize("name", STRATEGIES)
def test_search_leaves_the_model_as_it_was(name: str, kind: str, training: bool, lm_copy: Any,
                                           lm_tokens: torch.Tensor) -> None:
    model = lm_copy(kind)
    model.train(training)
    for i, p in enumerate(model.parameters()):  # gradients of the user's own, which a search must not touch
        p.grad = torch.full_like(p, 0.5 + i)
    state, modes = snapshot(model)
    modules = [(n, type(m)) for n, m in model.named_modules()]
    params = [(n, p, p.requires_grad, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()]

    precision = run(name, kind, model, lm_tokens)

    assert_same_state(state, model.state_dict(), f"{name} on {kind}")
    assert [m.training for m in model.modules()] == modes, "a module's train/eval mode changed"
    assert [(n, type(m)) for n, m in model.named_modules()] == modules, "modules added, removed or replaced"
    assert not any(parametrize.is_parametrized(m) for m in model.modules()), "a parametrization was left behind"
    after = list(model.named_parameters())
    assert [n for n, *_ in params] == [n for n, _ in after]
    for (n, p, requires_grad, grad), (_, q) in zip(params, after, strict=True):
        assert q is p and q.requires_grad == requires_grad, f"parameter {n} was replaced or its requires_grad changed"
        assert (grad is None and q.grad is None) or (grad is not None and q.grad is not None
                                                     and torch.equal(grad, q.grad)), f"{n}.grad changed"
    other = lm_copy(kind).train(not training)  # the mode the model comes in does not change the map
    assert decisions(run(name, kind, other, lm_tokens)) == decisions(precision)


@pytest.mark.parametrize("kind", LM_KINDS)
@pytest.mark.parametrize("name", STRATEGIES)
def test_map_round_trips_its_files(name: str, kind: str, lm_copy: Any, lm_tokens: torch.Tensor,
                                   tmp_path: Path) -> None:
    precision = run(name, kind, lm_copy(kind), lm_tokens)
    assert PrecisionMap.from_dict(precision.to_dict()) == precision
    assert PrecisionMap.from_yaml(precision.to_yaml()) == precision
    assert PrecisionMap.from_json(precision.to_json()) == precision
    for suffix in ("yaml", "json"):
        precision.save(tmp_path / f"map.{suffix}")
        again = PrecisionMap.load(tmp_path / f"map.{suffix}")
        assert again == precision and hash(again) == hash(precision)
        assert list(again.bits) == list(precision.bits)  # in the same (model) order
