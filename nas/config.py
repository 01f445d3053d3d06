"""Experiment files: one YAML per experiment, sections ``model data train retrain space budget search pipeline nni``.

Every key is checked: an unknown key or a value of the wrong type is a
:class:`ConfigError` naming the file and the dotted key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nas.data import CorpusOptions
from nas.errors import MpnasError
from search_spaces.models import MODEL_TYPES

PACKAGED_CONFIGS = Path(__file__).resolve().parent.parent / "search_spaces"


class ConfigError(MpnasError):
    """An experiment file is malformed; the message names the file and key."""


@dataclass
class DataSection:
    """Where the corpus is and how it is batched."""

    path: str | None = None  # folder; None means --data, then $MPNAS_DATA, then the PTB cache
    batch_size: int = 20
    bptt: int = 20  # LSTM: steps per truncated-BPTT chunk
    context: int = 64  # Transformer: training window length
    eval_batch_size: int = 10
    eval_stride: int = 32  # Transformer evaluation: new tokens scored per sliding window
    # "eos": a blank line is one <eos>, like every line (the LM benchmarks' token counts);
    # "skip": blank lines give no token (mpnas before issue 16)
    blank_lines: str = "eos"

    def __post_init__(self) -> None:
        if self.blank_lines not in ("eos", "skip"):
            raise ValueError(f"blank_lines must be 'eos' or 'skip', got {self.blank_lines!r}")

    def corpus_options(self) -> CorpusOptions:
        """How the corpus text of this experiment becomes tokens."""
        return CorpusOptions(blank_lines=self.blank_lines)  # type: ignore[arg-type]


@dataclass
class TrainSection:
    """Optimiser, schedule and bookkeeping of FP training."""

    optimizer: str = "sgd"  # sgd | adam | adamw
    lr: float = 1.0
    schedule: str = "step"  # step (Zaremba) | cosine | constant
    lr_decay: float = 0.5  # step: multiply per epoch once past decay_start_epoch
    decay_start_epoch: int = 4  # step: epochs run at full lr
    warmup_steps: int = 0  # cosine: linear warmup length
    weight_decay: float = 0.0
    clip: float = 5.0  # max global gradient norm; 0 disables clipping
    # mean: per-token mean cross-entropy. sum_time: summed over the time steps of a chunk and
    # averaged over the batch, as in Zaremba et al.'s TF code; their lr=1 assumes it (the
    # PyTorch word_language_model example's lr=20 with a mean loss is the same update).
    loss_reduction: str = "mean"
    epochs: int = 13
    max_steps_per_epoch: int | None = None  # cut epochs short (tests, smoke runs)
    # Tokens of the valid split (its first N) that the validation after every epoch scores: it
    # chooses best.pt (and, in retraining, the STE tail or the projected start). None = the
    # whole split. The reported valid_ppl / test_ppl are always of best.pt on the whole splits.
    valid_tokens: int | None = None
    seed: int = 0
    log_interval: int = 50

    def __post_init__(self) -> None:
        choices = {"optimizer": ("sgd", "adam", "adamw"), "schedule": ("step", "cosine", "constant"),
                   "loss_reduction": ("mean", "sum_time")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"{key} must be one of {allowed}, got {getattr(self, key)!r}")
        tokens = self.valid_tokens
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
            raise ValueError(f"valid_tokens = {tokens!r} must be a positive number of tokens "
                             "(or null: the whole valid split)")


@dataclass
class RetrainSection(TrainSection):
    """Quantization-aware retraining from an FP checkpoint (optimiser keys as in ``train``)."""

    # ste | admm. STE is the default because it retrains converged FP models best (RESULTS, "Uniform
    # precision from the reference checkpoints": ADMM's pull only hurt at every rho TPE tried).
    method: str = "ste"
    epochs: int = 3
    rho: float = 1e-3  # ADMM: initial penalty weight (0 = STE with the quantized forward); pull step lr*rho*loss scale
    rho_growth: float = 1.0  # ADMM: rho = rho * rho_growth ** (epochs trained), set at each projection
    rho_max: float = 1.0
    project_every: int = 200  # ADMM: steps between projections (= dual updates); STE: between scale re-solves
    project_every_epochs: float = 0.0  # > 0: the same period in epochs (replaces project_every)
    admm_forward: str = "quantized"  # ADMM W step: gradient at Q(W) (straight-through) | "latent": at W (papers)
    # Learned scales (LSQ, nas/ste.py): start at the least-squares scales, then Adam on log alpha at
    # scale_lr instead of re-solving every period. STE and ADMM (quantized forward).
    learn_scales: bool = False
    scale_lr: float = 1e-3
    # the clipped straight-through estimator of LSQ: no gradient for weights beyond the table's
    # range (|W/alpha| > qmax); default: the identity estimator (every weight gets its gradient)
    ste_clip: bool = False
    # Where each quantized cluster starts: "fp" (the FP checkpoint's weights) or "inherited" (its
    # weights in the uniform prototype of the cluster's width; `mpnas prototypes`, nas/prototypes.py)
    init: str = "fp"
    ste_finetune_steps: int = 0  # ADMM: optional STE fine-tune after the final projection
    # Knowledge distillation from the FP checkpoint (nas/distill.py): weight of the teacher's
    # soft-target KL in the loss (0 = off, 1 = soft targets only) and its softmax temperature.
    distill: float = 0.0
    distill_temperature: float = 1.0
    dropout: float | None = None  # replaces the checkpoint's model dropout while retraining

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.method not in ("admm", "ste"):
            raise ValueError(f"method must be one of ('admm', 'ste'), got {self.method!r}")
        if self.rho < 0 or self.rho_max < self.rho or self.rho_growth < 1:
            raise ValueError(f"need 0 <= rho <= rho_max and rho_growth >= 1, got rho={self.rho}, "
                             f"rho_max={self.rho_max}, rho_growth={self.rho_growth}")
        if self.project_every < 1 or self.ste_finetune_steps < 0 or self.project_every_epochs < 0:
            raise ValueError(f"project_every must be >= 1, project_every_epochs >= 0 and ste_finetune_steps >= 0; "
                             f"got {self.project_every}, {self.project_every_epochs}, {self.ste_finetune_steps}")
        if self.admm_forward not in ("quantized", "latent"):
            raise ValueError(f"admm_forward must be 'quantized' or 'latent', got {self.admm_forward!r}")
        if self.init not in ("fp", "inherited"):
            raise ValueError(f"init must be 'fp' or 'inherited', got {self.init!r}")
        if not self.scale_lr > 0:
            raise ValueError(f"scale_lr must be > 0, got {self.scale_lr}")
        if self.learn_scales and self.method == "admm" and self.admm_forward == "latent":
            raise ValueError("learn_scales needs admm_forward: quantized (the latent forward takes no gradient at "
                             "the quantized weights)")
        if not 0.0 <= self.distill <= 1.0:
            raise ValueError(f"distill must be a weight in [0, 1], got {self.distill}")
        if self.distill_temperature <= 0:
            raise ValueError(f"distill_temperature must be > 0, got {self.distill_temperature}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


@dataclass
class SearchSection:
    """How a precision map is searched (``mpnas search``); see nas/strategies.py."""

    strategy: str = "gumbel"  # gumbel | kl | hessian | uniform | random
    seed: int = 0
    # gumbel (nas/gumbel.py): supernet training
    epochs: float = 1.0
    weight_lr: float = 0.05
    arch_lr: float = 0.01
    lambda_lr: float = 0.01
    lambda_kp: float = 10.0
    tau_start: float = 5.0
    tau_end: float = 0.5
    bilevel: bool = True
    arch_fraction: float = 0.1
    rescale_every: int = 50
    fill_budget: bool = True  # export spends the bits the argmax leaves unused (nas/gumbel.py)
    # kl: tokens of the held-out slice (the start of the valid split)
    kl_tokens: int = 10000
    # hessian: batches of the loss, probe type, stopping rule. hessian_tol is the relative standard
    # error (std error / |trace|) each cluster's Hutchinson trace must reach before it gets no more
    # probes; hessian_max_iters caps the Hessian-vector products (meta.hutchinson.capped lists the
    # clusters it stopped). PTB LSTM reference, one batch: 258 products at 0.05 (README, "Search a
    # precision map").
    hessian_batches: int = 4
    hessian_probes: str = "rademacher"
    hessian_max_iters: int = 1000
    hessian_tol: float = 0.05
    hessian_per_weight: bool = False

    def __post_init__(self) -> None:
        strategies = ("gumbel", "kl", "hessian", "uniform", "random")
        if self.strategy not in strategies:
            raise ValueError(f"strategy must be one of {strategies}, got {self.strategy!r}")
        if self.hessian_probes not in ("rademacher", "gaussian"):
            raise ValueError(f"hessian_probes must be 'rademacher' or 'gaussian', got {self.hessian_probes!r}")


STRATEGY_NAMES = ("gumbel", "kl", "hessian", "uniform", "random")


@dataclass
class PipelineSection:
    """What ``mpnas pipeline`` runs: every strategy at every budget (see nas/pipeline.py).

    ``budgets`` are average bits per weight (the ``avg_bits`` budget kind); ``retrain_method``
    None means ``retrain.method``; ``include_uniform`` adds the uniform baseline at every
    integer budget, so that reports show uniform points beside the searched ones.
    """

    strategies: list[str] = field(default_factory=lambda: ["kl", "gumbel"])
    budgets: list[float] = field(default_factory=lambda: [2.0])
    retrain_method: str | None = None  # admm | ste | None (= retrain.method)
    include_uniform: bool = True
    # build uniform prototypes (space.bits below 16) after FP; kl and hessian then score on them,
    # and retrain.init: inherited starts from them (nas/prototypes.py)
    prototypes: bool = False

    def __post_init__(self) -> None:
        if not self.strategies:
            raise ValueError("'pipeline.strategies' must list at least one strategy")
        for i, name in enumerate(self.strategies):
            if name not in STRATEGY_NAMES:
                raise ValueError(f"'pipeline.strategies[{i}]' = {name!r} is not one of {STRATEGY_NAMES}")
            if name in self.strategies[:i]:
                raise ValueError(f"'pipeline.strategies[{i}]' = {name!r} is listed twice")
        if not self.budgets:
            raise ValueError("'pipeline.budgets' must list at least one budget (average bits)")
        labels: list[str] = []
        for i, value in enumerate(self.budgets):
            if not 0 < value <= 32:
                raise ValueError(f"'pipeline.budgets[{i}]' = {value!r} must be average bits in (0, 32]")
            if f"{value:g}" in labels:
                raise ValueError(f"'pipeline.budgets[{i}]' = {value!r} is listed twice")
            labels.append(f"{value:g}")
        self.budgets = [float(b) for b in self.budgets]
        if self.retrain_method not in (None, "admm", "ste"):
            raise ValueError(f"'pipeline.retrain_method' = {self.retrain_method!r} is not one of "
                             "('admm', 'ste') (or leave it out to use retrain.method)")


@dataclass
class ExperimentConfig:
    """A parsed experiment file."""

    model: dict[str, Any]
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    retrain: RetrainSection = field(default_factory=RetrainSection)
    search: SearchSection = field(default_factory=SearchSection)
    pipeline: PipelineSection = field(default_factory=PipelineSection)
    space: dict[str, Any] | None = None  # validated against the model by search_spaces.space
    budget: dict[str, Any] | None = None
    nni: dict[str, Any] | None = None  # `mpnas nni` settings, validated by nas.nni_launcher
    source: str = "<memory>"

    @property
    def model_type(self) -> str:
        return str(self.model["type"])

    def model_kwargs(self) -> dict[str, Any]:
        return {k: v for k, v in self.model.items() if k != "type"}

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (the YAML it came from, with defaults filled in)."""
        return {"model": dict(self.model), "data": dataclasses.asdict(self.data),
                "train": dataclasses.asdict(self.train), "retrain": dataclasses.asdict(self.retrain),
                "search": dataclasses.asdict(self.search), "pipeline": dataclasses.asdict(self.pipeline),
                "space": self.space, "budget": self.budget, "nni": self.nni}


def _type_ok(value: Any, annotation: Any) -> bool:
    """Whether ``value`` fits a simple annotation (int, float, bool, str, X | None)."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"Any": Any}, {})  # noqa: S307 - our own dataclass annotations
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is Any:
        return True
    if origin is list:
        (item,) = typing.get_args(annotation) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    return isinstance(value, annotation)


def _build_section(cls: type, raw: Any, source: str, section: str) -> Any:
    """Instantiate dataclass ``cls`` from ``raw``, checking keys and types."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: section '{section}' must be a mapping, got {type(raw).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown key '{section}.{key}' (expected one of "
                              f"{', '.join(sorted(known))})")
        if not _type_ok(value, known[key].type):
            raise ConfigError(f"{source}: '{section}.{key}' = {value!r} has the wrong type "
                              f"(expected {known[key].type})")
        if isinstance(value, int) and not isinstance(value, bool) and known[key].type == "float":
            raw = {**raw, key: float(value)}
    try:
        return cls(**raw)
    except ValueError as exc:
        raise ConfigError(f"{source}: section '{section}': {exc}") from exc


def parse_config(raw: Any, source: str = "<memory>") -> ExperimentConfig:
    """Validate a loaded YAML document into an :class:`ExperimentConfig`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping with sections model, data, train, retrain, space, "
                          "budget, search, pipeline, nni")
    sections = {"model", "data", "train", "retrain", "space", "budget", "search", "pipeline", "nni"}
    for key in raw:
        if key not in sections:
            raise ConfigError(f"{source}: unknown section '{key}' (expected {', '.join(sorted(sections))})")
    model = raw.get("model")
    if not isinstance(model, dict) or "type" not in model:
        raise ConfigError(f"{source}: section 'model' needs a 'type' ({' or '.join(MODEL_TYPES)})")
    if model["type"] not in MODEL_TYPES:
        raise ConfigError(f"{source}: 'model.type' = {model['type']!r} is not one of {sorted(MODEL_TYPES)}")
    config_cls = MODEL_TYPES[model["type"]][0]
    checked = _build_section(config_cls, {k: v for k, v in model.items() if k != "type"}, source, "model")
    model_dict = {"type": model["type"], **dataclasses.asdict(checked)}
    data = _build_section(DataSection, raw.get("data"), source, "data")
    train = _build_section(TrainSection, raw.get("train"), source, "train")
    retrain = _build_section(RetrainSection, raw.get("retrain"), source, "retrain")
    search = _build_section(SearchSection, raw.get("search"), source, "search")
    pipeline = _build_section(PipelineSection, raw.get("pipeline"), source, "pipeline")
    for key in ("space", "budget", "nni"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise ConfigError(f"{source}: section '{key}' must be a mapping, got {type(raw[key]).__name__}")
    positive = {"data.batch_size": data.batch_size, "data.bptt": data.bptt, "data.context": data.context,
                "data.eval_batch_size": data.eval_batch_size, "data.eval_stride": data.eval_stride,
                "train.epochs": train.epochs, "train.log_interval": train.log_interval}
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{source}: '{key}' = {value} must be >= 1")
    if model["type"] == "transformer" and data.context > model_dict["context"]:
        raise ConfigError(f"{source}: 'data.context' = {data.context} exceeds 'model.context' = "
                          f"{model_dict['context']}")
    return ExperimentConfig(model=model_dict, data=data, train=train, retrain=retrain, search=search,
                            pipeline=pipeline, space=raw.get("space"), budget=raw.get("budget"),
                            nni=raw.get("nni"), source=source)


def resolve_config_path(name: str | Path) -> Path:
    """A path as given, or the name of a packaged config (``quick``, ``ptb_lstm.yaml``)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (PACKAGED_CONFIGS / path.name, PACKAGED_CONFIGS / f"{path.name}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{name}: no such experiment file (packaged ones: "
                      f"{', '.join(sorted(p.stem for p in PACKAGED_CONFIGS.glob('*.yaml')))})")


def load_config(path: str | Path) -> ExperimentConfig:
    """Read and validate an experiment YAML file."""
    path = resolve_config_path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return parse_config(raw, str(path))
