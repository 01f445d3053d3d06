"""Checks that need the model, run before any training starts.

:func:`nas.config.sections.load_config` checks every key of an experiment file on its own (types,
ranges, unknown keys). What it cannot check without a model is whether the ``space`` section
names real clusters and whether each budget can be met: that is done here, on the model a run
will quantize: the given FP checkpoint's, or the config's model untrained (built in well under a
second, sized to the corpus vocabulary, as FP training would build it). ``mpnas pipeline``,
``search`` and ``nni`` call this before they train anything, so that a typo in
``space.overrides`` or an infeasible budget is an exit-2 error within seconds, not after the FP
model has been trained.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

from torch import nn

from nas.config.sections import ConfigError, ExperimentConfig, FieldError
from nas.core.data import Corpus
from search_spaces.models import build_model, restore_model
from search_spaces.space import DEFAULT_BITS, Budget, SearchSpace
from search_spaces.space_parsing import SpaceError


def experiment_model(exp: ExperimentConfig, corpus: Corpus, checkpoint: str | Path | None = None) -> nn.Module:
    """The model a run quantizes, untrained: the checkpoint's (its vocabulary checked against the
    corpus), or the config's ``model`` section with the corpus's vocabulary size."""
    if checkpoint is not None:
        from nas.retrain.run import load_fp_checkpoint  # nas.retrain.run pulls in the training loop

        ckpt = load_fp_checkpoint(checkpoint, corpus)
        model = restore_model(ckpt)
        return model
    return build_model(exp.model_type, **{**exp.model_kwargs(), "vocab_size": len(corpus.vocab)})


def check_space(exp: ExperimentConfig, model: nn.Module, budgets: Iterable[tuple[str, float]] = ()) -> SearchSpace:
    """``space`` and ``budget`` resolved against ``model`` (SpaceError names the file and key), and
    every ``(key, avg_bits)`` of ``budgets`` checked to be feasible in that space."""
    space = SearchSpace.from_config(exp.space, exp.budget, model, exp.source)
    for key, avg_bits in budgets:
        try:
            dataclasses.replace(space, budget=Budget("avg_bits", avg_bits))  # re-checks feasibility
        except SpaceError as exc:
            raise SpaceError(f"{exc} (the budget of '{key}')") from None
    return space


def check_pipeline(exp: ExperimentConfig, corpus: Corpus, checkpoint: str | Path | None = None,
                   budgets: Iterable[tuple[str, float]] | None = None) -> None:
    """Everything ``mpnas pipeline`` can check before its FP stage: the sections that work together,
    and the space at every budget (default: those of ``pipeline.budgets``, which the uniform
    baselines use too; an NNI launcher passes the budgets its trials can get)."""
    if exp.retrain.init == "inherited" and not exp.pipeline.uses_prototypes:
        raise ConfigError(f"{exp.source}: retrain.init is 'inherited', which starts from the prototypes; "
                          "set pipeline.prototypes: true so that the pipeline builds them (or "
                          "pipeline.prototypes_dir: a folder of `mpnas prototypes`)")
    method = exp.pipeline.retrain_method or exp.retrain.method
    try:  # the retrain section as the retrain stages run it
        dataclasses.replace(exp.retrain, method=method)
    except FieldError as exc:
        raise ConfigError(f"{exp.source}: {exc} (retraining with pipeline.retrain_method: {method})") from None
    if budgets is None:
        budgets = [(f"pipeline.budgets[{i}]", b) for i, b in enumerate(exp.pipeline.budgets)]
    check_space(exp, experiment_model(exp, corpus, checkpoint), budgets)
    if exp.pipeline.uses_prototypes and not any(b < 16 for b in (exp.space or {}).get("bits", DEFAULT_BITS)):
        raise ConfigError(f"{exp.source}: 'pipeline.prototypes' is true, but space.bits has no width below 16 "
                          "to build a prototype of")
    if exp.pipeline.prototypes_dir is not None:
        from nas.pipeline.prototypes import read_index, verify_prototypes

        widths = sorted({int(b) for b in (exp.space or {}).get("bits", DEFAULT_BITS) if b < 16})
        if checkpoint is not None:
            verify_prototypes(exp.pipeline.prototypes_dir, widths, checkpoint)
        elif not read_index(Path(exp.pipeline.prototypes_dir))["prototypes"]:
            raise ConfigError(f"{exp.source}: pipeline.prototypes_dir {exp.pipeline.prototypes_dir!r} holds no "
                              "prototypes (expected a folder made by `mpnas prototypes`)")
