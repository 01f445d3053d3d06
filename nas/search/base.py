"""What every search strategy shares: the data it searches on, its protocol, how a found map is finished."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from nas.config.sections import SearchSection
from nas.core.errors import UsageError
from nas.search.sensitivity import Replacements
from search_spaces.precision import PrecisionMap
from search_spaces.space import SearchSpace

# Relative slack when comparing the budget's average bits with a width: budgets are floored to
# whole weight bits (space.py), so 3.0 average bits may come back as 2.9999999.
WIDTH_SLACK = 1e-6


@dataclass(frozen=True)
class SearchData:
    """The token streams and batching a strategy may use."""

    train: torch.Tensor
    valid: torch.Tensor
    batch_size: int = 20
    length: int = 20  # BPTT steps (LSTM) or context (Transformer)
    device: str = "cpu"
    cache_dir: Path | None = None  # where score tables are kept between budgets
    # {bits: {cluster: weight}} of uniform retrained prototypes (nas.retrain.prototype_store.prototype_weights):
    # when given, kl and hessian rate each width by the prototype's weights, not by Q_b(W) (issue 13)
    prototypes: Replacements | None = None


class Strategy(Protocol):
    """What every strategy provides."""

    name: str

    def search(self, model: nn.Module, space: SearchSpace, data: SearchData, settings: SearchSection
               ) -> PrecisionMap:
        """Return a map inside ``space`` that meets ``space.budget``."""
        ...


def budget_cap(space: SearchSpace) -> float:
    if space.budget is None:
        raise UsageError(f"{space.source}: a search needs a budget (a `budget` section or --budget)")
    return space.budget.max_weight_bits(space)


def finish_map(space: SearchSpace, bits: dict[str, int], meta: dict[str, Any]) -> PrecisionMap:
    """Complete ``bits`` with the pinned clusters and check the budget."""
    full = {name: bits.get(name, cands[0]) for name, cands in space.candidates.items()}
    pm = PrecisionMap(full, granularity=space.granularity, meta=meta, leftover_bits=space.leftover_bits)
    if not space.fits_budget(pm):
        raise RuntimeError(f"strategy {meta.get('strategy')} produced a map over the budget: "
                           f"{space.weight_bits(pm)} > {budget_cap(space)} weight bits")
    return pm
