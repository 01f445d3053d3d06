"""Helpers of the contract suites."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from torch import nn


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], list[bool]]:
    """Every state-dict tensor (cloned) and every module's training flag."""
    return ({k: v.detach().clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()])


def assert_same_state(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor], what: str) -> None:
    """The same keys, dtypes, shapes and values, bit for bit."""
    assert list(before) == list(after), f"{what}: state-dict keys changed"
    changed = [k for k, v in before.items() if v.dtype != after[k].dtype or not torch.equal(v, after[k])]
    assert not changed, f"{what}: tensors changed: {changed}"


@contextlib.contextmanager
def ambient_rng(seed: int) -> Iterator[None]:
    """Seed torch's, Python's and NumPy's global RNGs with ``seed`` for the block; restore them after."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)
