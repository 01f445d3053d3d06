"""Hessian-trace sensitivity: Hutchinson estimates of each cluster's curvature, times its quantization error.

Hutchinson follows PyHessian's ``hessian.trace()`` (amirgholami/PyHessian, pyhessian/hessian.py)
for the products: the gradient is taken once with ``create_graph=True`` and reused; each
iteration draws a Rademacher probe ``v``, computes ``Hv = grad(g . v)`` and adds ``v . Hv``.
Unlike PyHessian (one trace for the whole network) one probe spans every requested cluster at
once, so ONE Hessian-vector product per iteration serves all clusters:
``Tr(H_cc) = E[v_c . (Hv)_c]`` because ``E[v v^T] = I`` makes the cross-cluster blocks vanish in
expectation. The stopping rule is per cluster (PyHessian's relative change of the running mean
stopped all clusters at once while the small ones were still off by tens of percent): the
samples ``v_c . (Hv)_c`` are independent, so each cluster's estimate has the standard error
``s_c / sqrt(k_c)`` (``s_c`` the sample standard deviation of its ``k_c`` samples), and a
cluster stops receiving probes once that standard error, relative to its estimate, is at most
``tol``; the estimation ends when every cluster has (or after ``max_iters`` products, which the
estimates report as ``capped``). Retiring converged clusters matters more than it saves: a
shared probe adds to cluster c's sample variance ``||H_cd||_F^2`` for every other probed
cluster d, and on the PTB Transformer these cross blocks made the attention query/key traces
six times noisier (per-probe sd/trace 4.6 with every cluster probed, 0.7 with only the
query/key clusters). The score
``trace * ||dW||^2`` and the per-weight normalization ``Tr / #params`` follow the HAWQ-V3
allocation notebook (Zhen-Dong/HAWQ, ILP.ipynb: ``Hutchinson_trace`` "already normalized, i.e.,
Trace / # parameters", times ``delta_weights_{4,8}bit_square = ||W_fp32 - W_int||_2^2``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from nas.config.defaults import MIN_PROBES
from nas.core.batches import check_token_batches
from nas.search.sensitivity import (
    Replacements,
    ScoreTable,
    check_candidates,
    check_granularity,
    replacement_weight,
    resolve_clusters,
)
from search_spaces.clusters import cluster_parameter, cluster_weight
from search_spaces.models.protocol import as_lm
from search_spaces.quant import FULL_PRECISION, quantization_error

logger = logging.getLogger(__name__)
PROBES = ("rademacher", "gaussian")


class TraceEstimate(NamedTuple):
    """Hutchinson estimate of one cluster's Hessian trace, with its standard error."""

    trace: float  # mean of the cluster's samples v_c . (Hv)_c
    iters: int  # probes this cluster received (it stops receiving them once rel_error <= tol)
    std_error: float  # sample standard deviation / sqrt(iters); inf with a single probe
    rel_error: float  # std_error / |trace| (0 when both are 0, inf when only the trace is): what tol bounds
    capped: bool = False  # max_iters came before this cluster's rel_error reached tol


def _relative(std_error: float, trace: float) -> float:
    """``std_error / |trace|``; 0 when the samples agree exactly, inf for a zero mean of samples that differ."""
    if std_error == 0.0:
        return 0.0
    return std_error / abs(trace) if trace != 0.0 else math.inf


def _hessian_vector_product(grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
                            vectors: Sequence[torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
    """``Hv = d(g . v)/dtheta`` for all of ``params`` at once: one double backward (Pearlmutter).

    The graph of ``grads`` is kept for the next probe, as PyHessian's single-batch path does.
    """
    return torch.autograd.grad(grads, params, grad_outputs=vectors, retain_graph=True, allow_unused=True)


def _probe(like: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """A probe shaped like ``like``: Rademacher ±1 or standard normal, both with E[v v^T] = I."""
    # Drawn on the CPU from the caller's seeded generator, so a seed gives the same probes on
    # every device; the HVP costs far more than the copy.
    if kind == "rademacher":
        v = torch.randint(0, 2, like.shape, generator=generator).mul_(2).sub_(1)
    else:
        v = torch.randn(like.shape, generator=generator)
    return v.to(device=like.device, dtype=like.dtype)


def hutchinson_traces(model: nn.Module, clusters: Sequence[str], loss_fn: Callable[[nn.Module], torch.Tensor], *,
                      probes: str = "rademacher", max_iters: int = 1000, tol: float = 0.05,
                      min_iters: int | None = None, seed: int = 0) -> dict[str, TraceEstimate]:
    """Hutchinson estimates of ``Tr(H_c)`` (Hessian of ``loss_fn(model)`` w.r.t. cluster c's weights).

    One probe covers all active clusters and one Hessian-vector product per iteration serves
    them all (``trace_c += v_c . (Hv)_c``). Stopping rule, per cluster: once it has ``k >=
    min_iters`` samples (and at least 2, for a standard deviation) and its relative standard
    error ``rel_error = (s_c / sqrt(k)) / |mean_c|`` is ``<= tol``, the cluster is done and
    later probes leave it out (they are zero on its weights, which also takes its cross blocks
    out of the other clusters' variance); the estimation ends when every cluster is done, or
    after ``max_iters`` products, when the clusters still above ``tol`` are marked ``capped`` and
    a warning names them. ``tol=0.05`` means each trace is known to about 5% (one standard
    error). A cluster whose samples are all equal (e.g. a diagonal block with Rademacher probes,
    or a Hessian block of zeros) has ``std_error`` 0 and is exact; ``tol=0`` runs every other
    cluster to ``max_iters``. ``min_iters`` (default ``min(MIN_PROBES, max_iters)``, why:
    :data:`nas.config.defaults.MIN_PROBES`) is the fewest samples a cluster can stop on.
    Probes (``"rademacher"`` or ``"gaussian"``) come from a ``torch.Generator`` seeded with
    ``seed``; the global RNG is not touched. ``loss_fn`` is called once, in eval mode, and must
    return a scalar built from the model's weights (see :func:`lm_loss_fn`); its graph is kept
    for the whole estimate. Only the parameters holding the clusters are differentiated (a row
    slice of a fused parameter: the whole parameter, probed only on the requested rows); their
    ``requires_grad`` flags, ``.grad`` and the model's train/eval mode are left as they were.
    """
    min_iters = _check_settings(probes, max_iters, tol, min_iters)
    params, slots = _cluster_slots(model, clusters)
    was_training = model.training
    flags = [p.requires_grad for p in params]
    generator = torch.Generator().manual_seed(seed)
    moments = {name: _Moments() for name in slots}
    active = list(slots)  # clusters still probed, in request order
    iters = 0
    model.eval()  # dropout would make every HVP a different function
    try:
        for p in params:
            p.requires_grad_(True)
        # torch's fused attention kernels (nn.MultiheadAttention's) have no double backward; the
        # math kernel, chosen while the graph is built, has one.
        with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
            grads = _gradients(model, params, loss_fn)
            while active and iters < max_iters:
                iters += 1
                samples = _probe_samples(params, grads, [slots[n] for n in active], probes, generator)
                for name, sample in zip(active, samples, strict=True):
                    moments[name].add(sample)
                active = [n for n in active if not moments[n].settled(min_iters, tol)]
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)
    estimates = {name: m.estimate(capped=name in active) for name, m in moments.items()}
    if active:
        logger.warning("Hutchinson traces: stopped at max_iters=%d with %d of %d clusters above the relative "
                       "standard error tol=%g: %s", iters, len(active), len(estimates), tol,
                       ", ".join(f"{n} {estimates[n].rel_error:.3g}"
                                 for n in sorted(active, key=lambda n: -estimates[n].rel_error)))
    return estimates


def _check_settings(probes: str, max_iters: int, tol: float, min_iters: int | None) -> int:
    """``min_iters`` (its default filled in); ValueError on a bad probe kind, count or tolerance."""
    if probes not in PROBES:
        raise ValueError(f"probes={probes!r}; expected one of {PROBES}")
    if min_iters is None:
        min_iters = min(MIN_PROBES, max_iters)
    if max_iters < 1 or not 1 <= min_iters <= max_iters:
        raise ValueError(f"need 1 <= min_iters <= max_iters, got min_iters={min_iters}, max_iters={max_iters}")
    if not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol={tol} must be a finite relative standard error >= 0")
    return min_iters


Slot = tuple[int, slice]  # (index into the differentiated parameters, the cluster's rows)


def _cluster_slots(model: nn.Module, clusters: Sequence[str]) -> tuple[list[torch.Tensor], dict[str, Slot]]:
    """The parameters holding ``clusters`` (each once) and, per cluster, its parameter and rows."""
    params: list[torch.Tensor] = []
    slots: dict[str, Slot] = {}
    for name, cluster in resolve_clusters(model, clusters).items():
        cluster_weight(model, cluster)  # raises if the model changed shape since find_clusters
        param = cluster_parameter(model, cluster)
        index = next((i for i, p in enumerate(params) if p is param), len(params))
        if index == len(params):
            params.append(param)
        slots[name] = (index, slice(*cluster.rows) if cluster.rows else slice(None))
    return params, slots


def _gradients(model: nn.Module, params: list[torch.Tensor], loss_fn: Callable[[nn.Module], torch.Tensor]
               ) -> list[torch.Tensor | None]:
    """The loss's gradients w.r.t. ``params`` with their graph (None: that Hessian block is 0)."""
    loss = loss_fn(model)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} "
                         f"{tuple(getattr(loss, 'shape', ()))}")
    if not torch.isfinite(loss.detach()).all():
        raise ValueError(f"loss_fn returned {float(loss)}; the Hessian of a non-finite loss has no trace")
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    # A gradient without a graph is constant in theta: that parameter's Hessian block is 0.
    return [g if g is not None and g.requires_grad else None for g in grads]


def _probe_samples(params: list[torch.Tensor], grads: list[torch.Tensor | None], active: list[Slot],
                   probes: str, generator: torch.Generator) -> list[float]:
    """One probe ``v`` over the active clusters, one Hessian-vector product: ``v_c . (Hv)_c`` per cluster."""
    # Probe only active rows: rows of a fused parameter that belong to other (or retired) clusters
    # stay 0, and a parameter with no active cluster is left out of the product.
    masks: dict[int, torch.Tensor] = {}
    for index, rows in active:
        if index not in masks:
            p = params[index]
            masks[index] = torch.zeros(p.shape[0], *([1] * (p.dim() - 1)), dtype=p.dtype, device=p.device)
        masks[index][rows] = 1
    order = sorted(masks)
    vectors = {i: _probe(params[i], probes, generator) * masks[i] for i in order}
    hv: dict[int, torch.Tensor | None] = dict.fromkeys(order)
    used = [i for i in order if grads[i] is not None]
    if used:
        out = _hessian_vector_product([grads[i] for i in used], [params[i] for i in order],
                                      [vectors[i] for i in used])
        hv = dict(zip(order, out, strict=True))
    home = params[0].device  # one transfer per iteration, not one per cluster
    vhv = [(vectors[i][rows] * hv[i][rows]).sum(dtype=torch.float64).to(home) if hv[i] is not None
           else torch.zeros((), dtype=torch.float64, device=home) for i, rows in active]
    return torch.stack(vhv).tolist()


class _Moments:
    """Running mean and squared deviations of one cluster's samples (Welford)."""

    def __init__(self) -> None:
        self.count, self.mean, self.squares = 0, 0.0, 0.0

    def add(self, sample: float) -> None:
        self.count += 1
        delta = sample - self.mean
        self.mean += delta / self.count
        self.squares += delta * (sample - self.mean)

    def settled(self, min_iters: int, tol: float) -> bool:
        """Enough samples, and a relative standard error at most ``tol``."""
        return self.count >= min_iters and _relative(_std_error(self.squares, self.count), self.mean) <= tol

    def estimate(self, capped: bool) -> TraceEstimate:
        error = _std_error(self.squares, self.count)
        return TraceEstimate(self.mean, self.count, error, _relative(error, self.mean), capped)


def _std_error(squares: float, count: int) -> float:
    """Standard error of a mean of ``count`` samples whose squared deviations sum to ``squares``."""
    if count < 2:
        return math.inf
    return math.sqrt(max(squares, 0.0) / (count - 1) / count)


@torch.no_grad()
def hessian_scores(model: nn.Module, traces: Mapping[str, TraceEstimate | float],
                   candidates: Mapping[str, Sequence[int]], *, granularity: str = "matrix",
                   per_weight: bool = False, replacements: Replacements | None = None) -> ScoreTable:
    """``|Tr(H_c)| * ||Q_b(W_c) - W_c||^2`` per cluster and candidate width (0 at 32 bits).

    ``traces`` maps each candidate cluster to a :class:`TraceEstimate` (or a plain float).
    ``per_weight=True`` divides by the cluster size: the average trace of HAWQ-V2/V3, which
    compares clusters of different sizes by curvature per weight. |trace| because away from a
    minimum (or with few probes) the estimate can be negative, and a negative score would make
    the allocator prefer more error. With ``replacements`` the perturbation is the prototype's:
    ``||W_proto_b,c - W_c||^2``.
    """
    table_bits = check_candidates(model, candidates)
    clusters = resolve_clusters(model, table_bits)
    check_granularity(granularity)
    missing = [n for n in clusters if n not in traces]
    if missing:
        raise ValueError(f"no trace for clusters {missing}; run hutchinson_traces on them first")
    table: ScoreTable = {}
    for name, cluster in clusters.items():
        estimate = traces[name]
        trace = float(estimate.trace if isinstance(estimate, TraceEstimate) else estimate)
        if not math.isfinite(trace):
            raise ValueError(f"trace of cluster {name!r} is {trace}; expected a finite number")
        weight = cluster_weight(model, cluster).detach()
        scale = abs(trace) / (cluster.numel if per_weight else 1)
        table[name] = {b: 0.0 if b == FULL_PRECISION else scale * (
            quantization_error(weight, b, granularity) if replacements is None
            else float((replacement_weight(replacements, name, b, weight).double() - weight.double()).square().sum()))
            for b in table_bits[name]}
    return table


def lm_loss_fn(batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[nn.Module], torch.Tensor]:
    """A ``loss_fn(model)`` for :func:`hutchinson_traces`: mean token cross-entropy over fixed batches.

    ``batches`` are ``(inputs, targets)`` pairs of ``[batch, time]`` token ids. Each batch runs
    from the model's default state (zero state for recurrent models, no history for window
    models), so the closure needs no knowledge of the model type (a plain torch module is run
    through :func:`~search_spaces.models.protocol.as_lm`); batches are weighted by their token
    counts and moved to the model's device at call time.
    """
    checked = check_token_batches(batches)
    total = sum(t.numel() for _, t in checked)

    def loss_fn(model: nn.Module) -> torch.Tensor:
        model = as_lm(model)  # a plain torch module takes no targets: the adapter computes the loss
        device = next(model.parameters()).device
        loss = torch.zeros((), device=device)
        for inputs, targets in checked:
            out = model(inputs.to(device), targets=targets.to(device))
            if out.loss is None:
                raise ValueError(f"{type(model).__name__}.forward returned no loss for the given targets")
            loss = loss + out.loss * (targets.numel() / total)
        return loss

    return loss_fn
