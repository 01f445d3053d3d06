"""Exact perplexity of a language model on a whole token stream.

Every token of the stream is scored exactly once: the stream is preceded by one
``<eos>`` as the start context, so a split of N tokens yields N predictions.

- Recurrent models (with ``init_state``): ``batch_size`` contiguous rows with the hidden
  state carried across chunks; the tokens left over after the rows are scored by
  continuing the last row, so nothing is dropped.
- Window models (Transformers): sliding windows of ``model.config.context`` tokens (or ``context``);
  after the first window each new window scores only its last ``stride`` tokens, so
  every token but the first few sees at least ``context - stride`` tokens of history.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from search_spaces.models.protocol import as_lm, select_state


def _summed_nll(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, state: object
                ) -> tuple[float, object]:
    out = model(inputs, state)
    nll = F.cross_entropy(out.logits.reshape(-1, out.logits.size(-1)).float(), targets.reshape(-1),
                          reduction="sum")
    return float(nll), out.state


def _recurrent_nll(model: nn.Module, stream: torch.Tensor, batch_size: int, bptt: int,
                   device: torch.device) -> float:
    n = stream.numel() - 1  # predictions
    batch_size = max(1, min(batch_size, n))
    length = n // batch_size
    inputs = stream[: batch_size * length].view(batch_size, length).to(device)
    targets = stream[1 : batch_size * length + 1].view(batch_size, length).to(device)
    total = 0.0
    state = None
    for begin in range(0, length, bptt):
        nll, state = _summed_nll(model, inputs[:, begin : begin + bptt], targets[:, begin : begin + bptt], state)
        total += nll
    tail_start = batch_size * length
    if tail_start < n:  # continue the last row over the leftover tokens
        last = select_state(model, state, slice(-1, None)) if state is not None else None
        for begin in range(tail_start, n, bptt):
            end = min(begin + bptt, n)
            nll, last = _summed_nll(model, stream[begin:end].view(1, -1).to(device),
                                    stream[begin + 1 : end + 1].view(1, -1).to(device), last)
            total += nll
    return total


def _window_nll(model: nn.Module, stream: torch.Tensor, batch_size: int, stride: int,
                device: torch.device) -> float:
    context = getattr(getattr(model, "config", None), "context", None)
    if context is None:
        raise ValueError(f"{type(model).__name__} is run in windows (it has no recurrent state) but has no context; "
                         "pass context= (the longest window it takes)")
    stride = max(1, min(stride, context))
    n = stream.numel() - 1
    ends = list(range(min(context, n), n, stride))
    if not ends or ends[-1] != n:
        ends.append(n)
    windows: list[tuple[int, int]] = []  # (window start, number of scored tokens at its end)
    previous = 0
    for end in ends:
        start = max(0, end - context)
        windows.append((start, end - previous))
        previous = end
    total = 0.0
    # The first window may be shorter than `context` (tiny streams); group by length.
    by_length: dict[int, list[tuple[int, int]]] = {}
    for start, scored in windows:
        end = start + min(context, n)
        by_length.setdefault(end - start, []).append((start, scored))
    for length, group in by_length.items():
        for i in range(0, len(group), batch_size):
            chunk = group[i : i + batch_size]
            idx = torch.stack([torch.arange(s, s + length) for s, _ in chunk])
            logits = model(stream[idx].to(device)).logits.float()
            targets = stream[idx + 1].to(device)
            nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                                  reduction="none").view(len(chunk), length)
            for row, (_, scored) in enumerate(chunk):
                total += float(nll[row, length - scored :].sum())
    return total


@torch.no_grad()
def perplexity(model: nn.Module, tokens: torch.Tensor, start_token: int, *, batch_size: int = 10,
               bptt: int = 35, stride: int = 32, device: torch.device | str | None = None,
               context: int | None = None) -> dict[str, float]:
    """Score every token of ``tokens`` (a 1-D id stream); returns loss, ppl and token count.

    ``start_token`` (normally ``<eos>``) is the context before the first token. ``model`` is an
    mpnas LM or a plain torch module (:func:`~search_spaces.models.protocol.as_lm`); ``context`` is
    the window length of a plain window model (mpnas Transformers use their own).
    """
    if tokens.dim() != 1 or tokens.numel() == 0:
        raise ValueError(f"expected a non-empty 1-D token stream, got shape {tuple(tokens.shape)}")
    model = as_lm(model, context=context)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    stream = torch.cat([torch.tensor([start_token]), tokens.cpu()])
    was_training = model.training
    model.eval()
    try:
        if hasattr(model, "init_state"):
            total = _recurrent_nll(model, stream, batch_size, bptt, device)
        else:
            total = _window_nll(model, stream, batch_size, stride, device)
    finally:
        model.train(was_training)
    n = tokens.numel()
    loss = total / n
    # exp overflows a float above a mean loss of ~709 nats (a diverged model): that is infinite perplexity
    return {"loss": loss, "ppl": math.exp(loss) if loss < 709.0 else math.inf, "tokens": float(n)}
