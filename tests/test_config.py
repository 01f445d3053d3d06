"""Experiment files: packaged configs load; every malformed key is named."""

from __future__ import annotations

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any

import pytest

from nas.config.sections import (
    ConfigError,
    DataSection,
    PipelineSection,
    RetrainSection,
    SearchSection,
    TrainSection,
    load_config,
    parse_config,
)
from nas.nni.space import NniSettings


@pytest.mark.parametrize("name", ["quick", "ptb_lstm", "ptb_transformer.yaml"])
def test_packaged_configs_load(name: str) -> None:
    exp = load_config(name)
    assert exp.model_type in {"lstm", "transformer"}
    assert exp.train.epochs >= 1


def test_ptb_lstm_is_the_zaremba_small_recipe() -> None:
    exp = load_config("ptb_lstm")
    assert (exp.model["hidden_dim"], exp.model["num_layers"], exp.model["dropout"]) == (200, 2, 0.0)
    assert (exp.train.optimizer, exp.train.lr, exp.train.lr_decay, exp.train.clip, exp.train.epochs) == \
        ("sgd", 1.0, 0.5, 5.0, 13)
    assert (exp.data.batch_size, exp.data.bptt) == (20, 20)


def test_ptb_transformer_has_six_layers() -> None:
    assert load_config("ptb_transformer").model["num_layers"] == 6


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(("text", "message"), [
    ("model: {type: lstm, hiden_dim: 3}", r"unknown key 'model\.hiden_dim'"),
    ("model: {type: lstm}\ntrain: {lr: fast}", r"'train\.lr' = 'fast' has the wrong type"),
    ("model: {type: lstm}\ndata: {batch_size: 2.5}", r"'data\.batch_size' = 2\.5 has the wrong type"),
    ("model: {type: lstm, tie_weights: 1}", r"'model\.tie_weights' = 1 has the wrong type"),
    ("model: {type: lstm}\ntrain: {optimizer: rmsprop}", r"'train\.optimizer' = 'rmsprop' must be one of"),
    ("model: {type: lstm}\nextra: {}", r"unknown section 'extra'"),
    ("model: {type: gru}", r"'model\.type' = 'gru' is not one of"),
    ("data: {}", r"section 'model' needs a 'type'"),
    ("model: {type: lstm}\ndata: [1, 2]", r"section 'data' must be a mapping"),
    ("model: {type: lstm}\ndata: {bptt: 0}", r"'data\.bptt' = 0 must be >= 1"),
    ("model: {type: transformer, context: 16}\ndata: {context: 32}", r"'data\.context' = 32 exceeds"),
    ("model: {type: lstm, dropout: 1.5}", r"dropout must be in \[0, 1\)"),
    ("model: {type: lstm, init_range: 0}", r"init_range must be a finite number > 0"),
    ("model: {type: transformer, init_std: -0.02}", r"init_std must be a finite number > 0"),
    ("model: [unclosed", r"not valid YAML"),
])
def test_bad_configs_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_ints_are_accepted_for_floats_and_defaults_fill_in() -> None:
    exp = parse_config({"model": {"type": "lstm"}, "train": {"lr": 1}})
    assert exp.train.lr == 1.0 and isinstance(exp.train.lr, float)
    assert exp.data.batch_size == 20


def test_missing_file_lists_packaged_configs() -> None:
    with pytest.raises(ConfigError, match=r"no such experiment file.*quick"):
        load_config("does_not_exist")


# --- one schema: a range on every field, unknown keys rejected everywhere ------------------------

SECTIONS = {"data": DataSection, "train": TrainSection, "retrain": RetrainSection, "search": SearchSection,
            "pipeline": PipelineSection, "nni": NniSettings}


def _out_of_range(check: Any, annotation: str) -> list[Any]:
    """Values just outside ``check`` (and the non-finite numbers, for every numeric field)."""
    if check.choices is not None:
        return ["nope"]
    integer = annotation.startswith("int")
    step = 1 if integer else 0.5
    values: list[Any] = []
    if check.ge is not None:
        values.append(check.ge - step)
    if check.gt is not None:
        values.append(check.gt)
    if check.le is not None:
        values.append(check.le + step)
    if check.lt is not None:
        values.append(check.lt)
    if not integer:
        values = [float(v) for v in values] + [math.nan, math.inf]
    return values


def _field_cases() -> list[tuple[str, str, Any]]:
    cases = []
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            check = f.metadata.get("check")
            if check is not None:
                cases += [(section, f.name, value) for value in _out_of_range(check, str(f.type))]
    return cases


@pytest.mark.parametrize(("section", "key", "value"), _field_cases())
def test_every_field_is_range_checked(section: str, key: str, value: Any) -> None:
    """Each out-of-range value is a ConfigError naming the file, 'section.key', the value and the range."""
    with pytest.raises(ConfigError) as info:
        parse_config({"model": {"type": "lstm"}, section: {key: value}}, "exp.yaml")
    message = str(info.value)
    assert message.startswith(f"exp.yaml: '{section}.{key}' = {value!r} must be "), message


def test_every_numeric_or_choice_field_has_a_range() -> None:
    """A new int, float or str field without a range fails here (bools and paths have none)."""
    unchecked = [f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)
                 if "check" not in f.metadata and not str(f.type).startswith(("bool", "list", "Any"))]
    assert unchecked == ["data.path", "pipeline.prototypes_dir"]


@pytest.mark.parametrize(("raw", "message"), [
    # the examples of issue 14: each was accepted and failed mid-search (or ran on nonsense)
    ({"search": {"tau_start": 1.0, "tau_end": 2.0}}, "'search.tau_end' = 2.0 must be <= search.tau_start (1)"),
    ({"search": {"arch_fraction": 2}}, "'search.arch_fraction' = 2.0 must be in (0, 1)"),
    ({"search": {"kl_tokens": -5}}, "'search.kl_tokens' = -5 must be >= 1"),
    ({"train": {"epochs": 0}}, "'train.epochs' = 0 must be >= 1"),
    ({"retrain": {"epochs": 0}}, "'retrain.epochs' = 0 must be >= 1"),
    ({"search": {"hessian_max_iters": 3}}, "'search.hessian_max_iters' = 3 must be >= 30 (the probes"),
    ({"search": {"hessian_tol": -0.1}}, "'search.hessian_tol' = -0.1 must be >= 0"),
    ({"train": {"lr": 0}}, "'train.lr' = 0.0 must be > 0"),
    ({"retrain": {"lr": -0.1}}, "'retrain.lr' = -0.1 must be > 0"),
    ({"data": {"batch_size": 0}}, "'data.batch_size' = 0 must be >= 1"),
    ({"data": {"eval_batch_size": 0}}, "'data.eval_batch_size' = 0 must be >= 1"),
    ({"train": {"clip": -1}}, "'train.clip' = -1.0 must be >= 0 (0 disables clipping)"),
    ({"train": {"warmup_steps": -1}}, "'train.warmup_steps' = -1 must be >= 0"),
    ({"retrain": {"weight_decay": -0.1}}, "'retrain.weight_decay' = -0.1 must be >= 0"),
    ({"retrain": {"dropout": 1.0}}, "'retrain.dropout' = 1.0 must be in [0, 1)"),
    ({"retrain": {"rho": 0.5, "rho_max": 0.1}}, "'retrain.rho_max' = 0.1 must be >= retrain.rho (0.5)"),
    ({"retrain": {"method": "admm", "admm_forward": "latent", "learn_scales": True}},
     "'retrain.learn_scales' = True must be false with method admm and admm_forward latent"),
    ({"train": {"lr_decay": 1.5}}, "'train.lr_decay' = 1.5 must be in (0, 1]"),
    ({"train": {"seed": -1}}, "'train.seed' = -1 must be in [0, 4294967295]"),
    ({"search": {"lr": 1}}, "unknown key 'search.lr'"),
    ({"nni": {"trials": 0}}, "'nni.trials' = 0 must be >= 1"),
    ({"nni": {"tunr": "TPE"}}, "unknown key 'nni.tunr'"),
    ({"budget": {"avg_bit": 2}}, "budget.avg_bit: unknown key"),
    ({"budget": {"avg_bits": 2, "size_mb": 1}}, "give exactly one of"),
    ({"budget": {"avg_bits": -2}}, "budget.avg_bits: expected a positive finite number"),
])
def test_bad_values_name_file_key_value_and_range(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"model": {"type": "lstm"}, **raw}, "exp.yaml")
    assert str(info.value).startswith("exp.yaml: ") and message in str(info.value), str(info.value)


@pytest.mark.parametrize("section", ["model", "data", "train", "retrain", "search", "pipeline", "nni", "budget"])
def test_unknown_keys_are_rejected_in_every_section(section: str) -> None:
    raw: dict[str, Any] = {"model": {"type": "lstm"}}
    raw[section] = {**raw.get(section, {}), "colour": 1}
    with pytest.raises(ConfigError, match=rf"exp\.yaml: .*{section}\.colour") as info:
        parse_config(raw, "exp.yaml")
    assert "unknown key" in str(info.value)


def test_sections_built_in_python_are_checked_too() -> None:
    """dataclasses.replace (CLI overrides, benchmarks, NNI trials) re-runs the same checks."""
    from nas.config.sections import FieldError

    with pytest.raises(FieldError, match=r"'search\.arch_fraction' = 2 must be in \(0, 1\)"):
        dataclasses.replace(SearchSection(), arch_fraction=2)
    with pytest.raises(FieldError, match=r"'retrain\.epochs' = None must be >= 1"):
        dataclasses.replace(RetrainSection(), epochs=None)
    with pytest.raises(ValueError, match=r"'pipeline\.retrain_method' = 'sgd'"):
        PipelineSection(retrain_method="sgd")
    assert dataclasses.replace(RetrainSection(), max_steps_per_epoch=None).max_steps_per_epoch is None


def test_packaged_and_benchmark_configs_pass_the_schema() -> None:
    from tests.conftest import REPO

    paths = sorted((REPO / "search_spaces").glob("*.yaml")) + sorted((REPO / "benchmarks").glob("*.yaml"))
    assert len(paths) >= 3
    for path in paths:
        load_config(path)


def test_optional_annotations_are_only_where_none_means_something() -> None:
    optional = {f"{section}.{f.name}" for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)
                if type(None) in typing.get_args(eval(str(f.type), {"Any": Any}))}  # noqa: S307
    assert optional == {"data.path", "train.max_steps_per_epoch", "train.valid_tokens",
                        "retrain.max_steps_per_epoch", "retrain.valid_tokens", "retrain.dropout",
                        "pipeline.retrain_method", "pipeline.prototypes_dir", "nni.seed"}
