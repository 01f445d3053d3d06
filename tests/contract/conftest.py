"""What every contract test shares: a guard that the session's trained originals stay pristine."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import pytest
import torch
from torch import nn

from tests.contract.common import assert_same_state, snapshot


@pytest.fixture(scope="session")
def _originals(pretrained_lms: Mapping[str, nn.Module]) -> dict[str, tuple[dict[str, torch.Tensor], list[bool]]]:
    return {kind: snapshot(model) for kind, model in pretrained_lms.items()}


@pytest.fixture(autouse=True)
def _originals_stay_pristine(pretrained_lms: Mapping[str, nn.Module], _originals: dict) -> Iterator[None]:
    """After each test: the shared trained LMs are as they were trained (tests work on copies)."""
    yield
    for kind, model in pretrained_lms.items():
        state, modes = _originals[kind]
        assert_same_state(state, model.state_dict(), f"the session's {kind}")
        assert [m.training for m in model.modules()] == modes, f"the session's {kind} changed mode"
