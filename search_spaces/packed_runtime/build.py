"""Build a runnable model whose quantized weights stay packed: ``load_packed(path, keep_packed=True)``.

The skeleton of an mpnas model is built on the ``meta`` device, so no float32 weight is ever
allocated for a quantized tensor; a skeleton passed by the caller is filled in place (build it
under ``with torch.device("meta"):`` to skip its float32 allocation too). Then:

- float32 tensors of the file (biases, norms, 32-bit clusters, affine leftovers decoded to
  float32) become the model's parameters and buffers, as they are;
- each module holding a packed tensor is replaced: ``nn.Linear`` -> ``PackedLinear``,
  ``nn.Embedding`` -> ``PackedEmbedding``, a plain ``nn.LSTM`` -> ``PackedTorchLSTM``, and an
  mpnas ``LSTMLayer`` with packed gates -> ``PackedLSTMLayer``; any other module keeps its code
  and reads its packed parameter through a dequantizing attribute (``pack_parameter``);
- tied tensors stay one :class:`PackedTensor` shared by their modules.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from search_spaces.models import model_from_config
from search_spaces.models.lstm_lm import LSTMLayer
from search_spaces.packed_format import PLAIN_MODULE, PackedFileError, read_packed_header
from search_spaces.packed_runtime.lstm import PackedLSTMLayer, PackedTorchLSTM
from search_spaces.packed_runtime.modules import (
    PackedEmbedding,
    PackedLinear,
    PackedModule,
    PackedOptions,
    pack_parameter,
)
from search_spaces.packed_runtime.reader import PackedContents, read_packed_contents
from search_spaces.packed_runtime.tensor import PackedTensor
from search_spaces.precision import PrecisionMap
from search_spaces.size import model_size

logger = logging.getLogger(__name__)


def load_packed_model(path: str | Path, model: nn.Module | None = None, options: PackedOptions | None = None
                      ) -> tuple[nn.Module, PrecisionMap]:
    """The model of a packed file with its quantized weights kept packed, and its precision map.

    Same contract as :func:`search_spaces.packed.load_packed` (``model``: a skeleton to fill, needed
    for a plain torch module's file); the model is in eval mode and inference-only.
    """
    contents = read_packed_contents(path)  # every check of the file happens here, before any model
    config = dict(contents.header.get("model") or {})
    if model is None and config.get("type") == PLAIN_MODULE:
        raise PackedFileError(f"{path}: holds the weights of a plain torch module ({config.get('class')}), not "
                              "an mpnas model; pass model= a skeleton of that module to fill")
    try:
        if model is None:
            with torch.device("meta"):  # shapes only: no float32 copy of the quantized weights
                model = model_from_config(config)
        precision = PrecisionMap.from_dict(contents.header["precision"])
        precision.validate(model)
        _check_keys(model, contents)
        model.eval()
        fill_packed(model, contents, options or PackedOptions())
    except (KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise PackedFileError(f"{path}: header does not describe a loadable model ({exc})") from exc
    return model, precision


def packed_model_size(path: str | Path) -> dict[str, float]:
    """:func:`search_spaces.size.model_size` of an mpnas model's packed file, from its header alone."""
    header, _ = read_packed_header(path)
    config = dict(header.get("model") or {})
    if config.get("type") == PLAIN_MODULE:
        raise PackedFileError(f"{path}: holds a plain torch module; its size needs the module")
    with torch.device("meta"):
        skeleton = model_from_config(config)
    return model_size(skeleton, PrecisionMap.from_dict(header["precision"]))


def _check_keys(model: nn.Module, contents: PackedContents) -> None:
    """The file's tensors are exactly the model's state-dict entries, with the same shapes."""
    state = model.state_dict(keep_vars=True)
    stored = {**{k: t.shape for k, t in contents.packed.items()}, **{k: t.shape for k, t in contents.dense.items()}}
    missing = sorted(set(state) - set(stored))
    unexpected = sorted(set(stored) - set(state))
    wrong = [f"{k}: file {list(stored[k])}, model {list(state[k].shape)}" for k in state
             if k in stored and tuple(stored[k]) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        raise ValueError(f"missing keys {missing}, unexpected keys {unexpected}, shape mismatches {wrong}")


def _split(key: str) -> tuple[str, str]:
    module, _, name = key.rpartition(".")
    return module, name


def fill_packed(model: nn.Module, contents: PackedContents, options: PackedOptions) -> None:
    """Put the file's tensors into ``model`` (in place): float32 ones as parameters/buffers, packed
    ones through packed modules (see the module docstring)."""
    params: dict[int, nn.Parameter] = {}  # one Parameter per stored tensor keeps ties tied
    for key, tensor in contents.dense.items():
        owner_name, name = _split(key)
        owner = model.get_submodule(owner_name)
        if name in owner._buffers:
            setattr(owner, name, tensor)
        else:  # setattr, not _parameters[...]: nn.LSTM keeps its flat weight list in step
            setattr(owner, name, params.setdefault(id(tensor), nn.Parameter(tensor, requires_grad=False)))
    by_module: dict[str, dict[str, PackedTensor]] = {}
    for key, tensor in contents.packed.items():
        owner_name, name = _split(key)
        by_module.setdefault(owner_name, {})[name] = tensor
    for owner_name, tensors in by_module.items():
        _replace(model, owner_name, tensors, options)
    for name, module in list(model.named_modules()):
        if isinstance(module, LSTMLayer) and any(isinstance(m, PackedLinear) for m in module.modules()):
            _set_child(model, name, PackedLSTMLayer(module, options))
    for param in model.parameters():
        param.requires_grad_(False)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"tensors of the skeleton that the file does not fill: {left}")


def _set_child(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


def _replace(model: nn.Module, owner_name: str, tensors: dict[str, PackedTensor], options: PackedOptions) -> None:
    """Swap the module ``owner_name`` for its packed form, or give it dequantizing attributes."""
    module = model.get_submodule(owner_name)
    new: nn.Module | None = None
    if owner_name and set(tensors) == {"weight"}:
        if type(module) is nn.Linear:
            new = PackedLinear(tensors["weight"], module.bias, options)
        elif type(module) is nn.Embedding and module.max_norm is None:
            new = PackedEmbedding(tensors["weight"])
    if owner_name and type(module) is nn.LSTM and not module.bidirectional and not module.proj_size:
        weights = [tuple(tensors.get(f"{kind}_l{k}", getattr(module, f"{kind}_l{k}", None))
                         for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
                   for k in range(module.num_layers)]
        new = PackedTorchLSTM(module, weights, options)  # type: ignore[arg-type]
    if new is not None:
        _set_child(model, owner_name, new)
        return
    logger.info("%s (%s): no blockwise packed form; its packed %s dequantize whole on each read",
                owner_name or "<root>", type(module).__name__, ", ".join(sorted(tensors)))
    for name, tensor in tensors.items():
        pack_parameter(module, name, tensor)


def packed_tensors(model: nn.Module) -> list[PackedTensor]:
    """Every distinct :class:`PackedTensor` of a model loaded with ``keep_packed=True``."""
    found: dict[int, PackedTensor] = {}
    for module in model.modules():
        names = list(getattr(module, "packed_tensors", ())) if isinstance(module, PackedModule) else []
        for tensor in [getattr(module, n) for n in names] + list(getattr(module, "_mpnas_packed", {}).values()):
            found.setdefault(id(tensor), tensor)
    return list(found.values())


def resident_weight_bytes(model: nn.Module) -> int:
    """Bytes a packed model's weights hold: packed tensors, float32 parameters and buffers (each once)."""
    dense: dict[int, torch.Tensor] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        dense.setdefault(id(tensor), tensor)
    return (sum(t.resident_bytes() for t in packed_tensors(model))
            + sum(t.numel() * t.element_size() for t in dense.values()))
