"""What an NNI experiment of mpnas searches: the ``nni`` settings, the search spaces of both modes,
and the objective a trial reports. Pure (no ``nni`` import); :mod:`nas.nni.launcher` runs the
experiment and :mod:`nas.nni.trial` applies a trial's parameters.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nas.config.schema import build_section, field_check, type_ok
from nas.config.sections import MODES as MODES  # re-exported: the nni section is defined with the others
from nas.config.sections import OBJECTIVES as OBJECTIVES
from nas.config.sections import (
    STRATEGY_NAMES,
    ConfigError,
    ExperimentConfig,
    RetrainSection,
    SearchSection,
)
from nas.config.sections import TUNERS as TUNERS
from nas.config.sections import NniSettings as NniSettings
from search_spaces.models import restore_model

STRATEGIES = STRATEGY_NAMES
# Types NNI's TPE, Random and Evolution tuners all accept.
NNI_TYPES = ("choice", "randint", "uniform", "quniform", "loguniform", "qloguniform", "normal", "qnormal",
             "lognormal", "qlognormal")
DEFAULT_GUMBEL_SPACE: dict[str, dict[str, Any]] = {
    "lambda_kp": {"_type": "loguniform", "_value": [1.0, 100.0]},
    "lambda_lr": {"_type": "loguniform", "_value": [0.001, 0.1]},
    "arch_lr": {"_type": "loguniform", "_value": [0.001, 0.1]},
    "tau_start": {"_type": "uniform", "_value": [2.0, 10.0]},
    "tau_end": {"_type": "uniform", "_value": [0.1, 1.0]},
}
# Finite stand-in for a diverged trial: NNI's manager cannot store inf or NaN.
DIVERGED_OBJECTIVE = 1e9
SPEC_VERSION = 1


def load_settings(exp: ExperimentConfig, overrides: Mapping[str, Any] | None = None) -> NniSettings:
    """The experiment's ``nni`` section with ``overrides`` (CLI options; None values ignored) applied."""
    raw = dict(getattr(exp, "nni", None) or {})
    raw.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return build_section(NniSettings, raw, exp.source, "nni")


# --------------------------------------------------------------------------------------------
# Search spaces


def config_budget(exp: ExperimentConfig) -> float:
    """The average-bits budget trials use when the space does not tune it."""
    if exp.budget and "avg_bits" in exp.budget:
        return float(exp.budget["avg_bits"])
    pipeline = getattr(exp, "pipeline", None)
    return float(pipeline.budgets[0]) if pipeline is not None and pipeline.budgets else 2.0


def default_hparams_space(exp: ExperimentConfig) -> dict[str, dict[str, Any]]:
    """Gumbel at the config's budget, tuning its size controller and temperature."""
    return {"strategy": {"_type": "choice", "_value": ["gumbel"]},
            "budget": {"_type": "choice", "_value": [config_budget(exp)]},
            **{k: dict(v) for k, v in DEFAULT_GUMBEL_SPACE.items()}}


def _field_types(cls: type) -> dict[str, str]:
    return {f.name: str(f.type) for f in dataclasses.fields(cls)}


def hparam_target(key: str) -> tuple[str, str]:
    """Where a tuned key goes: ``("special", key)`` for strategy/budget, else (section, field)."""
    if key in ("strategy", "budget"):
        return "special", key
    section, _, name = key.rpartition(".")
    section = section or "search"
    fields = {"search": _field_types(SearchSection), "retrain": _field_types(RetrainSection)}
    if section not in fields or name not in fields[section] or (section, name) == ("search", "strategy"):
        raise KeyError(key)
    return section, name


def hparams_space(exp: ExperimentConfig, settings: NniSettings) -> dict[str, dict[str, Any]]:
    """The checked NNI search space of hparams mode (ConfigError names ``nni.space.<key>``)."""
    space = default_hparams_space(exp) if settings.space is None else settings.space
    where = f"{exp.source}: 'nni.space"
    if not space:
        raise ConfigError(f"{where}' is empty; give at least one parameter or leave it out for the default")
    searchable = sorted(_field_types(SearchSection))
    for key, spec in space.items():
        try:
            hparam_target(str(key))
        except KeyError:
            raise ConfigError(f"{where}.{key}' is not a tunable key: use strategy, budget, a search key "
                              f"({', '.join(k for k in searchable if k != 'strategy')}) or retrain.<key>") from None
        if not isinstance(spec, Mapping) or set(spec) != {"_type", "_value"}:
            raise ConfigError(f"{where}.{key}' must be {{_type: ..., _value: [...]}}, got {spec!r}")
        if spec["_type"] not in NNI_TYPES:
            raise ConfigError(f"{where}.{key}._type' = {spec['_type']!r} is not one of {NNI_TYPES}")
        values = spec["_value"]
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.{key}._value' must be a non-empty list, got {values!r}")
        if key == "strategy" and (spec["_type"] != "choice" or any(v not in STRATEGIES for v in values)):
            raise ConfigError(f"{where}.strategy' must be a choice over {STRATEGIES}, got {dict(spec)!r}")
        if key == "budget" and (spec["_type"] != "choice" or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 32 for v in values)):
            raise ConfigError(f"{where}.budget' must be a choice over average bits in (0, 32], got {dict(spec)!r}")
        if spec["_type"] != "choice" and not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                 for v in values):
            raise ConfigError(f"{where}.{key}._value' must hold numbers for {spec['_type']}, got {values!r}")
        section, name = hparam_target(str(key))
        if section != "special":
            _check_tuned_values(f"{where}.{key}", spec["_type"], values, section, name)
    return {str(k): {"_type": v["_type"], "_value": list(v["_value"])} for k, v in space.items()}


# Distributions whose samples lie between their first two values (randint: the second excluded),
# and how many values each takes; the normal family has no bounds to check.
_BOUNDED = {"uniform": 2, "loguniform": 2, "quniform": 3, "qloguniform": 3, "randint": 2}
_CONTINUOUS = ("uniform", "loguniform", "normal", "lognormal")


def _check_tuned_values(where: str, kind: str, values: list[Any], section: str, name: str) -> None:
    """What a tuned key can take must lie in that field's range (nas/config/sections.py), so that no trial
    fails on its derived config: every choice, and both ends of a bounded distribution."""
    cls = {"search": SearchSection, "retrain": RetrainSection}[section]
    annotation = _field_types(cls)[name]
    check = field_check(cls, name)
    if kind in _BOUNDED and len(values) != _BOUNDED[kind]:
        raise ConfigError(f"{where}._value' = {values!r}: {kind} takes {_BOUNDED[kind]} numbers")
    if annotation.startswith("int") and kind in _CONTINUOUS:
        raise ConfigError(f"{where}._type' = {kind!r}: '{section}.{name}' is an integer; use choice, randint, "
                          "quniform or qloguniform")
    if kind == "choice":
        samples = list(values)
    elif kind in _BOUNDED:
        samples = [values[0], values[1] - 1 if kind == "randint" else values[1]]
    else:
        return
    for value in samples:
        if annotation.startswith("int") and isinstance(value, float) and value.is_integer():
            value = int(value)  # as nas.nni.trial coerces NNI's floats
        if not type_ok(value, annotation) or (check is not None and not check.accepts(value)):
            expected = check.expected if check is not None else annotation
            raise ConfigError(f"{where}._value' = {values!r}: {value!r} is not a valid '{section}.{name}' "
                              f"(must be {expected})")


def bits_space(exp: ExperimentConfig, checkpoint: str | Path) -> dict[str, dict[str, Any]]:
    """bits mode: NNI's choice per free cluster of the experiment's space, on the checkpoint's model."""
    from search_spaces.space import SearchSpace

    if not exp.budget:
        raise ConfigError(f"{exp.source}: bits mode needs a 'budget' section (avg_bits, size_mb or compression): "
                          "without one the objective has no size pressure")
    space = SearchSpace.from_config(exp.space, exp.budget, model_from_checkpoint(checkpoint), exp.source)
    nni_space = space.to_nni()
    if not nni_space:
        raise ConfigError(f"{exp.source}: 'space' leaves no cluster with more than one candidate; nothing to search")
    return nni_space


def model_from_checkpoint(checkpoint: str | Path) -> Any:
    """The FP model stored in an ``mpnas train`` checkpoint."""
    from nas.retrain.run import load_fp_checkpoint

    ckpt = load_fp_checkpoint(checkpoint)
    model = restore_model(ckpt)
    return model


# --------------------------------------------------------------------------------------------
# Objective


def objective(ppl: float, used: float, limit: float | None, penalty: float) -> float:
    """What NNI minimises: ``ppl * (1 + penalty * max(0, used / limit - 1))``.

    ``used`` / ``limit`` is the budgeted quantity of the map and its budget: average bits for
    an ``avg_bits`` budget (all pipeline budgets), theoretical bytes for ``size_mb`` and
    ``compression`` budgets. A map within its budget scores its perplexity; one 10% over it
    scores ``ppl * 2`` at the default penalty 10. No limit (None) means no penalty. A
    non-finite perplexity (a diverged run) scores :data:`DIVERGED_OBJECTIVE`.
    """
    if not math.isfinite(ppl):
        return DIVERGED_OBJECTIVE
    excess = max(0.0, used / limit - 1.0) if limit else 0.0
    return min(float(ppl * (1.0 + penalty * excess)), DIVERGED_OBJECTIVE)


def final_result(value: float, row: Mapping[str, Any], objective_key: str) -> dict[str, Any]:
    """The dict a trial reports (NNI needs the ``default`` key)."""
    return {"default": float(value), "ppl": float(row[objective_key]), "size_bytes": float(row["theoretical_bytes"]),
            "avg_bits": float(row["avg_bits"]), "valid_ppl": float(row["valid_ppl"]),
            "test_ppl": float(row["test_ppl"])}
