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

import abc
import copy
import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from nas.config.sections import SearchSection
from nas.core.atomic import atomic_write_json
from nas.core.batches import stream_batches, window_batches
from nas.core.errors import MpnasError, UsageError
from nas.search.allocate import allocate
from nas.search.gumbel import GumbelSettings, gumbel_search
from nas.search.hessian import TraceEstimate, hessian_scores, hutchinson_traces, lm_loss_fn
from nas.search.kl import kl_scores
from nas.search.sensitivity import Replacements, ScoreTable
from search_spaces.models.protocol import as_lm
from search_spaces.precision import PrecisionMap
from search_spaces.space import SearchSpace

logger = logging.getLogger(__name__)
# Relative slack when comparing the budget's average bits with a width: budgets are floored to
# whole weight bits (space.py), so 3.0 average bits may come back as 2.9999999.
_WIDTH_SLACK = 1e-6


@dataclass(frozen=True)
class SearchData:
    """The token streams and batching a strategy may use."""

    train: torch.Tensor
    valid: torch.Tensor
    batch_size: int = 20
    length: int = 20  # BPTT steps (LSTM) or context (Transformer)
    device: str = "cpu"
    cache_dir: Path | None = None  # where score tables are kept between budgets
    # {bits: {cluster: weight}} of uniform retrained prototypes (nas.pipeline.prototypes.prototype_weights):
    # when given, kl and hessian rate each width by the prototype's weights, not by Q_b(W) (issue 13)
    prototypes: Replacements | None = None


class Strategy(Protocol):
    """What every strategy provides."""

    name: str

    def search(self, model: nn.Module, space: SearchSpace, data: SearchData, settings: SearchSection
               ) -> PrecisionMap:
        """Return a map inside ``space`` that meets ``space.budget``."""
        ...


def _cap(space: SearchSpace) -> float:
    if space.budget is None:
        raise UsageError(f"{space.source}: a search needs a budget (a `budget` section or --budget)")
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
        budget_bits = _cap(space) / searched if searched and space.budget is not None else None
        widths = sorted({b for n in space.searchable for b in space.candidates[n]}, reverse=True)
        for width in widths:
            candidate = space.uniform_map(width)
            if space.fits_budget(candidate):
                meta: dict[str, Any] = {"strategy": self.name, "seed": settings.seed, "uniform_bits": width,
                                        "budget_avg_bits": None if budget_bits is None else round(budget_bits, 6)}
                if budget_bits is not None and abs(budget_bits - width) > _WIDTH_SLACK * max(1.0, width):
                    meta["note"] = _uniform_note(space, budget_bits, width, widths)
                    logger.warning("uniform: %s", meta["note"])
                off = sorted(n for n in space.searchable if candidate.bits[n] != width)
                if off:
                    meta["off_width"] = {n: candidate.bits[n] for n in off}
                meta["wall_s"] = time.perf_counter() - start
                return _finish(space, dict(candidate.bits), meta)
        raise MpnasError(f"{space.source}: no uniform width fits the budget")


def _uniform_note(space: SearchSpace, budget_bits: float, width: int, widths: list[int]) -> str:
    """Why the uniform map's width differs from the budget's average bits (``meta.note``)."""
    budget = space.budget
    text = f"budget {budget.kind}={budget.value:g}" if budget is not None else "the budget"
    text += f" allows {budget_bits:.4g} average bits per searched weight"
    if space.pinned_params:
        text += " (the clusters kept at 32 bits take the rest)"
    above = [b for b in widths if width < b <= budget_bits * (1 + _WIDTH_SLACK)]
    if width > budget_bits:  # overrides: clusters without `width` among their candidates take fewer bits
        why = f"the clusters in off_width take fewer bits, which leaves room for {width} elsewhere"
    elif above:  # a wider width is within the average but its map is not (overrides, byte budgets' scales)
        why = f"the uniform map at {min(above)} bits does not fit"
    elif abs(budget_bits - round(budget_bits)) <= _WIDTH_SLACK * max(1.0, budget_bits):
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


def _weights_digest(model: nn.Module) -> Any:
    """A sha256 fed with every state_dict entry's name and bytes (the start of each cache key)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest


def _fingerprint(model: nn.Module, space: SearchSpace, extra: dict[str, Any],
                 prototypes: Replacements | None = None) -> str:
    """Hash of the weights (and prototypes), the candidates and the settings: a cached score table's key."""
    digest = _weights_digest(model)
    for bits in sorted(prototypes or {}):
        for name in sorted(prototypes[bits]):
            digest.update(f"prototype:{bits}:{name}".encode())
            digest.update(prototypes[bits][name].detach().cpu().contiguous().numpy().tobytes())
    digest.update(json.dumps({"candidates": {k: list(v) for k, v in space.candidates.items()},
                              "granularity": space.granularity, **extra}, sort_keys=True).encode())
    return digest.hexdigest()[:16]


class ScoreTableStrategy(abc.ABC):
    """Shared logic of ``kl`` and ``hessian``: score once (cached), allocate per budget."""

    name = "table"

    @abc.abstractmethod
    def scores(self, model: nn.Module, space: SearchSpace, data: SearchData, settings: SearchSection
               ) -> tuple[ScoreTable, dict[str, Any]]:
        """The score table ``{cluster: {bits: score}}`` of the searchable clusters, and the evidence
        (JSON-ready) that the map's meta keeps beside it (cached with the table)."""

    def settings_key(self, settings: SearchSection) -> dict[str, Any]:
        return {"seed": settings.seed}

    def search(self, model: nn.Module, space: SearchSpace, data: SearchData, settings: SearchSection
               ) -> PrecisionMap:
        start = time.perf_counter()
        # a plain torch module runs behind the LM protocol; a window model without a context of
        # its own takes the data's window length
        model = as_lm(model, context=data.length)
        table, cached, evidence = None, False, {}
        key = _fingerprint(model, space, {"strategy": self.name, **self.settings_key(settings)}, data.prototypes)
        cache = data.cache_dir / f"scores_{self.name}_{key}.json" if data.cache_dir else None
        if cache is not None and cache.is_file():
            stored = json.loads(cache.read_text())
            table = {c: {int(b): float(s) for b, s in row.items()} for c, row in stored["scores"].items()}
            score_seconds, cached, evidence = float(stored["seconds"]), True, dict(stored.get("evidence", {}))
        if table is None:
            t0 = time.perf_counter()
            table, evidence = self.scores(model, space, data, settings)
            score_seconds = time.perf_counter() - t0
            if cache is not None:
                rows = {c: {str(b): s for b, s in row.items()} for c, row in table.items()}
                atomic_write_json(cache, {"strategy": self.name, "key": key, "seconds": score_seconds, "scores": rows,
                                          "evidence": evidence})
        searchable = {n: table[n] for n in space.searchable}
        bits = allocate(searchable, space.sizes, _cap(space))
        meta = {"strategy": self.name, "seed": settings.seed, "scores_cached": cached,
                "sensitivity": "fp" if data.prototypes is None else "prototype",
                "score_seconds": score_seconds, "wall_s": time.perf_counter() - start,
                "scores": {c: {str(b): s for b, s in row.items()} for c, row in searchable.items()}, **evidence}
        return _finish(space, bits, meta)


class KLStrategy(ScoreTableStrategy):
    """Mean token KL(P_fp || P_q) with one cluster quantized at a time, on the start of valid."""

    name = "kl"

    def settings_key(self, settings: SearchSection) -> dict[str, Any]:
        return {"kl_tokens": settings.kl_tokens}

    def scores(self, model: nn.Module, space: SearchSpace, data: SearchData, settings: SearchSection
               ) -> tuple[ScoreTable, dict[str, Any]]:
        tokens = data.valid[: settings.kl_tokens]
        context = getattr(getattr(model, "config", None), "context", None)
        return kl_scores(model, {n: space.candidates[n] for n in space.searchable}, tokens,
                         batch_size=data.batch_size, bptt=data.length,
                         context=None if hasattr(model, "init_state") else context,
                         granularity=space.granularity, device=data.device, replacements=data.prototypes), {}


class HessianStrategy(ScoreTableStrategy):
    """``|Tr(H_c)| * ||Q_b(W_c) - W_c||^2`` with Hutchinson traces on a few training batches.

    Each cluster's trace is probed until its relative standard error is at most ``hessian_tol``
    (or ``hessian_max_iters`` products have run); the map's ``meta.hutchinson`` records the
    products run, the clusters that hit the cap, and per cluster the trace, its standard error,
    the relative standard error and the probes it received (:func:`trace_evidence`).
    """

    name = "hessian"
    # Part of the cache key and the pipeline's stage inputs: tables made under the earlier
    # stopping rule (relative change of the running mean, same `hessian_tol` key) are not reused.
    STOP_RULE = "relative_std_error"

    def settings_key(self, settings: SearchSection) -> dict[str, Any]:
        keys = ("seed", "hessian_batches", "hessian_probes", "hessian_max_iters", "hessian_tol", "hessian_per_weight")
        return {**{k: getattr(settings, k) for k in keys}, "hessian_stop": self.STOP_RULE}

    def scores(self, model: nn.Module, space: SearchSpace, data: SearchData, settings: SearchSection
               ) -> tuple[ScoreTable, dict[str, Any]]:
        generator = torch.Generator().manual_seed(settings.seed)
        if hasattr(model, "init_state"):
            rows = stream_batches(data.train, data.batch_size, data.length)
            starts = torch.randint(0, rows.size(1) - data.length - 1, (settings.hessian_batches,), generator=generator)
            batches = [(rows[:, s : s + data.length], rows[:, s + 1 : s + 1 + data.length]) for s in starts.tolist()]
        else:
            batches = window_batches(data.train, data.length, data.batch_size, generator)[: settings.hessian_batches]
        names = list(space.searchable)
        was_training = model.training
        model.eval()  # no dropout: the loss must be one fixed function of the weights
        try:
            traces = self._traces(model, names, batches, data, settings)
            table = hessian_scores(model, traces, {n: space.candidates[n] for n in names},
                                   granularity=space.granularity, per_weight=settings.hessian_per_weight,
                                   replacements=data.prototypes)
        finally:
            model.train(was_training)  # a search leaves the model's train/eval mode as it found it
        return table, {"hutchinson": trace_evidence(traces, settings)}

    def _traces(self, model: nn.Module, names: list[str], batches: list[tuple[torch.Tensor, torch.Tensor]],
                data: SearchData, settings: SearchSection) -> dict[str, TraceEstimate]:
        """Hutchinson traces of the FP model, cached apart from the score table.

        The traces depend on the weights, the clusters, the batches and the probe settings, not
        on the candidates or the prototypes: scoring on FP weights and on prototypes (or another
        prototype set) reuses them, and they are the expensive part (17 min of the PTB
        Transformer's 2 batches on one core, against seconds for the perturbations).
        """
        cache = None
        if data.cache_dir is not None:
            digest = _weights_digest(model)
            for inputs, targets in batches:
                digest.update(inputs.cpu().contiguous().numpy().tobytes())
                digest.update(targets.cpu().contiguous().numpy().tobytes())
            settings_key = {k: v for k, v in self.settings_key(settings).items() if k != "hessian_per_weight"}
            digest.update(json.dumps({"clusters": names, **settings_key}, sort_keys=True).encode())
            cache = data.cache_dir / f"traces_hessian_{digest.hexdigest()[:16]}.json"
            if cache.is_file():
                stored = json.loads(cache.read_text())["traces"]
                return {n: TraceEstimate(float(stored[n]["trace"]), int(stored[n]["iters"]),
                                         _from_json(stored[n]["std_error"]), _from_json(stored[n]["rel_error"]),
                                         bool(stored[n]["capped"])) for n in names}  # the clusters' order
        traces = hutchinson_traces(model, names, lm_loss_fn(batches), probes=settings.hessian_probes,
                                   max_iters=settings.hessian_max_iters, tol=settings.hessian_tol, seed=settings.seed)
        if cache is not None:
            atomic_write_json(cache, {"traces": {n: {"trace": e.trace, "iters": e.iters,
                                                     "std_error": _finite(e.std_error),
                                                     "rel_error": _finite(e.rel_error), "capped": e.capped}
                                                 for n, e in traces.items()}})
        return traces


def _from_json(value: float | None) -> float:
    """Inverse of :func:`_finite` for standard errors: None (a single probe's) is inf."""
    return math.inf if value is None else float(value)


def _finite(value: float) -> float | None:
    """JSON and YAML-safe: None for inf/nan (a single probe's standard error)."""
    return float(value) if math.isfinite(value) else None


def trace_evidence(traces: dict[str, TraceEstimate], settings: SearchSection) -> dict[str, Any]:
    """What ``meta.hutchinson`` records of a :func:`hutchinson_traces` result.

    ``products``: Hessian-vector products run (the most probes any cluster received);
    ``capped``: the clusters that ``max_probes`` stopped above ``tol`` (empty when all met it);
    per cluster: ``traces``, ``std_errors``, ``rel_errors`` (std_error / |trace|, what ``tol``
    bounds) and ``probes`` (those it received before it met ``tol`` and was left out).
    """
    return {"rule": "per cluster: std_error / |trace| <= tol, then no more probes",
            "tol": settings.hessian_tol, "max_probes": settings.hessian_max_iters,
            "products": max(e.iters for e in traces.values()),
            "capped": [n for n, e in traces.items() if e.capped],
            "traces": {n: e.trace for n, e in traces.items()},
            "std_errors": {n: _finite(e.std_error) for n, e in traces.items()},
            "rel_errors": {n: _finite(e.rel_error) for n, e in traces.items()},
            "probes": {n: e.iters for n, e in traces.items()}}


class GumbelStrategy:
    """The supernet; it trains a copy of the model, so the FP model is left as it was."""

    name = "gumbel"

    def search(self, model: nn.Module, space: SearchSpace, data: SearchData, settings: SearchSection
               ) -> PrecisionMap:
        model = as_lm(model, context=data.length)  # a plain torch module: as in ScoreTableStrategy.search
        fields = {f: getattr(settings, f) for f in GumbelSettings.__dataclass_fields__ if hasattr(settings, f)}
        searchable = {n: space.candidates[n] for n in space.searchable}
        result = gumbel_search(copy.deepcopy(model), searchable, data.train, max_weight_bits=_cap(space),
                               settings=GumbelSettings(**fields), batch_size=data.batch_size, length=data.length,
                               granularity=space.granularity, device=data.device, prototypes=data.prototypes)
        return _finish(space, dict(result.bits), dict(result.meta))


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


