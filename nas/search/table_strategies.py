"""Score-table strategies (kl, hessian): a cached table of per-cluster sensitivities, then the exact
budgeted allocation."""

from __future__ import annotations

import abc
import hashlib
import json
import math
import time
from typing import Any

import torch
from torch import nn

from nas.config.sections import SearchSection
from nas.core.atomic import atomic_write_json
from nas.core.batches import stream_batches, window_batches
from nas.search.allocate import allocate
from nas.search.base import SearchData, budget_cap, finish_map
from nas.search.hessian import TraceEstimate, hessian_scores, hutchinson_traces, lm_loss_fn
from nas.search.kl import kl_scores
from nas.search.sensitivity import Replacements, ScoreTable
from search_spaces.models.protocol import as_lm
from search_spaces.precision import PrecisionMap
from search_spaces.space import SearchSpace


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
        bits = allocate(searchable, space.sizes, budget_cap(space))
        meta = {"strategy": self.name, "seed": settings.seed, "scores_cached": cached,
                "sensitivity": "fp" if data.prototypes is None else "prototype",
                "score_seconds": score_seconds, "wall_s": time.perf_counter() - start,
                "scores": {c: {str(b): s for b, s in row.items()} for c, row in searchable.items()}, **evidence}
        return finish_map(space, bits, meta)


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
