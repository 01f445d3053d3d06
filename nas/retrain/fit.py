"""Quantization-aware retraining of a model in memory: what :func:`nas.api.retrain` runs.

The same hooks as ``mpnas retrain`` (STE, nas/retrain/ste.py; ADMM, nas/retrain/admm.py) and the same optimiser,
learning-rate schedule, loss scaling, gradient clipping and divergence check as nas/retrain/loop.py,
without an experiment file, a corpus, a run folder or checkpoints. The data is a 1-D token stream
(cut as the ``data`` section would: contiguous rows of ``bptt`` steps with the state carried for
recurrent models, shuffled windows of ``context`` tokens, at most the model's own, otherwise) or a sequence of
``(inputs, targets)`` batches (each run from the model's initial state). Every epoch is trained
(no validation picks a best one); at the end the weights are those the forward trained with,
projected onto their tables (as ``best.pt`` holds them), and the leftovers at the map's
``leftover_bits``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from nas.config.options import RetrainConfig
from nas.core.batches import check_token_batches, iter_stream_chunks, stream_batches, window_batches
from nas.retrain.hooks import TrainingDivergedError, TrainingHooks
from nas.retrain.loop import learning_rate, make_optimizer
from nas.retrain.run import make_hooks
from nas.retrain.step import train_step
from search_spaces.models.protocol import as_lm
from search_spaces.precision import PrecisionMap

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]


def _checked_batches(data: Iterable[Any]) -> list[Batch]:
    """``data`` as a list of ``(inputs, targets)`` pairs of equal ``[batch, time]`` shapes."""
    return check_token_batches(data, "retraining batches")


def epoch_batches(model: nn.Module, stream: torch.Tensor, config: RetrainConfig,
                  generator: torch.Generator) -> list[Batch]:
    """One epoch of a token stream: BPTT chunks of contiguous rows (recurrent) or shuffled windows."""
    if hasattr(model, "init_state"):
        rows = stream_batches(stream, config.batch_size, config.bptt)
        return [(x, y) for _, x, y in iter_stream_chunks(rows, config.bptt)]
    # windows of config.context tokens, but never longer than the model's own context
    context = min(config.context, getattr(getattr(model, "config", None), "context", None) or config.context)
    return window_batches(stream, context, config.batch_size, generator)


def _diverged(global_step: int, lr: float) -> Callable[[float, float], TrainingDivergedError]:
    """The error of a step whose loss or gradient norm is not finite."""
    return lambda loss, norm: TrainingDivergedError(
        f"retraining diverged at step {global_step + 1}: loss={loss}, gradient norm={norm}, lr={lr:g}; "
        "lower lr or set clip")


def _train_epochs(model: nn.Module, hooks: TrainingHooks, config: RetrainConfig,
                  data: torch.Tensor | Sequence[Batch], device: torch.device, generator: torch.Generator) -> None:
    section = config.section()
    optimizer = make_optimizer(section, model.parameters())
    stream = isinstance(data, torch.Tensor)
    first = epoch_batches(model, data, config, generator) if stream else data
    steps = min(len(first), config.max_steps_per_epoch or len(first))
    hooks.begin(steps)
    global_step = 0
    for epoch in range(config.epochs):
        batches = first if epoch == 0 else epoch_batches(model, data, config, generator) if stream else data
        model.train()
        state, total = None, 0.0
        for inputs, targets in batches[:steps]:
            lr = learning_rate(section, epoch, global_step, steps * config.epochs)
            loss, state = train_step(model, model, hooks, optimizer, section, (inputs.to(device), targets.to(device)),
                                     state if stream else None, lr, global_step, diverged=_diverged(global_step, lr))
            total += loss
            global_step += 1
        log.info("retrain (%s) epoch %d/%d: train loss %.4f over %d steps", config.method, epoch + 1,
                 config.epochs, total / max(1, steps), steps)


def retrain_model(model: nn.Module, precision: PrecisionMap, data: torch.Tensor | Iterable[Batch],
                  config: RetrainConfig, *, device: torch.device | str | None = None) -> nn.Module:
    """Retrain ``model`` in place towards ``precision`` (module docstring); returns ``model``.

    ``model`` is an mpnas LM or a plain torch module (:func:`~search_spaces.models.protocol.as_lm`;
    a window model runs on windows of ``config.context`` tokens). The global RNG (dropout) is seeded
    with ``config.seed`` inside and restored afterwards.
    """
    lm = as_lm(model, context=config.context)
    precision.validate(lm)
    if isinstance(data, torch.Tensor):
        if data.dim() != 1 or data.is_floating_point():
            raise ValueError(f"a token stream must be a 1-D integer tensor, got {data.dtype} {tuple(data.shape)}")
    else:
        data = _checked_batches(data)
    dev = torch.device(device) if device is not None else next(lm.parameters()).device
    lm.to(dev)
    was_training = lm.training
    hooks = make_hooks(config.section(), precision, config.method)(lm)
    generator = torch.Generator().manual_seed(config.seed)
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(config.seed)
        _train_epochs(lm, hooks, config, data, dev, generator)
    with hooks.evaluation(lm):  # the weights the forward trained with, on their tables
        final = {k: v.detach().clone() for k, v in lm.state_dict().items()}
    lm.load_state_dict(final)
    hooks.finish(lm)
    lm.train(was_training)
    return model
