"""Exporting a Gumbel supernet: the most probable map within the budget, filled to spend the bits the argmax leaves."""

from __future__ import annotations

import math
from collections.abc import Mapping


def _log_probs(probs: Mapping[str, Mapping[int, float]]) -> dict[str, dict[int, float]]:
    return {name: {b: math.log(max(pb, 1e-12)) for b, pb in p.items()} for name, p in probs.items()}


def _weight_bits(bits: Mapping[str, int], sizes: Mapping[str, int]) -> int:
    return sum(bits[name] * sizes[name] for name in bits)


def rewarded_allocation(logp: Mapping[str, Mapping[int, float]], sizes: Mapping[str, int],
                        max_weight_bits: float, mu: float) -> dict[str, int]:
    """The map within the budget maximizing ``sum_c log p_c(b_c) + mu * numel_c * b_c`` (exact knapsack).

    Its size never shrinks as ``mu`` grows: ``mu = 0`` is the most probable map within the
    budget, a large ``mu`` the fullest one.
    """
    from nas.search.allocate import allocate  # the repair paths only

    scores = {n: {b: -(v + mu * sizes[n] * b) for b, v in lp.items()} for n, lp in logp.items()}
    return allocate(scores, sizes, max_weight_bits)


def fill_reward(logp: Mapping[str, Mapping[int, float]], sizes: Mapping[str, int], max_weight_bits: float,
                target_bits: float) -> float:
    """Smallest bits reward ``mu`` whose ``rewarded_allocation`` uses at least ``target_bits`` (bisection).

    ``target_bits`` must be reachable within the budget (at most the fullest map's size).
    """
    low, high = 0.0, _fullest_reward(logp)
    for _ in range(64):
        mid = 0.5 * (low + high)
        if _weight_bits(rewarded_allocation(logp, sizes, max_weight_bits, mid), sizes) >= target_bits:
            high = mid
        else:
            low = mid
    return high


def budgeted_argmax(probs: Mapping[str, Mapping[int, float]], sizes: Mapping[str, int],
                    max_weight_bits: float | None, *, fill: bool = True, fill_to: float = 0.99
                    ) -> tuple[dict[str, int], str]:
    """The exported map: argmax of ``probs`` per cluster, repaired to spend the budget.

    Returns ``(bits, repair)``, ``repair`` one of ``"none"`` (the argmax uses between
    ``fill_to`` and 100% of the budget, or no budget is given), ``"shrink"`` (the argmax was over
    the budget; the most probable map within it is taken, and it uses at least ``fill_to``) or
    ``"fill"`` (a bits reward was needed to reach ``fill_to`` of the budget, or the fullest
    reachable map when clusters are too coarse for that). Never exceeds ``max_weight_bits``.
    See the module docstring for the method.
    """
    logp = _log_probs(probs)
    chosen = {name: max(p, key=lambda b: (p[b], -b)) for name, p in probs.items()}
    if max_weight_bits is None:
        return chosen, "none"
    over = _weight_bits(chosen, sizes) > max_weight_bits
    if over:
        chosen = rewarded_allocation(logp, sizes, max_weight_bits, 0.0)
    if not fill or _weight_bits(chosen, sizes) >= fill_to * max_weight_bits:
        return chosen, "shrink" if over else "none"
    fullest = _weight_bits(rewarded_allocation(logp, sizes, max_weight_bits, _fullest_reward(logp)), sizes)
    target = min(fill_to * max_weight_bits, fullest)
    if target <= _weight_bits(chosen, sizes):
        return chosen, "shrink" if over else "none"
    mu = fill_reward(logp, sizes, max_weight_bits, target)
    return rewarded_allocation(logp, sizes, max_weight_bits, mu), "fill"


def _fullest_reward(logp: Mapping[str, Mapping[int, float]]) -> float:
    """A bits reward at which the fullest map within any budget wins: one weight bit more
    (sizes are integers) outweighs the largest log-probability difference between two maps."""
    return 2.0 * sum(max(lp.values()) - min(lp.values()) for lp in logp.values()) + 1.0
