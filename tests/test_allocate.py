"""Exact budgeted allocation: brute force agreement, Pareto sweeps, errors, speed, a real space."""

from __future__ import annotations

import itertools
import math
import random
import time

import pytest
import torch

from nas.search.allocate import allocate, pareto_front, pareto_sweep
from search_spaces.models import build_model
from search_spaces.precision import PrecisionMap
from search_spaces.size import model_size
from search_spaces.space import SearchSpace

BITS = (1, 2, 3, 4, 5, 6, 8, 16)


def random_instance(rng: random.Random, integer_scores: bool) -> tuple[dict, dict]:
    names = [f"c{i}" for i in range(rng.randint(2, 6))]
    scores = {}
    for n in names:
        cands = rng.sample(BITS, rng.randint(2, 4))
        # Small integer scores make exact ties common (and their float sums exact).
        scores[n] = {b: float(rng.randint(0, 4)) if integer_scores else rng.random() for b in cands}
    # Tiny sizes make equal costs (and so full ties) common; larger ones exercise the front.
    top = rng.choice((2, 4, 40))
    sizes = {n: rng.randint(0, top) for n in names}
    return scores, sizes


def cost_of(alloc: dict, sizes: dict) -> int:
    return sum(b * sizes[n] for n, b in alloc.items())


def ranked(scores: dict, sizes: dict) -> list[tuple[float, int, tuple[int, ...]]]:
    """Every allocation, best first by the documented rule: min score, min cost, lexicographic bits."""
    names = list(scores)
    rows = []
    for combo in itertools.product(*(sorted(scores[n]) for n in names)):
        score = 0.0
        for n, b in zip(names, combo, strict=True):  # the same summation order as the DP
            score += scores[n][b]
        rows.append((score, sum(b * sizes[n] for n, b in zip(names, combo, strict=True)), combo))
    return sorted(rows)


def brute_force(scores: dict, sizes: dict, budget: float, table: list | None = None) -> dict | None:
    """The best affordable allocation by enumeration (``table`` from :func:`ranked`, to reuse)."""
    for _, cost, combo in table if table is not None else ranked(scores, sizes):
        if cost <= budget:
            return dict(zip(scores, combo, strict=True))
    return None


@pytest.mark.parametrize("integer_scores", [True, False])
def test_equals_brute_force_on_random_instances(integer_scores: bool) -> None:
    rng = random.Random(1234 + integer_scores)
    for _ in range(200):
        scores, sizes = random_instance(rng, integer_scores)
        lo = sum(min(t) * sizes[n] for n, t in scores.items())
        hi = sum(max(t) * sizes[n] for n, t in scores.items())
        table = ranked(scores, sizes)
        for budget in (lo, hi, rng.uniform(lo, hi), rng.randint(lo, hi) + 0.5, hi * 2):
            expected = brute_force(scores, sizes, budget, table)
            got = allocate(scores, sizes, budget)
            assert got == expected, (scores, sizes, budget)
            assert cost_of(got, sizes) <= budget
            assert list(got) == list(scores)  # result follows the scores' order


def test_pareto_front_is_strict_and_optimal() -> None:
    rng = random.Random(7)
    for _ in range(50):
        scores, sizes = random_instance(rng, integer_scores=True)
        front = pareto_front(scores, sizes)
        costs = [c for c, _, _ in front]
        totals = [s for _, s, _ in front]
        assert costs == sorted(set(costs)) and all(a > b for a, b in itertools.pairwise(totals))
        table = ranked(scores, sizes)
        for cost, total, alloc in front:
            assert cost_of(alloc, sizes) == cost
            assert alloc == brute_force(scores, sizes, cost, table)
            assert sum(scores[n][b] for n, b in alloc.items()) == pytest.approx(total)


def test_sweep_is_monotone_and_matches_allocate() -> None:
    rng = random.Random(11)
    names = [f"c{i}" for i in range(12)]
    sizes = {n: rng.randint(10, 500) for n in names}
    # Sensitivity-like scores: error shrinks about 4x per extra bit.
    scores = {n: {b: sizes[n] * rng.uniform(0.5, 2.0) * 4.0 ** -b for b in (1, 2, 4, 8)} for n in names}
    total = sum(sizes.values())
    budgets = [total * avg for avg in (1.0, 1.5, 2.0, 3.0, 4.5, 8.0)]
    rows = pareto_sweep(scores, sizes, budgets)
    assert [r[0] for r in rows] == budgets
    for budget, alloc, score in rows:
        assert alloc == allocate(scores, sizes, budget)
        assert cost_of(alloc, sizes) <= budget
        assert score == pytest.approx(sum(scores[n][b] for n, b in alloc.items()))
    assert all(a[2] >= b[2] for a, b in itertools.pairwise(rows))
    assert rows[0][1] == dict.fromkeys(names, 1) and rows[-1][1] == dict.fromkeys(names, 8)
    # Unsorted budgets come back in the given order.
    assert [r[0] for r in pareto_sweep(scores, sizes, budgets[::-1])] == budgets[::-1]
    assert pareto_sweep(scores, sizes, []) == []


def test_tie_breaking() -> None:
    sizes = {"a": 1, "b": 1}
    # All scores equal: the cheapest allocation wins.
    assert allocate({"a": {1: 0.0, 2: 0.0}, "b": {1: 0.0, 2: 0.0}}, sizes, 4) == {"a": 1, "b": 1}
    # Equal score and cost: the lexicographically smallest bits tuple (in the scores' order).
    tied = {"a": {1: 1.0, 2: 0.0}, "b": {1: 1.0, 2: 0.0}}
    assert allocate(tied, sizes, 3) == {"a": 1, "b": 2}
    assert allocate({"b": tied["b"], "a": tied["a"]}, sizes, 3) == {"b": 1, "a": 2}
    # A tie whose prefixes sort one way by cost and the other way lexicographically:
    # (1, 2, 1) and (2, 1, 2) both cost 6 and score 2; prefix (1, 2) costs more than (2, 1).
    three = {"a": {1: 1.0, 2: 0.0}, "b": {1: 2.0, 2: 0.0}, "c": {1: 1.0, 2: 0.0}}
    assert allocate(three, {"a": 1, "b": 2, "c": 1}, 6) == {"a": 1, "b": 2, "c": 1}


def test_infeasible_and_invalid_inputs() -> None:
    scores = {"a": {2: 1.0, 4: 0.5}, "b": {1: 3.0, 8: 0.0}}
    sizes = {"a": 10, "b": 5}
    with pytest.raises(ValueError, match=r"budget of 24 weight bits is infeasible: the minimum reachable cost is 25"):
        allocate(scores, sizes, 24)
    assert allocate(scores, sizes, 25) == {"a": 2, "b": 1}
    with pytest.raises(ValueError, match="minimum reachable cost is 25"):
        pareto_sweep(scores, sizes, [100, 10])
    bad = [
        (({"a": {2: 1.0}}, {}, 100), "no entry in sizes"),
        (({"a": {}}, {"a": 1}, 100), "non-empty mapping"),
        (({"a": {True: 1.0}}, {"a": 1}, 100), "positive int"),
        (({"a": {0: 1.0}}, {"a": 1}, 100), "positive int"),
        (({"a": {2: math.nan}}, {"a": 1}, 100), "finite number"),
        (({"a": {2: math.inf}}, {"a": 1}, 100), "finite number"),
        (({"a": {2: 1.0}}, {"a": -1}, 100), "non-negative int"),
        (({"a": {2: 1.0}}, {"a": 1.5}, 100), "non-negative int"),
        (({"a": {2: 1.0}}, {"a": 1}, math.nan), "budget must be a number"),
    ]
    for args, fragment in bad:
        with pytest.raises(ValueError, match=fragment):
            allocate(*args)
    assert allocate({}, {}, 0) == {}
    assert allocate({"a": {2: 1.0, 4: 0.0}}, {"a": 3, "unused": 9}, math.inf) == {"a": 4}


def dp_over_costs(scores: dict, sizes: dict, budget: int) -> float:
    """Textbook DP over every integer cost (exact for small integer costs): best total score."""
    best = {0: 0.0}
    for n, table in scores.items():
        nxt: dict[int, float] = {}
        for cost, score in best.items():
            for b, s in table.items():
                c = cost + b * sizes[n]
                if c <= budget and score + s < nxt.get(c, math.inf):
                    nxt[c] = score + s
        best = nxt
    return min(best.values())


def test_sixty_clusters_fast_and_optimal() -> None:
    rng = random.Random(5)
    names = [f"layer{i}" for i in range(60)]
    sizes = {n: rng.randint(1, 30) for n in names}
    scores = {n: {b: sizes[n] * rng.uniform(0.1, 3.0) * 2.0 ** -b + rng.random() for b in (1, 2, 4, 8)}
              for n in names}
    budget = 2 * sum(sizes.values())
    start = time.perf_counter()
    alloc = allocate(scores, sizes, budget)
    rows = pareto_sweep(scores, sizes, [budget * f for f in (0.6, 1.0, 1.5, 2.0)])
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, elapsed
    total = sum(scores[n][b] for n, b in alloc.items())
    assert total == pytest.approx(dp_over_costs(scores, sizes, budget), rel=1e-12)
    assert rows[1][1] == alloc and cost_of(alloc, sizes) <= budget


def test_allocate_on_a_real_space_meets_the_size_budget() -> None:
    torch.manual_seed(0)
    model = build_model("lstm", vocab_size=50, embed_dim=8, hidden_dim=8, num_layers=2)
    section = {"keep_fp": ["decoder"], "overrides": [{"match": "embedding", "bits": [2, 4, 8]}]}
    lo, hi = SearchSpace.from_config(section, None, model).size_range(model)
    limit = (lo + hi) / 2
    space = SearchSpace.from_config(section, {"size_mb": limit / 1e6}, model, "exp.yaml")
    # Toy sensitivity: quantization noise ~ numel * 4^-bits, embedding 10x as sensitive.
    scores = {n: {b: space.sizes[n] * 4.0 ** -b * (10 if n == "embedding" else 1) for b in space.candidates[n]}
              for n in space.searchable}
    alloc = allocate(scores, space.sizes, space.budget.max_weight_bits(space))
    pm = PrecisionMap({**space.smallest_map().bits, **alloc}, space.granularity)
    assert space.contains(pm) and space.fits_budget(pm)
    assert model_size(model, pm)["theoretical_bytes"] <= limit
    # Optimal, not just feasible: no other map of the space within the budget scores lower.
    best = dp_over_costs(scores, space.sizes, int(space.budget.max_weight_bits(space)))
    assert sum(scores[n][b] for n, b in alloc.items()) == pytest.approx(best, rel=1e-12)
    assert pm.bits["decoder"] == 32 and pm.bits["embedding"] >= 4
