"""mpnas as a library: every verb and config importable from this one module.

::

    from nas.api import KLConfig, SteConfig, evaluate, export, load_packed, retrain, search

    precision = search(model, {"bits": [2, 4, 8]}, KLConfig(kl_tokens=2000), train_tokens, budget=4.0)
    retrain(model, precision, train_tokens, SteConfig(epochs=1))
    export(model, precision, "model.mpq")
    skeleton, _ = load_packed("model.mpq", model=skeleton)
    print(evaluate(skeleton, test_tokens, precision=precision))

``model`` is an mpnas LM or a plain torch LM: ``nn.Embedding + nn.LSTM + nn.Linear`` returning
``(logits, state)``, or a causal Transformer returning logits (the protocol and its adapter:
:mod:`search_spaces.models.protocol`). Precision maps name the model's own modules. Token data
is a 1-D integer tensor. The verbs:

- :func:`search` ``(model, space, strategy, data) -> PrecisionMap``
- :func:`retrain` ``(model, precision, data, method) -> model`` (in place)
- :func:`quantize_` ``(model, precision)`` (in place, no training)
- :func:`export` ``(model, precision, path)`` / :func:`load_packed` ``(path, model=skeleton)``
- :func:`evaluate` ``(model, tokens) -> {"loss", "ppl", "tokens", sizes with precision=}``

Configs: :class:`KLConfig`, :class:`HessianConfig`, :class:`GumbelConfig`, :class:`UniformConfig`,
:class:`RandomConfig`; :class:`SteConfig`, :class:`AdmmConfig` (:mod:`nas.config.options`).
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evaluators.perplexity import perplexity
from nas.config.options import (
    RETRAIN_CONFIGS,
    STRATEGY_CONFIGS,
    AdmmConfig,
    GumbelConfig,
    HessianConfig,
    KLConfig,
    RandomConfig,
    RetrainConfig,
    SteConfig,
    StrategyConfig,
    UniformConfig,
    default,
    strategy_config,
)
from nas.config.sections import DataSection, RetrainSection
from nas.core.errors import UsageError
from nas.retrain.fit import Batch, retrain_model
from nas.search.base import SearchData
from nas.search.strategies import get_strategy
from search_spaces.apply import quantize_
from search_spaces.models.protocol import as_lm
from search_spaces.packed import export_packed, load_packed
from search_spaces.precision import PrecisionMap
from search_spaces.size import model_size
from search_spaces.space import Budget, SearchSpace

__all__ = ["RETRAIN_CONFIGS", "STRATEGY_CONFIGS", "AdmmConfig", "GumbelConfig", "HessianConfig", "KLConfig",
           "PrecisionMap", "RandomConfig", "RetrainConfig", "SearchData", "SearchSpace", "SteConfig", "StrategyConfig",
           "UniformConfig", "as_lm", "evaluate", "export", "load_packed", "make_space", "quantize_", "retrain",
           "search", "strategy_config"]

BudgetSpec = float | Mapping[str, float] | None


def _budget(budget: BudgetSpec) -> dict[str, float] | None:
    """``{kind: value}`` of a budget given as average bits (a number) or as the ``budget`` section."""
    if budget is None or isinstance(budget, Mapping):
        return None if budget is None else dict(budget)
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise TypeError(f"budget must be average bits (a number) or a mapping like {{'size_mb': 1.5}}, got {budget!r}")
    return {"avg_bits": float(budget)}


def make_space(model: nn.Module, space: SearchSpace | Mapping[str, Any] | None = None,
               budget: BudgetSpec = None) -> SearchSpace:
    """A search space of ``model``: given, or built from the ``space`` section's keys (None: defaults).

    ``budget`` (average bits, or ``{"size_mb": ...}`` / ``{"compression": ...}``) replaces the space's.
    """
    raw_budget = _budget(budget)
    if isinstance(space, SearchSpace):
        if raw_budget is None:
            return space
        return dataclasses.replace(space, budget=Budget.from_config(raw_budget, space.source))
    return SearchSpace.from_config(space, raw_budget, model, "<library>")


def _search_data(model: nn.Module, data: torch.Tensor | SearchData, device: str | None) -> SearchData:
    """``data`` as given, or a token stream used for training batches and held-out scoring both."""
    if isinstance(data, SearchData):
        return data
    if not isinstance(data, torch.Tensor) or data.dim() != 1 or data.is_floating_point():
        raise TypeError("data must be a SearchData or a 1-D integer token stream")
    lm = as_lm(model)
    if hasattr(lm, "init_state"):
        length = default(DataSection, "bptt")
    else:  # the data section's window, at most the model's own context
        own = getattr(getattr(lm, "config", None), "context", None)
        length = min(default(DataSection, "context"), own or default(DataSection, "context"))
    return SearchData(train=data, valid=data, batch_size=default(DataSection, "batch_size"), length=length,
                      device=device or str(next(model.parameters()).device))


def search(model: nn.Module, space: SearchSpace | Mapping[str, Any] | None, strategy: str | StrategyConfig | None,
           data: torch.Tensor | SearchData, *, budget: BudgetSpec = None, device: str | None = None) -> PrecisionMap:
    """A precision map of ``model`` inside ``space`` that meets the budget, found by ``strategy``.

    ``space``: a :class:`SearchSpace`, the keys of an experiment's ``space`` section
    (``{"bits": [2, 4, 8], "keep_fp": ["embedding"]}``) or None (defaults). ``strategy``: a config
    (:class:`KLConfig`...), a strategy name (its defaults) or None (``search.strategy``'s default).
    ``data``: a 1-D token stream (training batches of the data section's default shape, and its
    start as kl's held-out text) or a :class:`SearchData` for full control. ``budget``: average
    bits or a ``budget`` section; required unless the space has one. ``device``: where the strategy
    runs (default: the model's). ``model`` is left as it was.
    """
    config = strategy_config(strategy)
    resolved = make_space(model, space, budget)
    if resolved.budget is None:  # checked before any scoring or training starts
        raise UsageError("a search needs a budget: budget= average bits, {'size_mb': ...} or {'compression': ...}")
    precision = get_strategy(config.name).search(model, resolved, _search_data(model, data, device),
                                                 config.section())
    return precision.with_meta({**precision.meta, "budget": {resolved.budget.kind: resolved.budget.value}})


def retrain(model: nn.Module, precision: PrecisionMap, data: torch.Tensor | Iterable[Batch],
            method: str | RetrainConfig | None = None, *, device: torch.device | str | None = None) -> nn.Module:
    """Retrain ``model`` in place at ``precision``; returns it, quantized (nas/retrain/fit.py).

    ``data``: a 1-D token stream or ``(inputs, targets)`` batches. ``method``: :class:`SteConfig`,
    :class:`AdmmConfig`, a method name (its defaults) or None (``retrain.method``'s default).
    """
    if not isinstance(method, RetrainConfig):
        name = default(RetrainSection, "method") if method is None else method
        if name not in RETRAIN_CONFIGS:
            raise ValueError(f"unknown retraining method {name!r}; expected one of {sorted(RETRAIN_CONFIGS)}")
        method = RETRAIN_CONFIGS[name]()
    return retrain_model(model, precision, data, method, device=device)


def export(model: nn.Module, precision: PrecisionMap, path: str | Path) -> dict[str, Any]:
    """Quantize ``model`` in place at ``precision`` and write the packed file; returns its header.

    :func:`load_packed` ``(path, model=skeleton)`` gives the same weights back, bit for bit.
    """
    return export_packed(model, precision, path)


def evaluate(model: nn.Module, tokens: torch.Tensor, *, precision: PrecisionMap | None = None,
             start_token: int | None = None, context: int | None = None,
             device: torch.device | str | None = None) -> dict[str, float]:
    """Exact perplexity of ``model`` on ``tokens`` (``loss``, ``ppl``, ``tokens``), plus sizes with ``precision``.

    Every token after ``start_token`` is scored; without one, ``tokens[0]`` is the context and the
    rest are scored. Batching is the ``data`` section's defaults; a plain window model without a
    context of its own runs on windows of ``context`` (default: the data section's) tokens.
    """
    if start_token is None:
        start_token, tokens = int(tokens[0]), tokens[1:]
    lm = as_lm(model, context=context or default(DataSection, "context"))
    result = perplexity(lm, tokens, start_token, batch_size=default(DataSection, "eval_batch_size"),
                        bptt=default(DataSection, "bptt"), stride=default(DataSection, "eval_stride"),
                        device=device)
    if precision is not None:
        result.update(model_size(model, precision))
    return result
