"""Per-cluster quantization sensitivity: the score tables of the ``kl`` and ``hessian`` strategies.

A :data:`ScoreTable` ``{cluster: {bits: score}}`` (lower is better, 0 at 32 bits) is what the
exact budgeted allocator consumes: it picks one bit width per cluster minimizing the summed score.

- **kl** (:func:`kl_scores`): quantize ONE cluster at a time to each candidate width and measure
  the mean token-level ``KL(P_fp || P_q)`` of the next-word distributions on held-out text.
- **hessian** (:func:`hutchinson_traces` then :func:`hessian_scores`): ``|Tr(H_c)| *
  ||Q_b(W_c) - W_c||^2`` per cluster (optionally divided by the cluster size: the "average
  trace" of HAWQ-V2/V3), with the traces estimated by Hutchinson's method.

Both take optional ``replacements`` ``{bits: {cluster: weight}}``, the prototype mode of the
papers (issue 13, item 2): the b-bit weight of a cluster is then its weight in the b-bit
uniform *retrained* prototype (:mod:`nas.pipeline.prototypes`), not the post-training quantization
``Q_b(W_c)`` of the FP weight, so a cluster is rated by the damage retraining did not repair.

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
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from nas.config.defaults import MIN_PROBES
from nas.core.batches import check_token_batches
from nas.core.errors import MpnasError
from search_spaces.models.protocol import as_lm
from search_spaces.precision import Cluster, cluster_parameter, cluster_weight, find_clusters
from search_spaces.quant import FULL_PRECISION, GRANULARITIES, SUPPORTED_BITS, quantization_error, quantize

Replacements = Mapping[int, Mapping[str, torch.Tensor]]  # {bits: {cluster: weight}}: prototype weights
ScoreTable = dict[str, dict[int, float]]  # cluster -> bits -> score (lower is better)
PROBES = ("rademacher", "gaussian")

logger = logging.getLogger(__name__)
# ----------------------------------------------------------------------------- input checks

def _resolve(model: nn.Module, names: Sequence[str] | Mapping[str, object]) -> dict[str, Cluster]:
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


def _check_candidates(model: nn.Module, candidates: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    """Validated ``{cluster: sorted unique bits}``; ValueError names the bad cluster or width."""
    if not isinstance(candidates, Mapping):
        raise ValueError(f"candidates must map cluster name -> candidate bits, got {type(candidates).__name__}")
    _resolve(model, candidates)
    checked: dict[str, tuple[int, ...]] = {}
    for name, bits in candidates.items():
        if isinstance(bits, str | bytes) or not isinstance(bits, Sequence | set | frozenset) or not bits:
            raise ValueError(f"candidates[{name!r}] must be a non-empty sequence of bit widths, got {bits!r}")
        bad = [b for b in bits if isinstance(b, bool) or not isinstance(b, numbers.Integral) or b not in SUPPORTED_BITS]
        if bad:
            raise ValueError(f"candidates[{name!r}] has unsupported bit widths {bad}; expected {SUPPORTED_BITS}")
        checked[name] = tuple(sorted({int(b) for b in bits}))
    return checked


def _replacement(replacements: Replacements, name: str, bits: int, like: torch.Tensor) -> torch.Tensor:
    """The prototype weight of cluster ``name`` at ``bits``, checked against the live weight's shape."""
    if bits not in replacements:
        raise MpnasError(f"no {bits}-bit prototype for cluster {name!r}: prototypes exist for "
                         f"{sorted(replacements)} bits (build the missing width with `mpnas prototypes --bits {bits}`)")
    weight = replacements[bits].get(name)
    if weight is None or tuple(weight.shape) != tuple(like.shape):
        raise MpnasError(f"the {bits}-bit prototype has no cluster {name!r} of shape {tuple(like.shape)}")
    return weight.to(like.device, like.dtype)


def _check_granularity(granularity: str) -> None:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r}; expected one of {GRANULARITIES}")


# ----------------------------------------------------------------------------- KL strategy

def _chunks(model: nn.Module, tokens: torch.Tensor, batch_size: int, bptt: int, context: int | None,
            device: torch.device) -> tuple[list[torch.Tensor], bool]:
    """The input chunks every KL pass runs, in order, and whether state is carried between them.

    Recurrent models: ``batch_size`` contiguous rows cut into ``bptt``-long chunks with the state
    carried over (as the perplexity evaluator does); the < batch_size tokens left over are not
    used. Window models: non-overlapping windows of ``context`` tokens (the model's own by
    default), the last one shorter. Every input position is one predicted next-word distribution.
    """
    n = tokens.numel()
    if hasattr(model, "init_state"):
        rows = max(1, min(batch_size, n))
        length = n // rows
        data = tokens[: rows * length].view(rows, length).to(device)
        return [data[:, t : t + bptt] for t in range(0, length, bptt)], True
    if context is None:
        context = getattr(getattr(model, "config", None), "context", None)
        if context is None:
            raise ValueError("a model without init_state is run in windows, but it has no config.context; "
                             "pass context=")
    full = n // context
    windows = tokens[: full * context].view(full, context)
    chunks = [windows[i : i + batch_size].to(device) for i in range(0, full, batch_size)]
    if n % context:
        chunks.append(tokens[full * context :].view(1, -1).to(device))
    return chunks, False


def _logits(model: nn.Module, chunks: list[torch.Tensor], recurrent: bool) -> Iterator[torch.Tensor]:
    """Next-word logits ``[batch, time, vocab]`` (float32) of each chunk, in order."""
    state = None
    for x in chunks:
        if recurrent:
            out = model(x, state)
            state = out.state
        else:
            out = model(x)
        yield out.logits.float()


_KL_BLOCK_ELEMENTS = 1 << 19  # 2 MiB of float32 per block


def _exp_excess(x: torch.Tensor) -> torch.Tensor:
    """``exp(-x) - 1 + x`` (>= 0, about ``x^2 / 2``) without cancellation for small ``|x|``.

    A Taylor series (relative error < 1e-7 for ``|x| < 0.1``) when every element is small, as
    for high-bit quantization, else the direct form, where the elements with large ``|x|``
    dominate the sum and the cancellation in the small ones no longer matters. One branch per
    call (a cache-sized block of tokens): evaluating both everywhere cost a third more time.
    """
    if float(x.abs().max()) < 0.1:
        return x * x * (0.5 + x * (-1 / 6 + x * (1 / 24 + x * (-1 / 120 + x / 720))))
    return torch.expm1(-x) + x


def _summed_kl(reference: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``sum over tokens of KL(softmax(reference) || softmax(logits))`` (float64 result).

    Exact identity in the logit difference ``d = reference - logits`` (centred on its mean
    under ``p``; KL ignores constant shifts): with ``S = sum_v p expm1(-d)``,
    ``KL = sum_v p (exp(-d) - 1 + d) - (S - log1p(S))``. Both terms are sums of non-negative
    parts of order ``d^2`` and ``d^4``, so rounding errors stay relative to the KL itself and
    float32 is accurate to ~1e-6 relative even for the tiny KL of high-bit quantization, where a
    float32 ``log p - log q`` would not cancel. Blocks of tokens small enough to stay in cache
    keep the dozen elementwise passes cheap: 6-10x faster than the float64 log-softmax version
    this replaced, which dominated the KL search's time (10,000 tokens x 10,000 words: 6-10 s
    -> 0.6-1.1 s on one core).
    """
    vocab = reference.shape[-1]
    reference, logits = reference.reshape(-1, vocab), logits.reshape(-1, vocab)
    total = torch.zeros((), dtype=torch.float64, device=reference.device)
    rows = max(1, _KL_BLOCK_ELEMENTS // max(1, vocab))
    for begin in range(0, reference.shape[0], rows):  # cache-sized blocks: the elementwise passes stay in cache
        a, b = reference[begin : begin + rows], logits[begin : begin + rows]
        p = a.softmax(-1)
        d = a - b
        d = d - (p * d).sum(-1, keepdim=True)
        excess = (p * _exp_excess(d)).sum(-1).double()
        s = excess - (p * d).sum(-1).double()  # S = sum p expm1(-d) = sum p (exp(-d) - 1 + d) - sum p d
        total += (excess - (s - torch.log1p(s))).sum()  # S - log1p(S) >= 0, order S^2
    return total


@torch.no_grad()
def kl_scores(model: nn.Module, candidates: Mapping[str, Sequence[int]], tokens: torch.Tensor, *,
              batch_size: int = 10, bptt: int = 35, context: int | None = None, granularity: str = "matrix",
              device: torch.device | str | None = None, replacements: Replacements | None = None) -> ScoreTable:
    """Mean token ``KL(P_fp || P_q)`` with one cluster quantized at a time: ``{cluster: {bits: kl}}``.

    ``tokens`` is a 1-D held-out id stream. The full-precision logits are computed once and kept
    (``tokens x vocab`` float32 values on ``device``: keep the slice to a few thousand tokens);
    then, for each cluster and candidate width, the cluster alone is quantized (from a
    saved copy of its weights, restored afterwards, also on error), the same chunks are run and
    ``sum_v p (log p - log q)`` is averaged over every scored token. 32 bits scores exactly 0
    without a forward pass. Recurrent models (with ``init_state``) carry their state across
    ``bptt``-long chunks of ``batch_size`` rows; window models use non-overlapping windows of
    ``context`` tokens (default ``model.config.context``), ``batch_size`` windows per forward.
    The model runs in eval mode (no dropout) on ``device`` (default: its parameters' device) and
    is left exactly as it was. With ``replacements`` the b-bit weights are the prototypes'
    (module docstring) instead of ``Q_b`` of the FP weight.
    """
    table_bits = _check_candidates(model, candidates)
    clusters = _resolve(model, table_bits)
    _check_granularity(granularity)
    if tokens.dim() != 1 or tokens.numel() == 0 or tokens.is_floating_point():
        raise ValueError(f"tokens must be a non-empty 1-D integer id stream, got {tokens.dtype} "
                         f"of shape {tuple(tokens.shape)}")
    for key, value in (("batch_size", batch_size), ("bptt", bptt), ("context", context)):
        if value is not None and value < 1:
            raise ValueError(f"{key}={value} must be >= 1")
    model = as_lm(model, context=context)  # a plain torch module: clusters and weights stay its own
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        chunks, recurrent = _chunks(model, tokens, batch_size, bptt, context, device)
        reference = list(_logits(model, chunks, recurrent))  # the only FP pass
        scored = sum(r.shape[0] * r.shape[1] for r in reference)
        table: ScoreTable = {}
        for name, cluster in clusters.items():
            view = cluster_weight(model, cluster)  # live weights: writes reach the model
            original = view.clone()
            row: dict[int, float] = {}
            try:
                for bits in table_bits[name]:
                    if bits == FULL_PRECISION:
                        row[bits] = 0.0  # the model is unchanged: KL is exactly 0
                        continue
                    view.copy_(quantize(original, bits, granularity).weight if replacements is None
                               else _replacement(replacements, name, bits, original))
                    total = torch.zeros((), dtype=torch.float64, device=device)
                    for ref, logits in zip(reference, _logits(model, chunks, recurrent), strict=True):
                        total += _summed_kl(ref, logits)
                    # KL >= 0; float rounding of near-identical distributions can dip below.
                    row[bits] = max(0.0, float(total) / scored)
            finally:
                view.copy_(original)
            table[name] = row
    finally:
        model.train(was_training)
    return table


# ----------------------------------------------------------------------------- Hessian strategy

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
    cluster to ``max_iters``. ``min_iters`` (default ``min(30, max_iters)``) keeps a cluster from
    ending on a standard deviation measured on too few samples: the samples are skewed quadratic
    forms, and a short run without a large one underestimates both the trace and its error (a
    tiny LSTM with exact traces, 40 seeds at ``tol=0.1``: with 10, up to 17% of a cluster's
    estimates were more than 2 standard errors off; with 30, at most 5%). The mean of a
    cluster's samples stays unbiased as others retire (each sample has the same expectation,
    only a smaller variance), and ``s_c^2 / k`` stays an unbiased estimate of its variance.
    Probes (``"rademacher"`` or ``"gaussian"``) come from a ``torch.Generator`` seeded with
    ``seed``; the global RNG is not touched. ``loss_fn`` is called once, in eval mode, and must
    return a scalar built from the model's weights (see :func:`lm_loss_fn`); its graph is kept
    for the whole estimate. Only the parameters holding the clusters are differentiated (a row
    slice of a fused parameter: the whole parameter, probed only on the requested rows); their
    ``requires_grad`` flags, ``.grad`` and the model's train/eval mode are left as they were.
    """
    if probes not in PROBES:
        raise ValueError(f"probes={probes!r}; expected one of {PROBES}")
    if min_iters is None:
        min_iters = min(MIN_PROBES, max_iters)
    if max_iters < 1 or not 1 <= min_iters <= max_iters:
        raise ValueError(f"need 1 <= min_iters <= max_iters, got min_iters={min_iters}, max_iters={max_iters}")
    if not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"tol={tol} must be a finite relative standard error >= 0")
    resolved = _resolve(model, clusters)
    params: list[torch.Tensor] = []
    slots: dict[str, tuple[int, slice]] = {}  # cluster -> (index into params, its rows)
    for name, cluster in resolved.items():
        cluster_weight(model, cluster)  # raises if the model changed shape since find_clusters
        param = cluster_parameter(model, cluster)
        index = next((i for i, p in enumerate(params) if p is param), len(params))
        if index == len(params):
            params.append(param)
        slots[name] = (index, slice(*cluster.rows) if cluster.rows else slice(None))
    was_training = model.training
    flags = [p.requires_grad for p in params]
    generator = torch.Generator().manual_seed(seed)
    model.eval()  # dropout would make every HVP a different function
    try:
        for p in params:
            p.requires_grad_(True)
        # torch's fused attention kernels (nn.MultiheadAttention's) have no double backward; the
        # math kernel, chosen while the graph is built, has one.
        with torch.enable_grad(), sdpa_kernel([SDPBackend.MATH]):
            loss = loss_fn(model)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError(f"loss_fn must return a scalar tensor, got {type(loss).__name__} "
                                 f"{tuple(getattr(loss, 'shape', ()))}")
            if not torch.isfinite(loss.detach()).all():
                raise ValueError(f"loss_fn returned {float(loss)}; the Hessian of a non-finite loss has no trace")
            grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
            # A gradient without a graph is constant in theta: that parameter's Hessian block is 0.
            live = {i for i, g in enumerate(grads) if g is not None and g.requires_grad}
            means = dict.fromkeys(slots, 0.0)
            squares = dict.fromkeys(slots, 0.0)  # Welford: sum of squared deviations from the mean
            counts = dict.fromkeys(slots, 0)
            active = list(slots)  # clusters still probed, in request order
            iters = 0
            while active and iters < max_iters:
                iters += 1
                # Probe only active rows: rows of a fused parameter that belong to other (or retired)
                # clusters stay 0, and a parameter with no active cluster is left out of the product.
                masks: dict[int, torch.Tensor] = {}
                for name in active:
                    index, rows = slots[name]
                    if index not in masks:
                        p = params[index]
                        masks[index] = torch.zeros(p.shape[0], *([1] * (p.dim() - 1)), dtype=p.dtype,
                                                   device=p.device)
                    masks[index][rows] = 1
                order = sorted(masks)
                vectors = {i: _probe(params[i], probes, generator) * masks[i] for i in order}
                hv: dict[int, torch.Tensor | None] = dict.fromkeys(order)
                used = [i for i in order if i in live]
                if used:
                    out = _hessian_vector_product([grads[i] for i in used], [params[i] for i in order],
                                                  [vectors[i] for i in used])
                    hv = dict(zip(order, out, strict=True))
                home = params[0].device  # one transfer per iteration, not one per cluster
                vhv = [(vectors[i][rows] * hv[i][rows]).sum(dtype=torch.float64).to(home) if hv[i] is not None
                       else torch.zeros((), dtype=torch.float64, device=home)
                       for i, rows in (slots[n] for n in active)]
                done = []
                for name, sample in zip(active, torch.stack(vhv).tolist(), strict=True):
                    counts[name] += 1
                    delta = sample - means[name]
                    means[name] += delta / counts[name]
                    squares[name] += delta * (sample - means[name])
                    error = _std_error(squares[name], counts[name])
                    if counts[name] >= min_iters and _relative(error, means[name]) <= tol:
                        done.append(name)
                active = [n for n in active if n not in done]
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)
    estimates = {}
    for name in slots:
        error = _std_error(squares[name], counts[name])
        estimates[name] = TraceEstimate(means[name], counts[name], error, _relative(error, means[name]),
                                        name in active)
    if active:
        logger.warning("Hutchinson traces: stopped at max_iters=%d with %d of %d clusters above the relative "
                       "standard error tol=%g: %s", iters, len(active), len(estimates), tol,
                       ", ".join(f"{n} {estimates[n].rel_error:.3g}"
                                 for n in sorted(active, key=lambda n: -estimates[n].rel_error)))
    return estimates


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
    table_bits = _check_candidates(model, candidates)
    clusters = _resolve(model, table_bits)
    _check_granularity(granularity)
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
            else float((_replacement(replacements, name, b, weight).double() - weight.double()).square().sum()))
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
