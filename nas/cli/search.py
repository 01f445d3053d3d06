"""``mpnas space`` and ``mpnas search``: show a resolved search space, search a precision map."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from torch import nn

from nas.config.sections import STRATEGY_NAMES, ExperimentConfig, load_config
from nas.core.corpus_report import corpus_summary, describe_vocab_mismatch, format_corpus_summary
from nas.core.data import DataError, load_corpus, resolve_data_dir
from nas.core.errors import UsageError
from search_spaces.models import build_model, restore_model
from search_spaces.space import BUDGET_KINDS, SearchSpace


def parse_budget(text: str) -> dict[str, float]:
    """``2`` (average bits), ``avg_bits=2``, ``size_mb=1.5`` or ``compression=16``."""
    kind, _, value = text.rpartition("=")
    kind = kind or "avg_bits"
    if kind not in BUDGET_KINDS:
        raise UsageError(f"--budget {text!r}: unknown kind {kind!r}; expected one of {BUDGET_KINDS}")
    try:
        return {kind: float(value)}
    except ValueError:
        raise UsageError(f"--budget {text!r}: {value!r} is not a number") from None


def model_for(exp: ExperimentConfig, checkpoint: str | None, vocab_size: int | None) -> tuple[nn.Module, Any]:
    """The FP model of a checkpoint (with its weights), or the config's model untrained."""
    if checkpoint:
        from nas.retrain.run import load_fp_checkpoint

        ckpt = load_fp_checkpoint(checkpoint)
        model = restore_model(ckpt)
        return model, ckpt
    kwargs = exp.model_kwargs()
    if vocab_size is not None:
        kwargs["vocab_size"] = vocab_size
    return build_model(exp.model_type, **kwargs), None


def cmd_space(args: argparse.Namespace) -> int:
    """Print the resolved clusters, candidates and reachable sizes of an experiment's space."""
    exp = load_config(args.config)
    vocab_size = None
    if not args.checkpoint:
        corpus = load_corpus(resolve_data_dir(args.data or exp.data.path), exp.data.corpus_options())
        print(format_corpus_summary(corpus_summary(corpus)))
        vocab_size = len(corpus.vocab)
    model, _ = model_for(exp, args.checkpoint, vocab_size)
    budget = parse_budget(args.budget) if args.budget else exp.budget
    space = SearchSpace.from_config(exp.space, budget, model, exp.source)
    print(space.describe(model))
    if args.nni:
        print(json.dumps(space.to_nni(), indent=2))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    """Search a precision map with one strategy at one budget; writes the map file."""
    from nas.search.base import SearchData
    from nas.search.strategies import get_strategy

    exp = load_config(args.config)
    corpus = load_corpus(resolve_data_dir(args.data or exp.data.path), exp.data.corpus_options())
    model, ckpt = model_for(exp, args.checkpoint, len(corpus.vocab))
    if ckpt is not None and "vocab" in ckpt and tuple(ckpt["vocab"]) != corpus.vocab.words:
        raise DataError(f"{args.checkpoint}: its vocabulary differs from the corpus in {corpus.folder}: "
                        f"{describe_vocab_mismatch(ckpt['vocab'], corpus.vocab.words)}")
    budget = parse_budget(args.budget) if args.budget else exp.budget
    if not budget:
        raise UsageError(f"{exp.source}: a search needs a budget (a `budget` section or --budget)")
    space = SearchSpace.from_config(exp.space, budget, model, exp.source)
    settings = exp.search
    if args.strategy:
        import dataclasses

        settings = dataclasses.replace(settings, strategy=args.strategy)
    recurrent = hasattr(model, "init_state")
    out = Path(args.out)
    prototypes = None
    if args.prototypes:
        from nas.retrain.prototype_store import load_prototypes, prototype_weights

        prototypes = prototype_weights(load_prototypes(args.prototypes), model)
    data = SearchData(train=corpus.train, valid=corpus.valid, batch_size=exp.data.batch_size,
                      length=exp.data.bptt if recurrent else exp.data.context, device=args.device,
                      cache_dir=Path(args.cache) if args.cache else out.parent / "score_cache", prototypes=prototypes)
    precision = get_strategy(settings.strategy).search(model, space, data, settings)
    meta = {**precision.meta, "budget": budget, "checkpoint": str(args.checkpoint)}
    precision = precision.with_meta(meta)
    precision.save(out)
    from search_spaces.size import model_size

    size = model_size(model, precision)
    print(f"{settings.strategy}: average bits {size['avg_bits']:.3f}, {size['theoretical_bytes'] / 1e6:.3f} MB, "
          f"compression {size['compression']:.2f}x, {precision.meta.get('wall_s', 0.0):.1f} s -> {out}")
    return 0


def add_space_parser(sub: Any) -> None:
    """Register ``mpnas space``."""
    p = sub.add_parser("space", help="show the resolved search space of an experiment file")
    p.add_argument("config", help="experiment YAML with `space` and `budget` sections")
    p.add_argument("--checkpoint", help="FP checkpoint (default: the config's model, untrained)")
    p.add_argument("--budget", help="override: 2 (avg bits), size_mb=1.5 or compression=16")
    p.add_argument("--nni", action="store_true", help="also print NNI's search-space JSON")
    p.set_defaults(func=cmd_space)


def add_search_parser(sub: Any) -> None:
    """Register ``mpnas search``."""
    p = sub.add_parser("search", help=f"search a precision map ({', '.join(STRATEGY_NAMES)})")
    p.add_argument("config", help="experiment YAML (its space, budget and search sections)")
    p.add_argument("--checkpoint", required=True, help="the FP best.pt to search from")
    p.add_argument("--strategy", choices=STRATEGY_NAMES)
    p.add_argument("--budget", help="override: 2 (avg bits), size_mb=1.5 or compression=16")
    p.add_argument("--out", required=True, help="precision map to write (.yaml or .json)")
    p.add_argument("--cache", help="score-table cache folder (default: OUT's folder/score_cache)")
    p.add_argument("--prototypes", help="prototype folder of `mpnas prototypes`: kl and hessian rate each width "
                   "by its retrained prototype instead of quantizing the FP weights")
    p.set_defaults(func=cmd_search)
