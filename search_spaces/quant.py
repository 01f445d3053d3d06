"""Symmetric low-bit weight quantizer with a closed-form scale (pure functions, no module state).

The table is the papers' narrow-range, zero-included grid ``alpha * {0, ±1, ..., ±qmax}`` with
``qmax = 2^(b-1) - 1`` for ``b >= 2``, and the binary table ``{-alpha, +alpha}`` for ``b = 1``.
32 bits means full precision: the weight is returned unchanged.

The scale ``alpha`` minimizes the squared error ``||W - alpha*q||^2``. The papers' closed form is
alternating projection (Lloyd-style): ``q = clip(round(W/alpha))`` then ``alpha = <W,q>/<q,q>``;
each half-step can only lower the error, so it converges in a few steps, but only to the local
optimum nearest its start (the error is piecewise quadratic in alpha with many local minima). So:
- ``method="exact"``: sweep every breakpoint of the error (O(numel * qmax) memory) for the global
  optimum; ``"auto"`` (the default) uses it for small clusters (numel * qmax <= 2^20), which covers
  node-level rows and low-bit gate matrices;
- ``method="alternating"``: score a grid of starting scales between the mean-abs and max-abs
  scales, descend from the best. Measured on 4096 Gaussian/Laplace/Student-t/uniform values it
  is within ~1e-3 (4-6 bits) to a few % (8 bits, rugged fine-scale error) of the exact optimum.
Both are checked to be never worse than max-abs scaling ``max|W|/qmax``.

Granularity ``"matrix"``: one alpha per tensor; ``"row"``: one per output row (dim 0, node level),
batched by viewing the tensor as ``[rows, -1]``.

Alpha is solved and returned in float32 (float64 for float64 input), so bf16/fp16 weights get an
accurate scale; the dequantized weight comes back in the input's dtype.

Zero tensors (or zero rows) get alpha = 0 exactly and a weight of exactly 0; division by alpha is
guarded, so codes are 0 (b >= 2) or +1 (b = 1, sign(0) = +1) and everything stays finite.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 8, 16, 32)
FULL_PRECISION = 32
GRANULARITIES = ("matrix", "row")
METHODS = ("auto", "exact", "alternating")

# "auto" solves exactly while the sweep is small: 2^20 breakpoints (numel * qmax) is < 100 MiB.
_EXACT_BUDGET = 2**20
# Starting scales scored for the alternating projection (mean-abs to max-abs), one pass each.
_GRID_STARTS = 16


class QuantResult(NamedTuple):
    """Output of :func:`quantize`. ``codes`` and ``alpha`` are None at full precision."""

    weight: torch.Tensor  # dequantized weight, same dtype/shape/device as the input
    codes: torch.Tensor | None  # integer codes, same shape as the input
    alpha: torch.Tensor | None  # scalar ("matrix") or [rows, 1, ...] ("row"), compute dtype


def _check_bits(bits: int) -> None:
    # Integral, not int: numpy integers from an argmax are fine; bool and 2.0 are not bit-widths.
    if not isinstance(bits, numbers.Integral) or isinstance(bits, bool) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r} is not supported; expected one of {SUPPORTED_BITS}")


def _check_low_bit(bits: int) -> None:
    _check_bits(bits)
    if bits == FULL_PRECISION:
        raise ValueError(f"bits={bits} is full precision: it has no integer table, codes or scale")


def levels(bits: int) -> int:
    """Number of distinct values in the table: 2 for b=1, ``2^b - 1`` otherwise (not for 32 bits)."""
    _check_low_bit(bits)
    return 2 if bits == 1 else 2 ** int(bits) - 1


def qmax(bits: int) -> int:
    """Largest integer code magnitude: 1 for b=1, ``2^(b-1) - 1`` otherwise (not for 32 bits)."""
    _check_low_bit(bits)
    return 1 if bits == 1 else 2 ** (int(bits) - 1) - 1


def _compute_dtype(w: torch.Tensor) -> torch.dtype:
    # Sums over millions of low-precision values lose too much; float64 stays float64.
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def _rows(w: torch.Tensor, granularity: str) -> torch.Tensor:
    """View ``w`` as ``[rows, n]`` in the compute dtype."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is not supported; expected one of {GRANULARITIES}")
    if not torch.is_floating_point(w):
        raise ValueError(f"w must be a floating-point tensor, got dtype {w.dtype}")
    w = w.detach().to(_compute_dtype(w))
    if granularity == "matrix":
        return w.reshape(1, -1)
    if w.dim() == 0:
        raise ValueError("granularity='row' needs a tensor with at least one dimension, got a scalar")
    return w.reshape(w.shape[0], -1)


def _alpha_shape(w: torch.Tensor, granularity: str) -> tuple[int, ...]:
    # Broadcastable against w: () for one scale, [rows, 1, ...] for per-row scales.
    return () if granularity == "matrix" else (w.shape[0],) + (1,) * (w.dim() - 1)


def _round_codes(w: torch.Tensor, bits: int, alpha: torch.Tensor) -> torch.Tensor:
    """Float codes in [-qmax, qmax] (b=1: sign with sign(0)=+1); alpha must broadcast against w."""
    if bits == 1:
        return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)
    # alpha == 0 only for all-zero rows: divide by 1 there so codes are 0, not NaN.
    safe = torch.where(alpha > 0, alpha, torch.ones_like(alpha))
    m = qmax(bits)
    return torch.clamp(torch.round(w / safe), -m, m)


def _sse(w2: torch.Tensor, alpha: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (w2 - alpha * q).square().sum(dim=1, keepdim=True)


def _keep_better(
    w2: torch.Tensor, bits: int, alpha: torch.Tensor, best_alpha: torch.Tensor, best_err: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, ``alpha`` where it beats ``best_err`` strictly, else the incumbent."""
    err = _sse(w2, alpha, _round_codes(w2, bits, alpha))
    better = err < best_err
    return torch.where(better, alpha, best_alpha), torch.where(better, err, best_err)


def _alternating_rows(w2: torch.Tensor, bits: int, iters: int) -> torch.Tensor:
    """Alternating projection per row of ``w2`` ([rows, n]) from the best of several starts -> [rows, 1]."""
    m = qmax(bits)
    absw = w2.abs()
    max_abs = absw.amax(dim=1, keepdim=True) / m
    # Mean-abs start: for a uniform [-a, a] weight mean|W| = a/2 and the optimal step is ~a/(qmax+1/2),
    # so 2*mean|W|/(qmax+1/2) lands near the optimum of bell-shaped weights with clipped tails.
    mean_abs = 2.0 * absw.mean(dim=1, keepdim=True) / (m + 0.5)
    # The error is piecewise quadratic in alpha with many local minima and alternating projection
    # only descends into the nearest one; scoring a grid of starts (one pass each) and descending
    # from the best is cheaper than descending from every start and, measured, about as good.
    lo = torch.minimum(mean_abs, max_abs)
    starts = [mean_abs] + [lo + (max_abs - lo) * (k / _GRID_STARTS) for k in range(_GRID_STARTS)]
    best_alpha, best_err = max_abs, _sse(w2, max_abs, _round_codes(w2, bits, max_abs))
    for start in starts:
        best_alpha, best_err = _keep_better(w2, bits, start, best_alpha, best_err)

    alpha = best_alpha
    q = _round_codes(w2, bits, alpha)
    for _ in range(iters):
        qq = q.square().sum(dim=1, keepdim=True)
        # <q,q> = 0 only for zero rows; keep their alpha (the update would be 0/0).
        alpha = torch.where(qq > 0, (w2 * q).sum(dim=1, keepdim=True) / qq.clamp_min(1), alpha)
        q_new = _round_codes(w2, bits, alpha)
        if torch.equal(q_new, q):  # fixed point: alpha is optimal for q and q for alpha
            break
        q = q_new
    # Each half-step lowers the error, so the last alpha is the best; compare anyway for safety.
    return _keep_better(w2, bits, alpha, best_alpha, best_err)[0]


def _exact_rows(w2: torch.Tensor, bits: int) -> torch.Tensor:
    """Global least-squares alpha per row by sweeping every breakpoint of the error in alpha.

    ``|q_i|`` steps from k to k+1 when alpha falls below ``|w_i|/(k+1/2)`` (k < qmax), so between
    consecutive breakpoints q is fixed and the error is a parabola in alpha with minimum
    ``<|W|,|q|>/<q,q>``, clamped to the interval. Prefix sums over the sorted breakpoints give
    every interval's optimum at once: O(n*qmax log) time and memory, so only for small clusters.
    """
    a = w2.abs().to(torch.float64)  # float64: the error formula below subtracts large sums
    m = qmax(bits)
    half = torch.arange(m, dtype=a.dtype, device=a.device) + 0.5
    t, idx = (a[:, :, None] / half).reshape(a.shape[0], -1).sort(dim=1, descending=True, stable=True)
    k = idx % m
    s1 = a.gather(1, idx // m).cumsum(dim=1)  # crossing adds |w_i| to <|W|,|q|>
    s2 = (2 * k + 1).to(a.dtype).cumsum(dim=1)  # and (k+1)^2 - k^2 to <q,q>
    lower = torch.cat([t[:, 1:], torch.zeros_like(t[:, :1])], dim=1)
    alpha = torch.minimum(torch.maximum(s1 / s2, lower), t)
    err = a.square().sum(dim=1, keepdim=True) - 2 * alpha * s1 + alpha.square() * s2
    return alpha.gather(1, err.argmin(dim=1, keepdim=True)).to(w2.dtype)


@torch.no_grad()
def _solve_rows(w2: torch.Tensor, bits: int, iters: int, method: str) -> torch.Tensor:
    """Best alpha per row of ``w2`` ([rows, n]) -> [rows, 1]."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not supported; expected one of {METHODS}")
    if w2.shape[1] == 0:  # empty rows: nothing to fit, treat like zero rows
        return w2.new_zeros(w2.shape[0], 1)
    if bits == 1:
        # q = sign(W) does not depend on alpha, so <W,q>/<q,q> = mean|W| is the exact optimum.
        return w2.abs().mean(dim=1, keepdim=True)
    exact = method == "exact" or (method == "auto" and w2.numel() * qmax(bits) <= _EXACT_BUDGET)
    alpha = _exact_rows(w2, bits) if exact else _alternating_rows(w2, bits, iters)
    # Guarantee (also against float rounding of the exact alpha): never worse than max-abs.
    max_abs = w2.abs().amax(dim=1, keepdim=True) / qmax(bits)
    best, _ = _keep_better(w2, bits, alpha, max_abs, _sse(w2, max_abs, _round_codes(w2, bits, max_abs)))
    return best


def solve_scale(
    w: torch.Tensor, bits: int, granularity: str = "matrix", iters: int = 10, method: str = "auto"
) -> torch.Tensor:
    """Least-squares scale alpha for ``w`` at ``bits``.

    ``method="alternating"``: alternating projection from the best of a grid of starting scales,
    at most ``iters`` steps (stops early once q no longer changes). ``"exact"``: global optimum by a breakpoint sweep,
    O(numel * qmax) memory. ``"auto"`` (default): exact while ``numel * qmax <= 2^20``, else
    alternating. For b=1, alpha = mean|W| is exact whatever the method.

    Returns a 0-d tensor (``"matrix"``) or one alpha per dim-0 row shaped ``[rows, 1, ...]``
    (``"row"``), in float32 (float64 for float64 input), on ``w``'s device. Never worse than the
    max-abs scale ``max|W|/qmax``. All-zero tensors/rows get alpha = 0. Raises ValueError for
    32 bits (full precision has no scale) and unsupported bits.
    """
    _check_low_bit(bits)
    if iters < 0:
        raise ValueError(f"iters={iters} must be >= 0")
    w2 = _rows(w, granularity)
    return _solve_rows(w2, bits, iters, method).reshape(_alpha_shape(w, granularity))


def _code_dtype(bits: int) -> torch.dtype:
    return torch.int8 if bits <= 8 else torch.int16


@torch.no_grad()
def quantize_codes(w: torch.Tensor, bits: int, alpha: torch.Tensor) -> torch.Tensor:
    """Integer codes of ``w`` on the table ``alpha * q`` (int8 up to 8 bits, int16 for 16 bits).

    ``alpha`` must broadcast against ``w``; rows with alpha = 0 get code 0 (b=1: +1).
    For b=1 the codes are sign(W) in {-1, +1} with sign(0) = +1.
    """
    _check_low_bit(bits)
    w = w.detach().to(_compute_dtype(w))
    return _round_codes(w, bits, alpha.to(w.dtype)).to(_code_dtype(bits))


def dequantize(codes: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """``alpha * codes`` as a float tensor in alpha's dtype."""
    return codes.to(alpha.dtype) * alpha


@torch.no_grad()
def quantize(
    w: torch.Tensor, bits: int, granularity: str = "matrix", iters: int = 10, method: str = "auto"
) -> QuantResult:
    """Quantize ``w`` to ``bits`` with the least-squares scale; 32 bits returns ``w`` unchanged.

    See :func:`solve_scale` for ``granularity``, ``iters`` and ``method``.
    """
    _check_bits(bits)
    if bits == FULL_PRECISION:
        return QuantResult(w, None, None)
    alpha = solve_scale(w, bits, granularity, iters, method)
    codes = quantize_codes(w, bits, alpha)
    return QuantResult(dequantize(codes, alpha).to(w.dtype), codes, alpha)


@torch.no_grad()
def table_values(w: torch.Tensor, bits: int, alpha: torch.Tensor) -> torch.Tensor:
    """``alpha * codes(w)`` in ``w``'s dtype without an integer round trip (hot loops; same values
    as ``dequantize(quantize_codes(w, bits, alpha), alpha)`` for float32 weights). 32 returns ``w``."""
    _check_bits(bits)
    if bits == FULL_PRECISION:
        return w.detach()
    w, alpha = w.detach(), alpha.to(w.dtype)
    if bits == 1:
        return torch.where(w >= 0, alpha, -alpha)
    # Same arithmetic as _round_codes, in place to spare the allocations.
    safe = torch.where(alpha > 0, alpha, torch.ones_like(alpha))
    m = qmax(bits)
    return torch.div(w, safe).round_().clamp_(-m, m).mul_(alpha)


class _STEQuantize(torch.autograd.Function):
    """Forward: the table value ``alpha * q(w)``. Backward: plain straight-through identity.

    The gradient is NOT zeroed outside the clipping range: clipped weights keep receiving the
    upstream gradient (the plain STE of the papers' baseline), and alpha gets no gradient.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, w: torch.Tensor, bits: int, alpha: torch.Tensor):
        return dequantize(quantize_codes(w, bits, alpha), alpha).to(w.dtype)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor):
        return grad, None, None


def fake_quantize(
    w: torch.Tensor, bits: int, granularity: str = "matrix", alpha: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantized weight in the forward pass, identity (straight-through) gradient to ``w``.

    ``alpha`` is solved under no_grad when not given (``granularity`` is used only then) and is
    treated as a constant. 32 bits returns ``w`` itself.
    """
    _check_bits(bits)
    if bits == FULL_PRECISION:
        return w
    if alpha is None:
        alpha = solve_scale(w, bits, granularity)
    return _STEQuantize.apply(w, bits, alpha.detach())


# --- affine per-tensor quantizer for the FP leftovers (biases, LayerNorm) -------------------------

AFFINE_BITS = (8, 16)  # widths of the leftover quantizer; codes are stored as uint8 / uint16


class AffineResult(NamedTuple):
    """Output of :func:`quantize_affine`: ``weight == low + scale * codes`` exactly."""

    weight: torch.Tensor  # dequantized tensor, same dtype/shape/device as the input
    codes: torch.Tensor  # unsigned codes in [0, 2^bits - 1] as int32, same shape as the input
    scale: torch.Tensor  # 0-d float32 step between levels
    low: torch.Tensor  # 0-d float32 value of code 0 (the tensor's minimum)


def _check_affine_bits(bits: int) -> None:
    if not isinstance(bits, numbers.Integral) or isinstance(bits, bool) or bits not in AFFINE_BITS:
        raise ValueError(f"bits={bits!r} is not supported by the affine quantizer; expected one of {AFFINE_BITS}")


def dequantize_affine(codes: torch.Tensor, scale: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """``low + scale * codes`` in float32; the one formula both quantization and packed reload use."""
    return low.to(torch.float32) + scale.to(torch.float32) * codes.to(torch.float32)


@torch.no_grad()
def quantize_affine(w: torch.Tensor, bits: int) -> AffineResult:
    """Per-tensor asymmetric quantization on ``2^bits`` levels from ``min(w)`` to ``max(w)``.

    Asymmetric, not the symmetric table of the weight clusters, because leftovers are not
    zero-centred: a softmax bias sits mostly below zero and a LayerNorm gain around 1, so a
    symmetric grid would waste most of its levels. Min/max (no clipping) keeps the extremes
    exact: a single large bias (often ``<eos>``'s) matters to the next-word distribution. A
    constant tensor gets ``scale = 0`` and is reproduced exactly. Raises ValueError for
    non-finite values, which have no affine code.
    """
    _check_affine_bits(bits)
    if not torch.is_floating_point(w):
        raise ValueError(f"w must be a floating-point tensor, got dtype {w.dtype}")
    flat = w.detach().to(torch.float32).reshape(-1)
    if flat.numel() == 0:
        zero = flat.new_zeros(())
        return AffineResult(w.detach().clone(), torch.zeros(w.shape, dtype=torch.int32, device=w.device), zero, zero)
    if not bool(torch.isfinite(flat).all()):
        raise ValueError("cannot quantize a tensor with inf or NaN values")
    low, high = flat.min(), flat.max()
    top = 2 ** int(bits) - 1
    scale = (high - low) / top
    # scale == 0 only for a constant tensor: every code is 0 and low is the exact value.
    safe = scale if float(scale) > 0 else torch.ones_like(scale)
    codes = torch.clamp(torch.round((flat - low) / safe), 0, top).to(torch.int32).reshape(w.shape)
    return AffineResult(dequantize_affine(codes, scale, low).to(w.dtype), codes, scale, low)


class _STEAffine(torch.autograd.Function):
    """Forward: :func:`quantize_affine`'s value (bit-identical). Backward: straight-through identity."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, w: torch.Tensor, bits: int):
        return quantize_affine(w, bits).weight

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor):
        return grad, None


def fake_quantize_affine(w: torch.Tensor, bits: int) -> torch.Tensor:
    """:func:`quantize_affine`'s value in the forward pass, identity gradient to ``w``; 32 returns ``w``."""
    if bits == FULL_PRECISION:
        return w
    _check_affine_bits(bits)
    return _STEAffine.apply(w, bits)


@torch.no_grad()
def quantization_error(w: torch.Tensor, bits: int, granularity: str = "matrix") -> float:
    """Squared L2 error ``||Q(W) - W||^2`` (0.0 at 32 bits).

    Measured in the compute dtype (float32, or float64 for float64 input) before any cast back
    to a low-precision input dtype, so it scores the table itself, not bf16 rounding.
    """
    _check_bits(bits)
    if bits == FULL_PRECISION:
        return 0.0
    w_c = w.detach().to(_compute_dtype(w))
    q = quantize(w_c, bits, granularity).weight
    return float((q - w_c).square().sum())
