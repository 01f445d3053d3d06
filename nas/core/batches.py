"""Token streams cut into training and evaluation batches: rows of a stream, BPTT chunks, shuffled context windows."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from nas.core.data import DataError


def stream_batches(stream: torch.Tensor, batch_size: int, bptt: int) -> torch.Tensor:
    """Lay a token stream out as ``batch_size`` contiguous rows (``[batch, length]``).

    Row ``b`` continues in the next chunk, so an LSTM carries its state across chunks.
    Tokens that do not fill a whole column are dropped (fewer than ``batch_size``).
    """
    length = stream.numel() // batch_size
    if length < 2:
        raise DataError(f"stream of {stream.numel()} tokens is too short for batch size {batch_size}")
    return stream[: length * batch_size].view(batch_size, length)


def iter_stream_chunks(rows: torch.Tensor, bptt: int,
                       start: int = 0) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield ``(index, inputs, targets)`` chunks of ``bptt`` steps from batched rows."""
    n_chunks = num_stream_chunks(rows, bptt)
    for index in range(start, n_chunks):
        begin = index * bptt
        end = min(begin + bptt, rows.size(1) - 1)
        yield index, rows[:, begin:end], rows[:, begin + 1 : end + 1]


def num_stream_chunks(rows: torch.Tensor, bptt: int) -> int:
    """Number of chunks :func:`iter_stream_chunks` yields."""
    return (rows.size(1) - 1 + bptt - 1) // bptt


def window_batches(stream: torch.Tensor, context: int, batch_size: int, generator: torch.Generator
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Cut a stream into fixed context windows, shuffled, grouped into batches.

    A random offset (from ``generator``) shifts the window grid each epoch so that
    every position is sometimes near the start of a window.
    """
    offset = int(torch.randint(0, context, (1,), generator=generator))
    usable = (stream.numel() - 1 - offset) // context
    if usable < 1:
        raise DataError(f"stream of {stream.numel()} tokens is shorter than one context of {context}")
    inputs = stream[offset : offset + usable * context].view(usable, context)
    targets = stream[offset + 1 : offset + 1 + usable * context].view(usable, context)
    order = torch.randperm(usable, generator=generator)
    return [(inputs[order[i : i + batch_size]], targets[order[i : i + batch_size]])
            for i in range(0, usable, batch_size)]


def check_token_batches(batches: Iterable[Any], what: str = "batches") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``batches`` as a list of ``(inputs, targets)`` pairs of equal, non-empty ``[batch, time]`` shapes.

    Raises ValueError naming the offending pair (``what[i]``) or an empty input.
    """
    checked = []
    for i, batch in enumerate(batches):
        if not isinstance(batch, tuple | list) or len(batch) != 2:
            raise ValueError(f"{what}[{i}] must be an (inputs, targets) pair, got {type(batch).__name__}")
        inputs, targets = batch
        if inputs.dim() != 2 or inputs.shape != targets.shape or inputs.numel() == 0:
            raise ValueError(f"{what}[{i}]: inputs and targets must be equal non-empty [batch, time] shapes, "
                             f"got {tuple(inputs.shape)} and {tuple(targets.shape)}")
        checked.append((inputs, targets))
    if not checked:
        raise ValueError(f"{what} is empty; expected at least one (inputs, targets) pair")
    return checked
