"""Exact budgeted bit allocation: a multiple-choice knapsack over weight clusters.

Given a score table ``S[c][b]`` (lower is better: KL or Hessian sensitivity of cluster ``c`` at
``b`` bits) and cluster sizes ``n_c``, pick one bit width per cluster minimizing ``sum S[c][b_c]``
subject to ``sum b_c * n_c <= max_weight_bits``.

Method: dynamic programming over the clusters that keeps only the Pareto front of partial
solutions, i.e. the ``(cost, score)`` pairs that no other partial solution beats in both. A
dominated prefix can never complete to a better answer than its dominator with the same suffix,
so the front after the last cluster holds the optimum for *every* budget: the answer for budget
``B`` is the front point of largest cost ``<= B``. This is exact (no cost discretization, unlike
a DP over a size grid) and, because real fronts stay small, fast for tens of clusters with a few
candidates each. The front is kept in numpy arrays with back-pointers so that no per-state
tuples are copied.

Ties are broken deterministically: lowest total score, then lowest cost, then the
lexicographically smallest tuple of bit widths in the order of ``scores``' keys. Totals are
floating-point sums taken in cluster order, and ties are judged on those sums.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from nas.core.errors import MpnasError

__all__ = ["allocate", "pareto_front", "pareto_sweep"]


@dataclass(frozen=True)
class _Problem:
    """Validated inputs: per cluster, sorted candidate bits, their scores, and the cluster size."""

    names: tuple[str, ...]
    bits: tuple[np.ndarray, ...]  # int64, ascending
    scores: tuple[np.ndarray, ...]  # float64, aligned with bits
    sizes: tuple[int, ...]

    def min_cost(self) -> int:
        """Cost with every cluster at its fewest bits: nothing cheaper exists."""
        return sum(int(b[0]) * n for b, n in zip(self.bits, self.sizes, strict=True))


@dataclass(frozen=True)
class _Front:
    """Pareto front after the last cluster plus the back-pointers to rebuild its allocations."""

    cost: np.ndarray  # int64, strictly increasing
    score: np.ndarray  # float64, strictly decreasing
    parents: tuple[np.ndarray, ...]  # per cluster: index of each state's prefix in the previous front
    choices: tuple[np.ndarray, ...]  # per cluster: index into that cluster's candidate bits


def _check(scores: Mapping[str, Mapping[int, float]], sizes: Mapping[str, int]) -> _Problem:
    """Validate and normalize the inputs; ValueError names the offending cluster."""
    if not isinstance(scores, Mapping) or not isinstance(sizes, Mapping):
        raise ValueError("scores and sizes must be mappings keyed by cluster name")
    names, bits, vals, ns = [], [], [], []
    for name, table in scores.items():
        if not isinstance(table, Mapping) or not table:
            raise ValueError(f"scores[{name!r}] must be a non-empty mapping of bit width to score")
        if name not in sizes:
            raise ValueError(f"cluster {name!r} has scores but no entry in sizes")
        n = sizes[name]
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"sizes[{name!r}] must be a non-negative int, got {n!r}")
        for b, s in table.items():
            if isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 1:
                raise ValueError(f"scores[{name!r}]: bit width {b!r} must be a positive int")
            if isinstance(s, bool) or not isinstance(s, numbers.Real) or not math.isfinite(s):
                raise ValueError(f"scores[{name!r}][{b}] must be a finite number, got {s!r}")
        order = sorted(table)
        names.append(name)
        bits.append(np.array([int(b) for b in order], dtype=np.int64))
        vals.append(np.array([float(table[b]) for b in order], dtype=np.float64))
        ns.append(int(n))
    return _Problem(tuple(names), tuple(bits), tuple(vals), tuple(ns))


def _build_front(problem: _Problem, cap: float) -> _Front:
    """Pareto DP over the clusters, dropping partial solutions that cannot fit under ``cap``."""
    # What the remaining clusters cost at the very least: a prefix over cap minus that is hopeless.
    tail = [0] * (len(problem.names) + 1)
    for i in range(len(problem.names) - 1, -1, -1):
        tail[i] = tail[i + 1] + int(problem.bits[i][0]) * problem.sizes[i]
    cost = np.zeros(1, dtype=np.int64)
    score = np.zeros(1, dtype=np.float64)
    rank = np.zeros(1, dtype=np.int64)  # lexicographic rank of each state's prefix within the front
    parents: list[np.ndarray] = []
    choices: list[np.ndarray] = []
    for i, (bits, vals, n) in enumerate(zip(problem.bits, problem.scores, problem.sizes, strict=True)):
        m = len(bits)
        # Every state x every candidate, flattened state-major.
        new_cost = (cost[:, None] + bits[None, :] * n).ravel()
        new_score = (score[:, None] + vals[None, :]).ravel()
        # Prefix + b sorts lexicographically by (prefix rank, b); candidates are in ascending bits.
        new_lex = (rank[:, None] * m + np.arange(m, dtype=np.int64)[None, :]).ravel()
        parent = np.repeat(np.arange(len(cost), dtype=np.int64), m)
        choice = np.tile(np.arange(m, dtype=np.int64), len(cost))
        fits = new_cost + tail[i + 1] <= cap
        new_cost, new_score, new_lex = new_cost[fits], new_score[fits], new_lex[fits]
        parent, choice = parent[fits], choice[fits]
        # Sort by cost, then score, then lex; a state survives only if it scores strictly better
        # than everything cheaper or equally cheap before it (that is the Pareto filter, and it
        # keeps the lexicographically smallest of exact (cost, score) duplicates).
        order = np.lexsort((new_lex, new_score, new_cost))
        s_sorted = new_score[order]
        best_before = np.minimum.accumulate(np.concatenate(([np.inf], s_sorted[:-1])))
        keep = s_sorted < best_before
        if len(keep):
            keep[0] = True
        order = order[keep]
        cost, score, lex = new_cost[order], new_score[order], new_lex[order]
        parents.append(parent[order])
        choices.append(choice[order])
        # Re-rank prefixes densely so the lex keys stay small (rank * m never overflows).
        rank = np.empty(len(lex), dtype=np.int64)
        rank[np.argsort(lex, kind="stable")] = np.arange(len(lex), dtype=np.int64)
    return _Front(cost, score, tuple(parents), tuple(choices))


def _allocation(problem: _Problem, front: _Front, index: int) -> dict[str, int]:
    """Follow the back-pointers from final state ``index`` to the bit width of every cluster."""
    picks = [0] * len(problem.names)
    for i in range(len(problem.names) - 1, -1, -1):
        picks[i] = int(problem.bits[i][front.choices[i][index]])
        index = int(front.parents[i][index])
    return dict(zip(problem.names, picks, strict=True))


def _check_budget(budget: float, problem: _Problem) -> None:
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or math.isnan(budget):
        raise ValueError(f"budget must be a number of weight bits, got {budget!r}")
    minimum = problem.min_cost()
    if budget < minimum:
        raise MpnasError(f"budget of {budget:g} weight bits is infeasible: the minimum reachable cost is "
                         f"{minimum} (every cluster at its fewest bits)")


def _best_index(front: _Front, budget: float) -> int:
    # Costs ascend and scores descend along the front, so the last affordable point is the best.
    return int(np.searchsorted(front.cost, budget, side="right")) - 1


def allocate(scores: Mapping[str, Mapping[int, float]], sizes: Mapping[str, int],
             max_weight_bits: float) -> dict[str, int]:
    """Bit width per cluster minimizing the total score with ``sum(bits * sizes) <= max_weight_bits``.

    Args:
        scores: ``{cluster: {bits: score}}``; the keys of each inner mapping are that cluster's
            candidates. The result follows this mapping's order.
        sizes: ``{cluster: numel}``; entries for clusters without scores are ignored, so a
            ``SearchSpace.sizes`` can be passed as is.
        max_weight_bits: the budget, e.g. ``SearchSpace.budget.max_weight_bits(space)``.

    Exact (see the module docstring); ties go to lower cost, then the lexicographically smallest
    bits tuple. Raises ValueError on malformed input or when even the cheapest choice exceeds
    the budget (the message names the minimum reachable cost).
    """
    problem = _check(scores, sizes)
    _check_budget(max_weight_bits, problem)
    front = _build_front(problem, max_weight_bits)
    return _allocation(problem, front, _best_index(front, max_weight_bits))


def pareto_front(scores: Mapping[str, Mapping[int, float]],
                 sizes: Mapping[str, int]) -> list[tuple[int, float, dict[str, int]]]:
    """Every Pareto-optimal ``(cost, total score, allocation)``, by increasing cost.

    Scores strictly decrease along the list; each allocation is what :func:`allocate` returns
    for any budget from its cost up to (not including) the next point's cost.
    """
    problem = _check(scores, sizes)
    front = _build_front(problem, math.inf)
    return [(int(front.cost[i]), float(front.score[i]), _allocation(problem, front, i)) for i in range(len(front.cost))]


def pareto_sweep(scores: Mapping[str, Mapping[int, float]], sizes: Mapping[str, int],
                 budgets: Sequence[float]) -> list[tuple[float, dict[str, int], float]]:
    """``(budget, allocation, total score)`` for each budget, in the given order, from one DP.

    Each row equals ``allocate(scores, sizes, budget)``; the front is computed once (up to the
    largest budget). Raises ValueError if any budget is infeasible.
    """
    problem = _check(scores, sizes)
    budgets = list(budgets)
    for budget in budgets:
        _check_budget(budget, problem)
    if not budgets:
        return []
    front = _build_front(problem, max(budgets))
    rows = []
    for budget in budgets:
        index = _best_index(front, budget)
        rows.append((budget, _allocation(problem, front, index), float(front.score[index])))
    return rows
