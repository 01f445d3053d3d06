"""Search strategies: each turns (model, space, budget, data) into a :class:`PrecisionMap`.

One small protocol, ``search(model, space, data, settings) -> PrecisionMap``; the map's
``meta`` carries the evidence (scores or probabilities, seed, wall time). The strategies are
plain instances in the :data:`STRATEGIES` dict (no import-time registry).

- ``uniform``: the largest uniform width (among every cluster's candidates) that fits; when the
  budget's average bits is not that width (e.g. 3.0 over candidates 1, 2, 4, 8) the map's meta
  says so (``uniform_bits``, ``budget_avg_bits``, ``note``) and a warning is logged.
- ``random``: seeded random maps; the one using most of the budget among those that fit.
- ``kl`` / ``hessian``: a score table ``S[c, b]`` (cached on disk, reused across budgets),
  then the exact knapsack allocation of :func:`nas.search.allocate.allocate`.
- ``gumbel``: the differentiable supernet of :mod:`nas.search.gumbel`.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from torch import nn

from nas.config.sections import SearchSection
from nas.core.errors import MpnasError
from nas.search.base import WIDTH_SLACK, SearchData, Strategy, budget_cap, finish_map
from nas.search.gumbel import GumbelSettings, gumbel_search
from nas.search.table_strategies import HessianStrategy, KLStrategy, ScoreTableStrategy
from search_spaces.models.protocol import as_lm
from search_spaces.precision import PrecisionMap
from search_spaces.space import SearchSpace

logger = logging.getLogger(__name__)


class UniformStrategy:
    """Every searchable cluster at the same width: the largest candidate width that fits the budget.

    Rule: over the candidate widths of the searchable clusters, from the largest down, the first
    ``w`` whose :meth:`SearchSpace.uniform_map` (each cluster at its largest candidate ``<= w``)
    fits. The map's meta records ``uniform_bits`` (``w``) and ``budget_avg_bits`` (the budget as
    average bits per searchable weight, the pinned clusters' 32 bits taken out); when the two
    differ (a budget of 3.0 average bits over candidates 1, 2, 4, 8 gives 2) ``meta.note`` says
    so and a warning is logged, and clusters whose candidates lack ``w`` are listed in
    ``meta.off_width``.
    """

    name = "uniform"

    def search(self, model: nn.Module, space: SearchSpace, data: SearchData, settings: SearchSection
               ) -> PrecisionMap:
        start = time.perf_counter()
        searched = sum(space.sizes[n] for n in space.searchable)
        # the budget as average bits per searched weight (None without a budget: the widest map)
        budget_bits = budget_cap(space) / searched if searched and space.budget is not None else None
        widths = sorted({b for n in space.searchable for b in space.candidates[n]}, reverse=True)
        for width in widths:
            candidate = space.uniform_map(width)
            if space.fits_budget(candidate):
                meta: dict[str, Any] = {"strategy": self.name, "seed": settings.seed, "uniform_bits": width,
                                        "budget_avg_bits": None if budget_bits is None else round(budget_bits, 6)}
                if budget_bits is not None and abs(budget_bits - width) > WIDTH_SLACK * max(1.0, width):
                    meta["note"] = _uniform_note(space, budget_bits, width, widths)
                    logger.warning("uniform: %s", meta["note"])
                off = sorted(n for n in space.searchable if candidate.bits[n] != width)
                if off:
                    meta["off_width"] = {n: candidate.bits[n] for n in off}
                meta["wall_s"] = time.perf_counter() - start
                return finish_map(space, dict(candidate.bits), meta)
        raise MpnasError(f"{space.source}: no uniform width fits the budget")


def _uniform_note(space: SearchSpace, budget_bits: float, width: int, widths: list[int]) -> str:
    """Why the uniform map's width differs from the budget's average bits (``meta.note``)."""
    budget = space.budget
    text = f"budget {budget.kind}={budget.value:g}" if budget is not None else "the budget"
    text += f" allows {budget_bits:.4g} average bits per searched weight"
    if space.pinned_params:
        text += " (the clusters kept at 32 bits take the rest)"
    above = [b for b in widths if width < b <= budget_bits * (1 + WIDTH_SLACK)]
    if width > budget_bits:  # overrides: clusters without `width` among their candidates take fewer bits
        why = f"the clusters in off_width take fewer bits, which leaves room for {width} elsewhere"
    elif above:  # a wider width is within the average but its map is not (overrides, byte budgets' scales)
        why = f"the uniform map at {min(above)} bits does not fit"
    elif abs(budget_bits - round(budget_bits)) <= WIDTH_SLACK * max(1.0, budget_bits):
        why = f"{round(budget_bits)} is not a candidate"
    else:
        why = "no uniform width matches it"
    return f"{text}; {why}; used {width}, the largest candidate width that fits (candidates {sorted(widths)})"


class RandomStrategy:
    """Seeded random maps; keeps the one that uses most of the budget (ties: first drawn)."""

    name = "random"

    def __init__(self, draws: int = 2000) -> None:
        self.draws = draws

    def search(self, model: nn.Module, space: SearchSpace, data: SearchData, settings: SearchSection
               ) -> PrecisionMap:
        start = time.perf_counter()
        rng = random.Random(settings.seed)
        cap = budget_cap(space)
        best, best_bits = None, -1
        for _ in range(self.draws):
            bits = {n: rng.choice(space.candidates[n]) for n in space.searchable}
            used = sum(bits[n] * space.sizes[n] for n in bits)
            if best_bits < used <= cap:
                best, best_bits = bits, used
        if best is None:
            best = dict(space.smallest_map().bits)
        meta = {"strategy": self.name, "seed": settings.seed, "draws": self.draws,
                "wall_s": time.perf_counter() - start}
        return finish_map(space, best, meta)


class GumbelStrategy:
    """The supernet; it trains a copy of the model, so the FP model is left as it was."""

    name = "gumbel"

    def search(self, model: nn.Module, space: SearchSpace, data: SearchData, settings: SearchSection
               ) -> PrecisionMap:
        model = as_lm(model, context=data.length)  # a plain torch module: as in ScoreTableStrategy.search
        fields = {f: getattr(settings, f) for f in GumbelSettings.__dataclass_fields__ if hasattr(settings, f)}
        searchable = {n: space.candidates[n] for n in space.searchable}
        result = gumbel_search(copy.deepcopy(model), searchable, data.train, max_weight_bits=budget_cap(space),
                               settings=GumbelSettings(**fields), batch_size=data.batch_size, length=data.length,
                               granularity=space.granularity, device=data.device, prototypes=data.prototypes)
        return finish_map(space, dict(result.bits), dict(result.meta))


# Keyed by each class's ``name``; nas.config.sections.STRATEGY_NAMES lists the same names for the schema
# (it cannot import this module), and tests/test_library_api.py checks that the two agree.
STRATEGIES: dict[str, Callable[[], Strategy]] = {
    cls.name: cls for cls in (GumbelStrategy, KLStrategy, HessianStrategy, UniformStrategy, RandomStrategy)
}


def get_strategy(name: str) -> Strategy:
    """A fresh instance of the strategy called ``name``."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; expected one of {sorted(STRATEGIES)}")
    return STRATEGIES[name]()


def settings_used(settings: SearchSection, name: str) -> dict[str, Any]:
    """The settings of the search section that strategy ``name``'s map depends on (and its seed).

    A pipeline hashes these, not the whole section, so that changing e.g. ``hessian_batches``
    reruns the hessian searches only, not the (much longer) gumbel ones.
    """
    strategy = get_strategy(name)
    if isinstance(strategy, GumbelStrategy):
        keys = [f for f in GumbelSettings.__dataclass_fields__ if hasattr(settings, f)]
        return {"strategy": name, **{k: getattr(settings, k) for k in keys}}
    if isinstance(strategy, ScoreTableStrategy):
        return {"strategy": name, "seed": settings.seed, **strategy.settings_key(settings)}
    return {"strategy": name, "seed": settings.seed}


def settings_dict(settings: SearchSection) -> dict[str, Any]:
    """The search section as a plain dict (for run metadata)."""
    return asdict(settings)


