"""Language models that mpnas quantizes: an explicit-gate LSTM and a causal Transformer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from torch import nn

from search_spaces.models.lstm_lm import LSTMLM, LMOutput, LSTMConfig, from_torch_lstm, to_torch_lstm
from search_spaces.models.protocol import LanguageModel, ModuleLM, RecurrentLanguageModel, as_lm, unwrap
from search_spaces.models.transformer_lm import TransformerConfig, TransformerLM

MODEL_TYPES: dict[str, tuple[type, type[nn.Module]]] = {
    "lstm": (LSTMConfig, LSTMLM),
    "transformer": (TransformerConfig, TransformerLM),
}

__all__ = ["LMOutput", "LSTMConfig", "LSTMLM", "LanguageModel", "MODEL_TYPES", "ModuleLM", "RecurrentLanguageModel",
           "TransformerConfig", "TransformerLM", "as_lm", "build_model", "from_torch_lstm", "model_config_dict",
           "to_torch_lstm", "unwrap"]


def build_model(kind: str, **kwargs: object) -> nn.Module:
    """Build a model of ``kind`` ('lstm' or 'transformer') from config keyword arguments."""
    if kind not in MODEL_TYPES:
        raise ValueError(f"unknown model type {kind!r}; expected one of {sorted(MODEL_TYPES)}")
    config_cls, model_cls = MODEL_TYPES[kind]
    return model_cls(config_cls(**kwargs))


def model_config_dict(model: nn.Module) -> dict[str, object]:
    """``{'type': kind, **config}``: enough to rebuild the model with :func:`build_model`."""
    for kind, (config_cls, model_cls) in MODEL_TYPES.items():
        if isinstance(model, model_cls):
            return {"type": kind, **{f.name: getattr(model.config, f.name) for f in fields(config_cls)}}
    raise TypeError(f"not an mpnas model: {type(model).__name__}")


def model_from_config(config: Mapping[str, Any]) -> nn.Module:
    """The untrained model a checkpoint's ``config`` (``{"type": ..., **shape}``) describes."""
    kwargs = dict(config)
    return build_model(kwargs.pop("type"), **kwargs)


def restore_model(ckpt: Mapping[str, Any]) -> nn.Module:
    """The model of a loaded checkpoint: built from its ``config``, with its ``model`` weights."""
    model = model_from_config(ckpt["config"])
    model.load_state_dict(ckpt["model"])
    return model
