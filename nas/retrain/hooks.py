"""What customises and positions a training run: the hooks a retraining method plugs in, where a
run stands, how one call runs."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from nas.core.errors import MpnasError


class TrainingDivergedError(MpnasError, RuntimeError):
    """The loss or gradient norm became NaN or infinite (the message says which setting to lower)."""


class TrainingHooks:
    """Extension points of the training loop; the defaults do nothing (plain FP training).

    Quantization-aware retraining (ADMM, STE) subclasses this instead of copying the loop.
    """

    def begin(self, steps_per_epoch: int) -> None:
        """Called once before the first step of this call (fresh or resumed), with the epoch length."""

    def before_forward(self, model: nn.Module) -> None:
        """Called before each training forward pass."""

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """An extra loss term added to the cross-entropy (before ``loss_reduction`` scaling)."""
        return None

    def before_step(self, model: nn.Module) -> None:
        """Called after backward, before gradient clipping and the optimizer step."""

    def after_step(self, model: nn.Module, global_step: int, *, lr: float, loss_scale: float) -> None:
        """Called after each optimizer step, with the step's learning rate and loss scale.

        ADMM applies its proximal pull here, outside the optimizer, so Adam cannot normalise it away.
        """

    @contextlib.contextmanager
    def evaluation(self, model: nn.Module) -> Iterator[None]:
        """Context in which validation runs and the best checkpoint is taken."""
        yield

    def finish(self, model: nn.Module) -> None:
        """Called once after the last epoch, with the best weights loaded."""

    def postfix(self) -> dict[str, str]:
        """Extra fields for the progress bar."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """State saved in checkpoints so that a resumed run continues exactly."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def metrics(self) -> dict[str, Any]:
        """Extra entries for metrics.json."""
        return {}


@dataclass(frozen=True)
class Position:
    """Where training stands: the next epoch and the next step inside it."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0


@dataclass(frozen=True)
class RunOptions:
    """How one call of :func:`train` runs (not what it trains)."""

    resume: bool = False
    progress: bool = True
    checkpoint_every: int = 0
    stop_after_steps: int | None = None


@dataclass
class EpochStats:
    """Sums over one epoch's steps (this call's part of it)."""

    start: float
    loss: float = 0.0
    count: int = 0
    tokens: int = 0

    def add(self, loss: float, tokens: int) -> None:
        self.loss += loss
        self.count += 1
        self.tokens += tokens

    def tokens_per_s(self) -> float:
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)
