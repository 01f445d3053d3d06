"""Search strategies: each turns (model, space, budget, data) into a :class:`PrecisionMap`.

One small protocol, ``search(model, space, data, settings) -> PrecisionMap``; the map's
``meta`` carries the evidence (scores or probabilities, seed, wall time). The strategies are
plain instances in the :data:`STRATEGIES` dict (no import-time registry).

- ``uniform``: the largest uniform width (among every cluster's candidates) that fits.
- ``random``: seeded random maps; the one using most of the budget among those that fit.
- ``kl`` / ``hessian``: a score table ``S[c, b]`` (cached on disk, reused across budgets),
  then the exact knapsack allocation of :func:`nas.allocate.allocate`.
- ``gumbel``: the differentiable supernet of :mod:`nas.gumbel`.
"""

from __future__ import annotations

import abc
import copy
import hashlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from nas.allocate import allocate
from nas.config import SearchSection
from nas.data import stream_batches, window_batches
from nas.gumbel import GumbelSettings, gumbel_search
from nas.sensitivity import ScoreTable, hessian_scores, hutchinson_traces, kl_scores, lm_loss_fn
from search_spaces.atomic import atomic_write_json
from search_spaces.precision import PrecisionMap
from search_spaces.space import SearchSpace


@dataclass(frozen=True)
class SearchData:
    """The token streams and batching a strategy may use."""

    train: torch.Tensor
    valid: torch.Tensor
    batch_size: int = 20
    length: int = 20  # BPTT steps (LSTM) or context (Transformer)
    device: str = "cpu"
    cache_dir: Path | None = None  # where score tables are kept between budgets


class Strategy(Protocol):
    """What every strategy provides."""

    name: str

    def search(self, model: nn.Module, space: SearchSpace, data: SearchData, settings: SearchSection
               ) -> PrecisionMap:
        """Return a map inside ``space`` that meets ``space.budget``."""
        ...


def _cap(space: SearchSpace) -> float:
    if space.budget is None:
        raise ValueError(f"{space.source}: a search needs a budget (a `budget` section or --budget)")
    return space.budget.max_weight_bits(space)


def _finish(space: SearchSpace, bits: dict[str, int], meta: dict[str, Any]) -> PrecisionMap:
    """Complete ``bits`` with the pinned clusters and check the budget."""
    full = {name: bits.get(name, cands[0]) for name, cands in space.candidates.items()}
    pm = PrecisionMap(full, granularity=space.granularity, meta=meta, leftover_bits=space.leftover_bits)
    if not space.fits_budget(pm):
        raise RuntimeError(f"strategy {meta.get('strategy')} produced a map over the budget: "
                           f"{space.weight_bits(pm)} > {_cap(space)} weight bits")
    return pm


class UniformStrategy:
    """Every searchable cluster at the same width: the largest that fits the budget."""

    name = "uniform"

    def search(self, model: nn.Module, space: SearchSpace, data: SearchData, settings: SearchSection
               ) -> PrecisionMap:
        start = time.perf_counter()
        widths = sorted({b for n in space.searchable for b in space.candidates[n]}, reverse=True)
        for width in widths:
            candidate = space.uniform_map(width)
            if space.fits_budget(candidate):
                meta = {"strategy": self.name, "seed": settings.seed, "uniform_bits": width,
                        "wall_s": time.perf_counter() - start}
                return _finish(space, dict(candidate.bits), meta)
        raise ValueError(f"{space.source}: no uniform width fits the budget")


class RandomStrategy:
    """Seeded random maps; keeps the one that uses most of the budget (ties: first drawn)."""

    name = "random"

    def __init__(self, draws: int = 2000) -> None:
        self.draws = draws

    def search(self, model: nn.Module, space: SearchSpace, data: SearchData, settings: SearchSection
               ) -> PrecisionMap:
        start = time.perf_counter()
        rng = random.Random(settings.seed)
        cap = _cap(space)
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
        return _finish(space, best, meta)


def _fingerprint(model: nn.Module, space: SearchSpace, extra: dict[str, Any]) -> str:
    """Hash of the weights, the candidates and the settings: the key of a cached score table."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    digest.update(json.dumps({"candidates": {k: list(v) for k, v in space.candidates.items()},
                              "granularity": space.granularity, **extra}, sort_keys=True).encode())
    return digest.hexdigest()[:16]


class ScoreTableStrategy(abc.ABC):
    """Shared logic of ``kl`` and ``hessian``: score once (cached), allocate per budget."""

    name = "table"

    @abc.abstractmethod
    def scores(self, model: nn.Module, space: SearchSpace, data: SearchData, settings: SearchSection
               ) -> ScoreTable:
        """The score table ``{cluster: {bits: score}}`` of the searchable clusters."""

    def settings_key(self, settings: SearchSection) -> dict[str, Any]:
        return {"seed": settings.seed}

    def search(self, model: nn.Module, space: SearchSpace, data: SearchData, settings: SearchSection
               ) -> PrecisionMap:
        start = time.perf_counter()
        table, cached = None, False
        key = _fingerprint(model, space, {"strategy": self.name, **self.settings_key(settings)})
        cache = data.cache_dir / f"scores_{self.name}_{key}.json" if data.cache_dir else None
        if cache is not None and cache.is_file():
            stored = json.loads(cache.read_text())
            table = {c: {int(b): float(s) for b, s in row.items()} for c, row in stored["scores"].items()}
            score_seconds, cached = float(stored["seconds"]), True
        if table is None:
            t0 = time.perf_counter()
            table = self.scores(model, space, data, settings)
            score_seconds = time.perf_counter() - t0
            if cache is not None:
                rows = {c: {str(b): s for b, s in row.items()} for c, row in table.items()}
                atomic_write_json(cache, {"strategy": self.name, "key": key, "seconds": score_seconds, "scores": rows})
        searchable = {n: table[n] for n in space.searchable}
        bits = allocate(searchable, space.sizes, _cap(space))
        meta = {"strategy": self.name, "seed": settings.seed, "scores_cached": cached,
                "score_seconds": score_seconds, "wall_s": time.perf_counter() - start,
                "scores": {c: {str(b): s for b, s in row.items()} for c, row in searchable.items()}}
        return _finish(space, bits, meta)


class KLStrategy(ScoreTableStrategy):
    """Mean token KL(P_fp || P_q) with one cluster quantized at a time, on the start of valid."""

    name = "kl"

    def settings_key(self, settings: SearchSection) -> dict[str, Any]:
        return {"kl_tokens": settings.kl_tokens}

    def scores(self, model: nn.Module, space: SearchSpace, data: SearchData, settings: SearchSection
               ) -> ScoreTable:
        tokens = data.valid[: settings.kl_tokens]
        context = getattr(getattr(model, "config", None), "context", None)
        return kl_scores(model, {n: space.candidates[n] for n in space.searchable}, tokens,
                         batch_size=data.batch_size, bptt=data.length,
                         context=None if hasattr(model, "init_state") else context,
                         granularity=space.granularity, device=data.device)


class HessianStrategy(ScoreTableStrategy):
    """``|Tr(H_c)| * ||Q_b(W_c) - W_c||^2`` with Hutchinson traces on a few training batches."""

    name = "hessian"

    def settings_key(self, settings: SearchSection) -> dict[str, Any]:
        keys = ("seed", "hessian_batches", "hessian_probes", "hessian_max_iters", "hessian_tol", "hessian_per_weight")
        return {k: getattr(settings, k) for k in keys}

    def scores(self, model: nn.Module, space: SearchSpace, data: SearchData, settings: SearchSection
               ) -> ScoreTable:
        generator = torch.Generator().manual_seed(settings.seed)
        if hasattr(model, "init_state"):
            rows = stream_batches(data.train, data.batch_size, data.length)
            starts = torch.randint(0, rows.size(1) - data.length - 1, (settings.hessian_batches,), generator=generator)
            batches = [(rows[:, s : s + data.length], rows[:, s + 1 : s + 1 + data.length]) for s in starts.tolist()]
        else:
            batches = window_batches(data.train, data.length, data.batch_size, generator)[: settings.hessian_batches]
        names = list(space.searchable)
        model.eval()  # no dropout: the loss must be one fixed function of the weights
        traces = hutchinson_traces(model, names, lm_loss_fn(batches), probes=settings.hessian_probes,
                                   max_iters=settings.hessian_max_iters, tol=settings.hessian_tol, seed=settings.seed)
        return hessian_scores(model, traces, {n: space.candidates[n] for n in names}, granularity=space.granularity,
                              per_weight=settings.hessian_per_weight)


class GumbelStrategy:
    """The supernet; it trains a copy of the model, so the FP model is left as it was."""

    name = "gumbel"

    def search(self, model: nn.Module, space: SearchSpace, data: SearchData, settings: SearchSection
               ) -> PrecisionMap:
        fields = {f: getattr(settings, f) for f in GumbelSettings.__dataclass_fields__ if hasattr(settings, f)}
        searchable = {n: space.candidates[n] for n in space.searchable}
        result = gumbel_search(copy.deepcopy(model), searchable, data.train, max_weight_bits=_cap(space),
                               settings=GumbelSettings(**fields), batch_size=data.batch_size, length=data.length,
                               granularity=space.granularity, device=data.device)
        return _finish(space, dict(result.bits), dict(result.meta))


STRATEGIES: dict[str, Callable[[], Strategy]] = {
    "uniform": UniformStrategy, "random": RandomStrategy, "kl": KLStrategy, "hessian": HessianStrategy,
    "gumbel": GumbelStrategy,
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


