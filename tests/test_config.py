"""Experiment files: packaged configs load; every malformed key is named."""

from __future__ import annotations

from pathlib import Path

import pytest

from nas.config import ConfigError, load_config, parse_config


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
    ("model: {type: lstm}\ntrain: {optimizer: rmsprop}", r"optimizer must be one of"),
    ("model: {type: lstm}\nextra: {}", r"unknown section 'extra'"),
    ("model: {type: gru}", r"'model\.type' = 'gru' is not one of"),
    ("data: {}", r"section 'model' needs a 'type'"),
    ("model: {type: lstm}\ndata: [1, 2]", r"section 'data' must be a mapping"),
    ("model: {type: lstm}\ndata: {bptt: 0}", r"'data\.bptt' = 0 must be >= 1"),
    ("model: {type: transformer, context: 16}\ndata: {context: 32}", r"'data\.context' = 32 exceeds"),
    ("model: {type: lstm, dropout: 1.5}", r"dropout must be in \[0, 1\)"),
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
