"""One optimizer step of (re)training, shared by the run-folder loop and in-memory retraining."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from nas.config.sections import RetrainSection, TrainSection
from nas.retrain.hooks import TrainingHooks

Batch = tuple[torch.Tensor, torch.Tensor]


def train_step(net: nn.Module, model: nn.Module, hooks: TrainingHooks, optimizer: torch.optim.Optimizer,
               section: TrainSection | RetrainSection, batch: Batch, state: Any, lr: float, global_step: int, *,
               diverged: Callable[[float, float], Exception],
               mix: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
               ) -> tuple[float, Any]:
    """One step at learning rate ``lr``: forward through ``net`` (``model`` or its DDP wrapper), the
    hooks' penalty, backward, clipping, the hooks around the update; returns the cross-entropy and
    the detached recurrent state (None for window models).

    ``mix(inputs, logits, loss)`` replaces the loss being minimised (distillation); the returned
    loss stays the cross-entropy. A non-finite loss or gradient norm raises ``diverged(loss,
    norm)`` before the weights change.
    """
    inputs, targets = batch
    for group in optimizer.param_groups:
        group["lr"] = lr
    hooks.before_forward(model)
    out = net(inputs, state, targets)
    optimizer.zero_grad(set_to_none=True)
    scale = inputs.size(1) if section.loss_reduction == "sum_time" else 1
    extra = hooks.penalty(model)
    objective = out.loss if mix is None else mix(inputs, out.logits, out.loss)
    ((objective if extra is None else objective + extra) * scale).backward()
    hooks.before_step(model)
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), section.clip if section.clip > 0 else math.inf))
    loss = float(out.loss.detach())
    if not (math.isfinite(loss) and math.isfinite(norm)):
        raise diverged(loss, norm)
    optimizer.step()
    hooks.after_step(model, global_step, lr=lr, loss_scale=float(scale))
    recurrent = hasattr(model, "init_state") and out.state is not None
    return loss, model.detach_state(out.state) if recurrent else None
