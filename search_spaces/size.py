"""Theoretical model size under a precision map (DESIGN.md section 4), as a plain dict of floats.

Counted from shapes alone, no weight values: each low-bit cluster costs ``bits * numel / 8``
bytes plus a 4-byte float32 scale per cluster (``"matrix"``) or per row of the cluster
(``"row"``); a 32-bit cluster costs 4 bytes per weight and has no scale; every other parameter
(biases, LayerNorm, ...) costs 4 bytes per element, or, when the map's ``leftover_bits`` is 8 or
16, ``leftover_bits * numel / 8`` bytes plus 8 bytes per tensor (its float32 scale and minimum,
see ``search_spaces.quant.quantize_affine``); persistent buffers (BatchNorm statistics, ...)
always cost 4 bytes per element. Tensors shared by several modules (tied embedding and softmax)
are counted once. These are exactly the payload bytes of a packed file (``search_spaces.packed``).
"""

from __future__ import annotations

import torch
from torch import nn

from search_spaces.clusters import cluster_parameter, find_clusters, find_leftovers
from search_spaces.precision import PrecisionMap
from search_spaces.quant import FULL_PRECISION

FP32_BYTES = 4  # bytes per full-precision element, and per scale
AFFINE_SCALE_BYTES = 2 * FP32_BYTES  # a quantized leftover tensor stores its scale and its minimum


def _persistent_buffers(model: nn.Module) -> list[torch.Tensor]:
    # Only buffers that a checkpoint stores: non-persistent ones (e.g. cached masks) cost no disk.
    seen: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for name, buf in module._buffers.items():
            if buf is not None and name not in module._non_persistent_buffers_set:
                seen.setdefault(id(buf), buf)
    return list(seen.values())


def model_size(model: nn.Module, precision_map: PrecisionMap) -> dict[str, float]:
    """Sizes of ``model`` quantized by ``precision_map`` (validated first).

    Returns:
        theoretical_bytes: low-bit clusters + scales + leftovers + buffers (see module doc).
        fp32_bytes: 4 bytes per element of every unique parameter and persistent buffer, so a
            map that keeps every cluster at 32 bits has ``compression == 1.0`` exactly.
        compression: ``fp32_bytes / theoretical_bytes``.
        avg_bits: bits per weight over ALL clusters, weighted by numel; 32-bit clusters count as
            32 and the FP leftovers are not included (32.0 for a model without clusters).
        quantized_params: weights in clusters with bits < 32.
        fp_cluster_params: weights in clusters kept at 32 bits.
        fp_leftover_params: elements of parameters and buffers outside every cluster that stay
            float32 (all of them at ``leftover_bits`` 32).
        quantized_leftover_params: elements of leftover parameters stored at ``leftover_bits``
            (0 at 32 bits).
        leftover_bytes: bytes of everything outside the clusters, scales of quantized leftovers
            included (``theoretical_bytes`` minus the clusters' bytes).
    """
    precision_map.validate(model)
    clusters = find_clusters(model)
    cluster_bytes = 0.0
    bit_weight = 0
    quantized = fp_clusters = 0
    clustered_ids: set[int] = set()
    for name, cluster in clusters.items():
        bits = precision_map.bits[name]
        n = cluster.numel
        bit_weight += bits * n
        if bits == FULL_PRECISION:
            cluster_bytes += FP32_BYTES * n
            fp_clusters += n
        else:
            scales = 1 if precision_map.granularity == "matrix" else cluster.shape[0]
            cluster_bytes += bits * n / 8 + FP32_BYTES * scales
            quantized += n
        clustered_ids.add(id(cluster_parameter(model, cluster)))
    # find_clusters covers every row of a parameter it touches, so leftovers are whole tensors.
    # model.parameters() yields each shared tensor once (and latent weights when fake-quantized).
    params = list(model.parameters())
    buffer_elements = sum(b.numel() for b in _persistent_buffers(model))
    leftover = sum(p.numel() for p in params if id(p) not in clustered_ids) + buffer_elements
    total = sum(p.numel() for p in params) + buffer_elements
    quantized_leftover, leftover_bytes = _quantized_leftovers(model, precision_map.leftover_bits)
    leftover_bytes += FP32_BYTES * (leftover - quantized_leftover)
    theoretical = cluster_bytes + leftover_bytes
    fp32 = float(FP32_BYTES * total)
    n_cluster = quantized + fp_clusters
    return {
        "theoretical_bytes": float(theoretical),
        "fp32_bytes": fp32,
        "compression": fp32 / theoretical if theoretical else 1.0,
        "avg_bits": bit_weight / n_cluster if n_cluster else float(FULL_PRECISION),
        "quantized_params": float(quantized),
        "fp_cluster_params": float(fp_clusters),
        "fp_leftover_params": float(leftover - quantized_leftover),
        "quantized_leftover_params": float(quantized_leftover),
        "leftover_bytes": float(leftover_bytes),
    }


def _quantized_leftovers(model: nn.Module, bits: int) -> tuple[int, float]:
    """(elements, bytes with scales) of the leftover parameters stored at ``bits`` (32: none)."""
    if bits == FULL_PRECISION:
        return 0, 0.0
    tensors = find_leftovers(model).values()
    count = sum(t.numel() for t in tensors)
    return count, bits * count / 8 + AFFINE_SCALE_BYTES * len(tensors)
