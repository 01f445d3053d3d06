"""Apply a :class:`~search_spaces.precision.PrecisionMap` to a model, in place.

- :func:`quantize_` hard-quantizes: every low-bit cluster's weights are replaced by their table
  values ``alpha * q`` and the codes and scales are returned for an exporter;
  :func:`quantize_all_` also returns the codes of the leftovers (``leftover_bits`` < 32).
- :func:`fake_quantize_` makes training see quantized weights (straight-through gradients to a
  latent FP weight) through ``torch.nn.utils.parametrize``; :func:`remove_fake_quantize_` undoes
  it, optionally baking the quantized values in.

Both also quantize the leftovers (every parameter outside the clusters, see
:func:`~search_spaces.clusters.find_leftovers`) when the map's ``leftover_bits`` is below 32,
with the per-tensor affine quantizer, so a model evaluated here is the model a packed file holds.

Both work on any module tree whose clusters :func:`~search_spaces.clusters.find_clusters`
finds: our LMs, and user models of ``nn.Linear``, ``nn.Embedding``, torch's ``nn.LSTM``/``nn.GRU``
and ``nn.MultiheadAttention`` (hence ``nn.TransformerEncoderLayer``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from search_spaces.clusters import cluster_parameter, cluster_weight, find_clusters, find_leftovers
from search_spaces.precision import PrecisionMap
from search_spaces.quant import (
    FULL_PRECISION,
    AffineResult,
    QuantResult,
    fake_quantize,
    fake_quantize_affine,
    quantize,
    quantize_affine,
)


class Quantized(NamedTuple):
    """What :func:`quantize_all_` wrote: codes and scales per cluster and per leftover tensor."""

    clusters: dict[str, QuantResult]  # cluster name -> result, clusters with bits < 32 only
    leftovers: dict[str, AffineResult]  # find_leftovers name -> result; empty at leftover_bits 32


@torch.no_grad()
def quantize_leftovers_(model: nn.Module, bits: int) -> dict[str, AffineResult]:
    """Quantize every leftover parameter in place at ``bits`` (32: nothing); return the results.

    Each result's ``weight`` is a detached view of the live (now quantized) tensor, so
    ``weight == dequantize_affine(codes, scale, low)`` holds exactly.
    """
    if bits == FULL_PRECISION:
        return {}
    results: dict[str, AffineResult] = {}
    for name, tensor in find_leftovers(model).items():
        result = quantize_affine(tensor, bits)
        tensor.copy_(result.weight)  # in place: keeps storage (cuDNN's flat LSTM buffer, ties)
        results[name] = result._replace(weight=tensor.detach())
    return results


@torch.no_grad()
def quantize_all_(model: nn.Module, precision_map: PrecisionMap) -> Quantized:
    """:func:`quantize_`, returning the leftovers' codes too (what a packed exporter needs)."""
    precision_map.validate(model)
    results: dict[str, QuantResult] = {}
    for name, cluster in find_clusters(model).items():
        bits = precision_map.bits[name]
        if bits == FULL_PRECISION:
            continue
        view = cluster_weight(model, cluster)
        result = quantize(view, bits, precision_map.granularity)
        view.copy_(result.weight)  # through the view: row slices of fused LSTM/MHA matrices too
        results[name] = QuantResult(view.detach(), result.codes, result.alpha)
    return Quantized(results, quantize_leftovers_(model, precision_map.leftover_bits))


def quantize_(model: nn.Module, precision_map: PrecisionMap) -> dict[str, QuantResult]:
    """Hard-quantize every cluster with bits < 32 in place; return ``{cluster: QuantResult}``.

    The map is validated first (unknown, missing or unsupported entries raise ValueError before
    anything is written). Each low-bit cluster gets the least-squares scale(s) at the map's
    granularity and its weights are overwritten with ``alpha * codes``; 32-bit clusters and
    buffers are not touched, and the leftover parameters (biases, norms) only when the map's
    ``leftover_bits`` is below 32 (see :func:`quantize_all_` for their codes). Each returned
    ``QuantResult`` holds the integer
    ``codes`` and ``alpha`` to pack, and as ``weight`` a detached view of the (now quantized)
    live weights, not a copy, so ``weights == dequantize(codes, alpha)`` holds exactly and a
    packed file reproduces the evaluated model. Applying the same map again is idempotent up to
    float rounding: the same codes come back, and re-solving alpha from the float32 table values
    can move it (and so the weights) by about one ulp.

    On a fake-quantized model (see :func:`fake_quantize_`) the latent FP weights are quantized.
    """
    return quantize_all_(model, precision_map).clusters


class FakeQuantize(nn.Module):
    """Parametrization: the quantized value of each row-slice cluster of one parameter tensor.

    ``segments`` are ``(start, stop, bits)`` row ranges; rows outside every segment (32-bit
    clusters) pass through unchanged. Alpha is re-solved from the current latent weight on every
    call (under no_grad, inside ``quant.fake_quantize``); the gradient is straight-through.
    """

    is_mpnas_fake_quantize = True  # marker read by search_spaces.precision (no import cycle)

    def __init__(self, segments: tuple[tuple[int, int, int], ...], granularity: str,
                 param_order: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.segments = tuple(sorted(segments))
        self.granularity = granularity
        # The owner's parameter order before registration: removal re-appends the parameter at
        # the end, and code that zips model.parameters() of two models relies on a stable order.
        self.param_order = param_order

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        parts: list[torch.Tensor] = []
        pos = 0
        for start, stop, bits in self.segments:
            if start > pos:
                parts.append(w[pos:start])
            parts.append(fake_quantize(w[start:stop], bits, self.granularity))
            pos = stop
        if pos < w.shape[0]:
            parts.append(w[pos:])
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def extra_repr(self) -> str:
        return f"segments={self.segments}, granularity={self.granularity!r}"


class FakeQuantizeAffine(nn.Module):
    """Parametrization of one leftover tensor: its per-tensor affine quantization at ``bits``.

    The value equals :func:`~search_spaces.quant.quantize_affine`'s bit for bit (so a model
    evaluated fake-quantized matches its packed file); the gradient is straight-through.
    """

    is_mpnas_fake_quantize = True  # marker read by search_spaces.precision (no import cycle)

    def __init__(self, bits: int, param_order: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.bits = bits
        self.param_order = param_order  # as in FakeQuantize: restores the order on removal

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quantize_affine(w, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


def _is_ours(plist: nn.Module) -> bool:
    return any(getattr(p, "is_mpnas_fake_quantize", False) for p in plist)


def _refresh_rnn_weights(model: nn.Module) -> None:
    # torch's RNNs cache their weight tensors in ``_flat_weights``; re-read them through the
    # (new or removed) parametrization so the cache never holds a stale tensor.
    for module in model.modules():
        if isinstance(module, nn.RNNBase):
            module._init_flat_weights()


def fake_quantize_(model: nn.Module, precision_map: PrecisionMap) -> None:
    """Register straight-through fake quantization on every cluster with bits < 32.

    One parametrization per parameter tensor quantizes each of its row-slice clusters with its
    own bits; the latent FP weight (``module.parametrizations.<name>.original``) stays the
    trainable parameter, so optimizers and ``find_clusters`` keep working. A tensor tied between
    modules (embedding and softmax) is parametrized on every owner. An earlier fake quantization
    is replaced. torch's ``nn.LSTM``/``nn.GRU`` re-read their parametrized weights on every
    forward (``RNNBase._update_flat_weights`` in current torch), which costs one extra quantization
    per weight and forward; on older torch a ValueError asks for ``from_torch_lstm``. With
    ``leftover_bits`` below 32 every leftover parameter gets a :class:`FakeQuantizeAffine`.

    While registered, ``state_dict`` keys read ``<module>.parametrizations.<name>.original``.
    Do not ``copy.deepcopy`` a fake-quantized model: torch's parametrize shares the injected
    class between the copies, so removing it from one breaks the other; copy a state_dict.
    """
    precision_map.validate(model)
    remove_fake_quantize_(model, bake=False)
    segments: dict[int, list[tuple[int, int, int]]] = {}
    for name, cluster in find_clusters(model).items():
        bits = precision_map.bits[name]
        if bits == FULL_PRECISION:
            continue
        start, stop = cluster.rows or (0, cluster.shape[0])
        segments.setdefault(id(cluster_parameter(model, cluster)), []).append((start, stop, bits))
    leftovers: set[int] = set()
    if precision_map.leftover_bits != FULL_PRECISION:
        leftovers = {id(t) for t in find_leftovers(model).values()}
    owners = []  # collect first: registering moves the parameter out of module._parameters
    for module in model.modules():
        if isinstance(module, parametrize.ParametrizationList):
            continue  # their ``original`` is a foreign parametrization's latent (rejected above)
        for pname, p in module._parameters.items():
            if p is not None and (id(p) in segments or id(p) in leftovers):
                if isinstance(module, nn.RNNBase) and not hasattr(module, "_update_flat_weights"):
                    raise ValueError(f"this torch's {type(module).__name__} caches its weights, so fake "
                                     "quantization would not reach its forward; convert the model with "
                                     "search_spaces.models.from_torch_lstm first")
                owners.append((module, pname, id(p)))
    orders = {id(module): tuple(module._parameters) for module, _, _ in owners}
    for module, pname, key in owners:
        if key in segments:
            fq: nn.Module = FakeQuantize(tuple(segments[key]), precision_map.granularity, orders[id(module)])
        else:
            fq = FakeQuantizeAffine(precision_map.leftover_bits, orders[id(module)])
        parametrize.register_parametrization(module, pname, fq)
    _refresh_rnn_weights(model)


def remove_fake_quantize_(model: nn.Module, bake: bool = True) -> None:
    """Remove the parametrizations of :func:`fake_quantize_` (a no-op on a model without any).

    ``bake=True`` leaves the quantized values in the parameters (as :func:`quantize_` would
    write them); ``bake=False`` restores the latent FP weights. Parameter objects keep their
    identity either way, so ties and optimizer references stay valid.
    """
    targets = [(module, name) for module in model.modules() if parametrize.is_parametrized(module)
               for name, plist in module.parametrizations.items() if _is_ours(plist)]
    orders = {id(module): (module, module.parametrizations[name][0].param_order) for module, name in targets}
    baked: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        if bake:  # compute before removing anything; once per tensor (tied owners agree)
            for module, name in targets:
                original = module.parametrizations[name].original
                if id(original) not in baked:
                    baked[id(original)] = (original, getattr(module, name).clone())
        for module, name in targets:
            parametrize.remove_parametrizations(module, name, leave_parametrized=False)
        for original, value in baked.values():
            original.copy_(value)  # in place: keeps storage, so cuDNN's flat LSTM buffer stays valid
    for module, order in orders.values():
        params = module._parameters
        for pname in [*(k for k in order if k in params), *(k for k in params if k not in order)]:
            params[pname] = params.pop(pname)  # re-insert in the original order
    if targets:
        _refresh_rnn_weights(model)
