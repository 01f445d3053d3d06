"""KL sensitivity: how far each cluster's quantization moves the model's next-token distribution."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from nas.search.sensitivity import (
    Replacements,
    ScoreTable,
    check_candidates,
    check_granularity,
    replacement_weight,
    resolve_clusters,
)
from search_spaces.clusters import cluster_weight
from search_spaces.models.protocol import as_lm
from search_spaces.quant import FULL_PRECISION, quantize


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
    table_bits = check_candidates(model, candidates)
    clusters = resolve_clusters(model, table_bits)
    check_granularity(granularity)
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
                               else replacement_weight(replacements, name, bits, original))
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
