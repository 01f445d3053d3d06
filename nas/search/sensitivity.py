"""Per-cluster quantization sensitivity: the score tables of the ``kl`` and ``hessian`` strategies.

A :data:`ScoreTable` ``{cluster: {bits: score}}`` (lower is better, 0 at 32 bits) is what the
exact budgeted allocator consumes: it picks one bit width per cluster minimizing the summed score.

- **kl** (:func:`nas.search.kl.kl_scores`): quantize ONE cluster at a time to each candidate width and measure
  the mean token-level ``KL(P_fp || P_q)`` of the next-word distributions on held-out text.
- **hessian** (:func:`nas.search.hessian.hutchinson_traces`, :func:`~nas.search.hessian.hessian_scores`):
  ``|Tr(H_c)| *
  ||Q_b(W_c) - W_c||^2`` per cluster (optionally divided by the cluster size: the "average
  trace" of HAWQ-V2/V3), with the traces estimated by Hutchinson's method.

Both take optional ``replacements`` ``{bits: {cluster: weight}}``, the prototype mode of the
papers (issue 13, item 2): the b-bit weight of a cluster is then its weight in the b-bit
uniform *retrained* prototype (:mod:`nas.pipeline.prototypes`), not the post-training quantization
``Q_b(W_c)`` of the FP weight, so a cluster is rated by the damage retraining did not repair.

The strategies live in :mod:`nas.search.kl` and :mod:`nas.search.hessian`; this module holds
what they share (the table types, the checks of their inputs).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from nas.core.errors import MpnasError
from search_spaces.clusters import Cluster, find_clusters
from search_spaces.quant import GRANULARITIES, SUPPORTED_BITS

Replacements = Mapping[int, Mapping[str, torch.Tensor]]  # {bits: {cluster: weight}}: prototype weights
ScoreTable = dict[str, dict[int, float]]  # cluster -> bits -> score (lower is better)

# ----------------------------------------------------------------------------- input checks

def resolve_clusters(model: nn.Module, names: Sequence[str] | Mapping[str, object]) -> dict[str, Cluster]:
    """``{name: Cluster}`` for ``names``; ValueError on unknown or repeated names."""
    if isinstance(names, str):  # list("decoder") would be seven unknown one-letter clusters
        raise ValueError(f"expected a sequence of cluster names, got the string {names!r}")
    clusters = find_clusters(model)
    names = list(names)
    unknown = [n for n in names if n not in clusters]
    if unknown:
        raise ValueError(f"unknown clusters {unknown}; the model's clusters are {list(clusters)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"clusters given more than once: {repeated}")
    if not names:
        raise ValueError("no clusters given; expected at least one cluster name")
    return {n: clusters[n] for n in names}


def check_candidates(model: nn.Module, candidates: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    """Validated ``{cluster: sorted unique bits}``; ValueError names the bad cluster or width."""
    if not isinstance(candidates, Mapping):
        raise ValueError(f"candidates must map cluster name -> candidate bits, got {type(candidates).__name__}")
    resolve_clusters(model, candidates)
    checked: dict[str, tuple[int, ...]] = {}
    for name, bits in candidates.items():
        if isinstance(bits, str | bytes) or not isinstance(bits, Sequence | set | frozenset) or not bits:
            raise ValueError(f"candidates[{name!r}] must be a non-empty sequence of bit widths, got {bits!r}")
        bad = [b for b in bits if isinstance(b, bool) or not isinstance(b, numbers.Integral) or b not in SUPPORTED_BITS]
        if bad:
            raise ValueError(f"candidates[{name!r}] has unsupported bit widths {bad}; expected {SUPPORTED_BITS}")
        checked[name] = tuple(sorted({int(b) for b in bits}))
    return checked


def replacement_weight(replacements: Replacements, name: str, bits: int, like: torch.Tensor) -> torch.Tensor:
    """The prototype weight of cluster ``name`` at ``bits``, checked against the live weight's shape."""
    if bits not in replacements:
        raise MpnasError(f"no {bits}-bit prototype for cluster {name!r}: prototypes exist for "
                         f"{sorted(replacements)} bits (build the missing width with `mpnas prototypes --bits {bits}`)")
    weight = replacements[bits].get(name)
    if weight is None or tuple(weight.shape) != tuple(like.shape):
        raise MpnasError(f"the {bits}-bit prototype has no cluster {name!r} of shape {tuple(like.shape)}")
    return weight.to(like.device, like.dtype)


def check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r}; expected one of {GRANULARITIES}")


# ----------------------------------------------------------------------------- KL strategy


# ----------------------------------------------------------------------------- Hessian strategy


