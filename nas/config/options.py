"""One small config dataclass per search strategy and per retraining method, for the library verbs (:mod:`nas.api`).

Field names are the keys of the experiment file's ``search`` / ``retrain`` / ``data`` sections
(``kl_tokens``, ``hessian_max_iters``, ``rho``, ``bptt``...), and every default is read from those
sections' dataclasses (:class:`~nas.config.sections.SearchSection`, :class:`~nas.config.sections.RetrainSection`,
:class:`~nas.config.sections.DataSection`), so it is defined once. A config is checked when it is built,
by the same schema as the experiment file (:meth:`StrategyConfig.section` builds the section).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from nas.config.sections import STRATEGY_NAMES, DataSection, RetrainSection, SearchSection, TrainSection


def default(section: type, name: str) -> Any:
    """The default of field ``name`` of the dataclass ``section`` (where the default is defined)."""
    spec = {f.name: f for f in dataclasses.fields(section)}[name]
    if spec.default is not dataclasses.MISSING:
        return spec.default
    return spec.default_factory()  # type: ignore[misc]


def _search(name: str) -> Any:
    return default(SearchSection, name)


def _retrain(name: str) -> Any:
    return default(RetrainSection, name)


@dataclass(frozen=True)
class StrategyConfig:
    """Settings of one search strategy; ``name`` is the strategy."""

    name: ClassVar[str] = ""
    seed: int = _search("seed")

    def __post_init__(self) -> None:
        self.section()  # the schema's checks, with its messages

    def section(self) -> SearchSection:
        """The ``search`` section these settings stand for (the other strategies' keys at their defaults)."""
        return SearchSection(strategy=self.name, **dataclasses.asdict(self))


@dataclass(frozen=True)
class KLConfig(StrategyConfig):
    """``kl``: one cluster quantized at a time, mean token KL on the first ``kl_tokens`` held-out tokens."""

    name: ClassVar[str] = "kl"
    kl_tokens: int = _search("kl_tokens")


@dataclass(frozen=True)
class HessianConfig(StrategyConfig):
    """``hessian``: Hutchinson traces on ``hessian_batches`` training batches, times the quantization error."""

    name: ClassVar[str] = "hessian"
    hessian_batches: int = _search("hessian_batches")
    hessian_probes: str = _search("hessian_probes")
    hessian_max_iters: int = _search("hessian_max_iters")
    hessian_tol: float = _search("hessian_tol")
    hessian_per_weight: bool = _search("hessian_per_weight")


@dataclass(frozen=True)
class GumbelConfig(StrategyConfig):
    """``gumbel``: the differentiable supernet (nas/search/gumbel.py)."""

    name: ClassVar[str] = "gumbel"
    epochs: float = _search("epochs")
    weight_lr: float = _search("weight_lr")
    arch_lr: float = _search("arch_lr")
    lambda_lr: float = _search("lambda_lr")
    lambda_kp: float = _search("lambda_kp")
    tau_start: float = _search("tau_start")
    tau_end: float = _search("tau_end")
    bilevel: bool = _search("bilevel")
    arch_fraction: float = _search("arch_fraction")
    rescale_every: int = _search("rescale_every")
    fill_budget: bool = _search("fill_budget")


@dataclass(frozen=True)
class UniformConfig(StrategyConfig):
    """``uniform``: the largest uniform width that fits the budget."""

    name: ClassVar[str] = "uniform"


@dataclass(frozen=True)
class RandomConfig(StrategyConfig):
    """``random``: seeded random maps, the one using most of the budget."""

    name: ClassVar[str] = "random"


# Keyed by each class's ``name``; tests/test_library_api.py checks they are nas.config.sections.STRATEGY_NAMES.
STRATEGY_CONFIGS: dict[str, type[StrategyConfig]] = {
    cls.name: cls for cls in (GumbelConfig, KLConfig, HessianConfig, UniformConfig, RandomConfig)
}


def strategy_config(strategy: str | StrategyConfig | None) -> StrategyConfig:
    """A strategy's config: given, or the defaults of the strategy named (None: ``search.strategy``'s default)."""
    if isinstance(strategy, StrategyConfig):
        return strategy
    name = _search("strategy") if strategy is None else strategy
    if name not in STRATEGY_CONFIGS:
        raise ValueError(f"unknown strategy {name!r}; expected one of {list(STRATEGY_NAMES)}")
    return STRATEGY_CONFIGS[name]()


@dataclass(frozen=True)
class RetrainConfig:
    """Settings of quantization-aware retraining shared by both methods; ``method`` names it.

    ``batch_size`` and ``bptt`` (recurrent models) or ``context`` (window models) cut a token stream
    into batches, as the ``data`` section does; ``max_steps_per_epoch`` cuts epochs short.
    """

    method: ClassVar[str] = ""
    epochs: int = _retrain("epochs")
    max_steps_per_epoch: int | None = _retrain("max_steps_per_epoch")
    optimizer: str = _retrain("optimizer")
    lr: float = _retrain("lr")
    weight_decay: float = _retrain("weight_decay")
    clip: float = _retrain("clip")
    loss_reduction: str = _retrain("loss_reduction")
    seed: int = _retrain("seed")
    project_every: int = _retrain("project_every")
    learn_scales: bool = _retrain("learn_scales")
    scale_lr: float = _retrain("scale_lr")
    ste_clip: bool = _retrain("ste_clip")
    batch_size: int = default(DataSection, "batch_size")
    bptt: int = default(DataSection, "bptt")
    context: int = default(DataSection, "context")

    def __post_init__(self) -> None:
        self.section()
        DataSection(batch_size=self.batch_size, bptt=self.bptt, context=self.context)

    def section(self) -> RetrainSection:
        """The ``retrain`` section these settings stand for (other keys at their defaults)."""
        keys = {f.name for f in dataclasses.fields(RetrainSection)} | {f.name for f in dataclasses.fields(TrainSection)}
        values = {k: v for k, v in dataclasses.asdict(self).items() if k in keys}
        return RetrainSection(method=self.method, **values)


@dataclass(frozen=True)
class SteConfig(RetrainConfig):
    """Straight-through retraining (nas/retrain/ste.py)."""

    method: ClassVar[str] = "ste"


@dataclass(frozen=True)
class AdmmConfig(RetrainConfig):
    """ADMM retraining (nas/retrain/admm.py): ``rho`` and its growth, and where the W step takes its gradient."""

    method: ClassVar[str] = "admm"
    rho: float = _retrain("rho")
    rho_growth: float = _retrain("rho_growth")
    rho_max: float = _retrain("rho_max")
    admm_forward: str = _retrain("admm_forward")


RETRAIN_CONFIGS: dict[str, type[RetrainConfig]] = {cls.method: cls for cls in (SteConfig, AdmmConfig)}
