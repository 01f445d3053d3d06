"""Experiment files: one YAML per experiment, sections ``model data train retrain space budget search pipeline nni``.

One schema, checked when the file is read: an unknown key, a value of the wrong type or out of
its range is a :class:`ConfigError` naming the file, the dotted key, the value and what was
expected (``exp.yaml: 'search.arch_fraction' = 2.0 must be in (0, 1)``). Each field of a
section carries its range (:class:`Check`, in the field's metadata); the sections' own
``__post_init__`` adds the checks between fields (``search.tau_end <= search.tau_start``), so a
section built in Python or by ``dataclasses.replace`` is checked the same way (a
:class:`FieldError`). What needs the model (``space``, ``budget`` feasibility) is
checked by :mod:`nas.pipeline.preflight` before any training starts.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from nas.config.defaults import MIN_PROBES, GumbelSettings
from nas.config.schema import Check as Check  # re-exported: the schema's names, importable with the sections
from nas.config.schema import (
    ConfigError,
    FieldError,
    bounded,
    build_section,
    check_fields,
    number_text,
    one_of,
)
from nas.core.data import CorpusOptions
from search_spaces.models import MODEL_TYPES
from search_spaces.space import Budget
from search_spaces.space_parsing import SpaceError

PACKAGED_CONFIGS = Path(__file__).resolve().parents[2] / "search_spaces"
STRATEGY_NAMES = ("gumbel", "kl", "hessian", "uniform", "random")
MAX_SEED = 2**32 - 1  # NNI's tuners seed numpy, which takes 32-bit seeds


@dataclass
class DataSection:
    """Where the corpus is and how it is batched."""

    SECTION: ClassVar[str] = "data"
    path: str | None = None  # folder; None means --data, then $MPNAS_DATA, then the PTB cache
    batch_size: int = bounded(20, ge=1)
    bptt: int = bounded(20, ge=1)  # LSTM: steps per truncated-BPTT chunk
    context: int = bounded(64, ge=1)  # Transformer: training window length
    eval_batch_size: int = bounded(10, ge=1)
    eval_stride: int = bounded(32, ge=1)  # Transformer evaluation: new tokens scored per sliding window
    # "eos": a blank line is one <eos>, like every line (the LM benchmarks' token counts);
    # "skip": blank lines give no token (mpnas before issue 16)
    blank_lines: str = one_of("eos", "eos", "skip")

    def __post_init__(self) -> None:
        check_fields(self)

    def corpus_options(self) -> CorpusOptions:
        """How the corpus text of this experiment becomes tokens."""
        return CorpusOptions(blank_lines=self.blank_lines)  # type: ignore[arg-type]


@dataclass
class TrainSection:
    """Optimiser, schedule and bookkeeping of FP training."""

    SECTION: ClassVar[str] = "train"
    optimizer: str = one_of("sgd", "sgd", "adam", "adamw")
    lr: float = bounded(1.0, gt=0)
    schedule: str = one_of("step", "step", "cosine", "constant")  # step (Zaremba) | cosine | constant
    lr_decay: float = bounded(0.5, gt=0, le=1)  # step: multiply per epoch once past decay_start_epoch
    decay_start_epoch: int = bounded(4, ge=0)  # step: epochs run at full lr
    warmup_steps: int = bounded(0, ge=0)  # cosine: linear warmup length
    weight_decay: float = bounded(0.0, ge=0)
    clip: float = bounded(5.0, ge=0, note="(0 disables clipping)")  # max global gradient norm
    # mean: per-token mean cross-entropy. sum_time: summed over the time steps of a chunk and
    # averaged over the batch, as in Zaremba et al.'s TF code; their lr=1 assumes it (the
    # PyTorch word_language_model example's lr=20 with a mean loss is the same update).
    loss_reduction: str = one_of("mean", "mean", "sum_time")
    epochs: int = bounded(13, ge=1)
    max_steps_per_epoch: int | None = bounded(None, ge=1, note="(or null: whole epochs)")  # cut epochs short
    # Tokens of the valid split (its first N) that the validation after every epoch scores: it
    # chooses best.pt (and, in retraining, the STE tail or the projected start). None = the
    # whole split. The reported valid_ppl / test_ppl are always of best.pt on the whole splits.
    valid_tokens: int | None = bounded(None, ge=1, note="(tokens; or null: the whole valid split)")
    seed: int = bounded(0, ge=0, le=MAX_SEED)
    log_interval: int = bounded(50, ge=1)

    def __post_init__(self) -> None:
        check_fields(self)


RETRAIN_METHODS = ("ste", "admm")  # every retraining method, listed once


@dataclass
class RetrainSection(TrainSection):
    """Quantization-aware retraining from an FP checkpoint (optimiser keys as in ``train``)."""

    SECTION: ClassVar[str] = "retrain"
    # ste | admm. STE is the default because it retrains converged FP models best (RESULTS, "Uniform
    # precision from the reference checkpoints": ADMM's pull only hurt at every rho TPE tried).
    method: str = one_of("ste", *RETRAIN_METHODS)
    epochs: int = bounded(3, ge=1)
    # ADMM: initial penalty weight (0 = STE with the quantized forward); pull step lr*rho*loss scale
    rho: float = bounded(1e-3, ge=0)
    rho_growth: float = bounded(1.0, ge=1)  # ADMM: rho = rho * rho_growth ** (epochs trained), set at each projection
    rho_max: float = bounded(1.0, ge=0)  # and >= rho
    # ADMM: steps between projections (= dual updates); STE: between scale re-solves
    project_every: int = bounded(200, ge=1)
    project_every_epochs: float = bounded(0.0, ge=0)  # > 0: the same period in epochs (replaces project_every)
    # ADMM W step: gradient at Q(W) (straight-through) | "latent": at W (papers)
    admm_forward: str = one_of("quantized", "quantized", "latent")
    # Learned scales (LSQ, nas/retrain/ste.py): start at the least-squares scales, then Adam on log alpha at
    # scale_lr instead of re-solving every period. STE and ADMM (quantized forward).
    learn_scales: bool = False
    scale_lr: float = bounded(1e-3, gt=0)
    # the clipped straight-through estimator of LSQ: no gradient for weights beyond the table's
    # range (|W/alpha| > qmax); default: the identity estimator (every weight gets its gradient)
    ste_clip: bool = False
    # Where each quantized cluster starts: "fp" (the FP checkpoint's weights) or "inherited" (its
    # weights in the uniform prototype of the cluster's width; `mpnas prototypes`, nas/pipeline/prototypes.py)
    init: str = one_of("fp", "fp", "inherited")
    ste_finetune_steps: int = bounded(0, ge=0)  # ADMM: optional STE fine-tune after the final projection
    # Knowledge distillation from the FP checkpoint (nas/retrain/distill.py): weight of the teacher's
    # soft-target KL in the loss (0 = off, 1 = soft targets only) and its softmax temperature.
    distill: float = bounded(0.0, ge=0, le=1, note="(a weight: 0 = off, 1 = soft targets only)")
    distill_temperature: float = bounded(1.0, gt=0)
    # replaces the checkpoint's model dropout while retraining
    dropout: float | None = bounded(None, ge=0, lt=1, note="(or null: the checkpoint's)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rho_max < self.rho:
            raise FieldError("retrain.rho_max", self.rho_max, f">= retrain.rho ({number_text(self.rho)})")
        if self.learn_scales and self.method == "admm" and self.admm_forward == "latent":
            raise FieldError("retrain.learn_scales", self.learn_scales, "false with method admm and admm_forward "
                             "latent (the latent forward takes no gradient at the quantized weights; "
                             "use admm_forward: quantized)")


@dataclass
class SearchSection:
    """How a precision map is searched (``mpnas search``); see nas/search/strategies.py."""

    SECTION: ClassVar[str] = "search"
    strategy: str = one_of("gumbel", *STRATEGY_NAMES)
    seed: int = bounded(0, ge=0, le=MAX_SEED)
    # gumbel (nas/search/gumbel.py): supernet training; the defaults are GumbelSettings' (defined there once)
    epochs: float = bounded(GumbelSettings.epochs, gt=0)
    weight_lr: float = bounded(GumbelSettings.weight_lr, gt=0)
    arch_lr: float = bounded(GumbelSettings.arch_lr, gt=0)
    lambda_lr: float = bounded(GumbelSettings.lambda_lr, ge=0)
    lambda_kp: float = bounded(GumbelSettings.lambda_kp, ge=0)
    tau_start: float = bounded(GumbelSettings.tau_start, gt=0)
    tau_end: float = bounded(GumbelSettings.tau_end, gt=0)  # and <= tau_start: the temperature anneals down
    bilevel: bool = GumbelSettings.bilevel
    # tail of the train split held out for the logits
    arch_fraction: float = bounded(GumbelSettings.arch_fraction, gt=0, lt=1)
    rescale_every: int = bounded(GumbelSettings.rescale_every, ge=1)
    fill_budget: bool = GumbelSettings.fill_budget  # export spends the bits the argmax leaves unused (gumbel.py)
    # kl: tokens of the held-out slice (the start of the valid split)
    kl_tokens: int = bounded(10000, ge=1)
    # hessian: batches of the loss, probe type, stopping rule. hessian_tol is the relative standard
    # error (std error / |trace|) each cluster's Hutchinson trace must reach before it gets no more
    # probes; hessian_max_iters caps the Hessian-vector products (meta.hutchinson.capped lists the
    # clusters it stopped). PTB LSTM reference, one batch: 258 products at 0.05 (README, "Search a
    # precision map"). The cap must allow the MIN_PROBES (30) probes the stopping rule takes at
    # least per cluster (nas/search/sensitivity.py): below them no cluster could meet hessian_tol.
    hessian_batches: int = bounded(4, ge=1)
    hessian_probes: str = one_of("rademacher", "rademacher", "gaussian")
    hessian_max_iters: int = bounded(1000, ge=MIN_PROBES, note="(the probes per cluster the stopping rule takes "
                                     "at least before it can stop, nas/search/sensitivity.py)")
    hessian_tol: float = bounded(0.05, ge=0, note="(a relative standard error; 0 runs every cluster to "
                                 "hessian_max_iters)")
    hessian_per_weight: bool = False

    def __post_init__(self) -> None:
        check_fields(self)
        if self.tau_end > self.tau_start:
            raise FieldError("search.tau_end", self.tau_end, f"<= search.tau_start ({number_text(self.tau_start)}): "
                             "the temperature anneals from tau_start down to tau_end")


@dataclass
class PipelineSection:
    """What ``mpnas pipeline`` runs: every strategy at every budget (see nas/pipeline/runner.py).

    ``budgets`` are average bits per weight (the ``avg_bits`` budget kind); ``retrain_method``
    None means ``retrain.method``; ``include_uniform`` adds the uniform baseline at every
    integer budget, so that reports show uniform points beside the searched ones.
    """

    SECTION: ClassVar[str] = "pipeline"
    strategies: list[str] = field(default_factory=lambda: ["kl", "gumbel"])
    budgets: list[float] = field(default_factory=lambda: [2.0])
    retrain_method: str | None = one_of(None, *RETRAIN_METHODS, note="(or leave it out: retrain.method)")
    include_uniform: bool = True
    # build uniform prototypes (space.bits below 16) after FP; kl and hessian then score on them,
    # and retrain.init: inherited starts from them (nas/pipeline/prototypes.py)
    prototypes: bool = False
    # use this folder of `mpnas prototypes` instead of building prototypes (implies prototypes);
    # relative paths are relative to the working directory, like data.path
    prototypes_dir: str | None = None
    # with prototypes: kl and hessian score, and gumbel's supernet mixes, the prototypes' weights
    # (the papers' way); false keeps them on the FP weights (post-training quantization), so that
    # retrain.init: inherited can be compared on the same maps
    search_on_prototypes: bool = True

    @property
    def uses_prototypes(self) -> bool:
        """Whether the pipeline searches and fine-tunes on prototypes (built or given)."""
        return self.prototypes or self.prototypes_dir is not None

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.strategies:
            raise FieldError("pipeline.strategies", self.strategies, "a non-empty list of strategies")
        for i, name in enumerate(self.strategies):
            if name not in STRATEGY_NAMES:
                raise FieldError(f"pipeline.strategies[{i}]", name, f"one of {STRATEGY_NAMES}")
            if name in self.strategies[:i]:
                raise FieldError(f"pipeline.strategies[{i}]", name, "listed once (it is listed twice)")
        if not self.budgets:
            raise FieldError("pipeline.budgets", self.budgets, "a non-empty list of budgets (average bits)")
        labels: list[str] = []
        for i, value in enumerate(self.budgets):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value <= 32:
                raise FieldError(f"pipeline.budgets[{i}]", value, "average bits in (0, 32]")
            if f"{value:g}" in labels:
                raise FieldError(f"pipeline.budgets[{i}]", value, "listed once (it is listed twice)")
            labels.append(f"{value:g}")
        self.budgets = [float(b) for b in self.budgets]


# --- the ``nni`` section (`mpnas nni`, nas/nni/launcher.py) ------------------------------------

MODES = ("hparams", "bits")
TUNERS = ("TPE", "Random", "Evolution")
OBJECTIVES = ("valid_ppl", "test_ppl")


@dataclass(frozen=True)
class NniSettings:
    """The ``nni`` section (see nas/nni/launcher.py); validated on construction."""

    SECTION: ClassVar[str] = "nni"
    mode: str = one_of("hparams", *MODES)
    tuner: str = one_of("TPE", *TUNERS)
    trials: int = bounded(10, ge=1)
    concurrency: int = bounded(1, ge=1)
    max_seconds: int = bounded(21600, ge=1)
    objective: str = one_of("valid_ppl", *OBJECTIVES)
    penalty: float = bounded(10.0, ge=0)
    seed: int | None = bounded(None, ge=0, le=MAX_SEED)
    population_size: int = bounded(16, ge=1)
    space: Any = None  # hparams mode: {key: {_type, _value}}; None = the default space

    def __post_init__(self) -> None:
        check_fields(self)
        if self.space is not None and not isinstance(self.space, dict):
            raise FieldError("nni.space", self.space, "a mapping of NNI search-space entries "
                             "({key: {_type: ..., _value: [...]}})")


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
    nni: dict[str, Any] | None = None  # `mpnas nni` settings as written (checked as NniSettings)
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
    checked = build_section(config_cls, {k: v for k, v in model.items() if k != "type"}, source, "model")
    model_dict = {"type": model["type"], **dataclasses.asdict(checked)}
    data = build_section(DataSection, raw.get("data"), source, "data")
    train = build_section(TrainSection, raw.get("train"), source, "train")
    retrain = build_section(RetrainSection, raw.get("retrain"), source, "retrain")
    search = build_section(SearchSection, raw.get("search"), source, "search")
    pipeline = build_section(PipelineSection, raw.get("pipeline"), source, "pipeline")
    for key in ("space", "budget", "nni"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise ConfigError(f"{source}: section '{key}' must be a mapping, got {type(raw[key]).__name__}")
    build_section(NniSettings, raw.get("nni"), source, "nni")  # checked here; `mpnas nni` applies its options
    _check_budget_section(raw.get("budget"), source)
    if model["type"] == "transformer" and data.context > model_dict["context"]:
        raise ConfigError(f"{source}: 'data.context' = {data.context} exceeds 'model.context' = "
                          f"{model_dict['context']}")
    return ExperimentConfig(model=model_dict, data=data, train=train, retrain=retrain, search=search,
                            pipeline=pipeline, space=raw.get("space"), budget=raw.get("budget"),
                            nni=raw.get("nni"), source=source)


def _check_budget_section(raw: Any, source: str) -> None:
    """The ``budget`` section's form (one kind, a positive amount); its feasibility needs the model."""
    try:
        Budget.from_config(raw, source)
    except SpaceError as exc:
        raise ConfigError(str(exc)) from exc


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
