"""Straight-through quantization-aware retraining (STE) and the cluster bookkeeping it shares with ADMM.

STE (BinaryConnect-style weight swapping): before each forward the latent weights are replaced
by ``alpha * codes(W)``; after backward the latent weights come back, so the gradient taken at
Q(W) updates W unchanged (the identity straight-through estimator). This works for every module,
torch's fused nn.LSTM included, without parametrizations. The scales ``alpha`` are re-solved on
the latent weights once per period (``rescale_every`` steps) and held fixed in between; the
network that is validated, checkpointed and finally kept is the one the forward trained.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from nas.train import TrainingHooks
from search_spaces.precision import PrecisionMap, cluster_weight, find_clusters
from search_spaces.quant import FULL_PRECISION, quantize, quantize_codes, solve_scale


class QuantizedClusters:
    """The quantized (below 32-bit) clusters of one model under one precision map."""

    def __init__(self, model: nn.Module, precision: PrecisionMap) -> None:
        precision.validate(model)
        self.precision = precision
        clusters = find_clusters(model)
        self.clusters = {name: clusters[name] for name, bits in precision.bits.items()
                         if bits < FULL_PRECISION}

    def views(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Live views of every quantized cluster's weights."""
        return {name: cluster_weight(model, c) for name, c in self.clusters.items()}

    def bits(self, name: str) -> int:
        """The cluster's bit-width."""
        return int(self.precision.bits[name])

    def solve_scale(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The closed-form least-squares scale of ``tensor`` on the cluster's table."""
        return solve_scale(tensor.detach(), self.bits(name), self.precision.granularity)

    def codes(self, name: str, tensor: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """Integer codes of ``tensor`` on the table ``alpha * q``."""
        return quantize_codes(tensor, self.bits(name), alpha.to(tensor.device))

    def project(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Nearest point of the cluster's table (closed-form alpha)."""
        return quantize(tensor.detach(), self.bits(name), self.precision.granularity).weight

    @torch.no_grad()
    def hard_project_(self, model: nn.Module) -> None:
        """Write the quantized weights into the model, in place."""
        for name, view in self.views(model).items():
            view.copy_(self.project(name, view))

    @contextlib.contextmanager
    def swapped(self, model: nn.Module,
                project: Callable[[dict[str, torch.Tensor]], None] | None = None) -> Iterator[None]:
        """Run the body with quantized weights, then put the latent weights back.

        ``project(views)`` writes the quantized weights into the live views; the default is
        the closed-form projection (:meth:`hard_project_`).
        """
        views = self.views(model)
        latent = {name: view.detach().clone() for name, view in views.items()}
        if project is None:
            self.hard_project_(model)
        else:
            project(views)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, view in views.items():
                    view.copy_(latent[name])


class SteHooks(TrainingHooks):
    """Straight-through quantization-aware training (see the module docstring).

    Scales are re-solved every ``rescale_every`` steps and reused in between, so the per-step
    cost is one rounding pass, not a scale search.
    """

    def __init__(self, model: nn.Module, precision: PrecisionMap, *, rescale_every: int = 200,
                 rescale_every_epochs: float = 0.0) -> None:
        if rescale_every < 1 or rescale_every_epochs < 0:
            raise ValueError(f"need rescale_every >= 1 and rescale_every_epochs >= 0, got {rescale_every} and "
                             f"{rescale_every_epochs}")
        self.q = QuantizedClusters(model, precision)
        self.rescale_every = rescale_every
        self.rescale_every_epochs = rescale_every_epochs
        self.steps_per_epoch = 0
        self.device = next(model.parameters()).device
        self.alpha: dict[str, torch.Tensor] = {}
        self.latent: dict[str, torch.Tensor] = {}
        self.steps = 0

    def begin(self, steps_per_epoch: int) -> None:
        """A period given in epochs becomes ``round(epochs * steps_per_epoch)`` steps (at least 1)."""
        self.steps_per_epoch = steps_per_epoch
        if self.rescale_every_epochs > 0:
            self.rescale_every = max(1, round(self.rescale_every_epochs * steps_per_epoch))

    @torch.no_grad()
    def before_forward(self, model: nn.Module) -> None:
        views = self.q.views(model)
        if self.steps % self.rescale_every == 0 or not self.alpha:
            self.alpha = {n: self.q.solve_scale(n, v) for n, v in views.items()}
        self.latent = {n: v.detach().clone() for n, v in views.items()}
        self._project_with_trained_scales(views)

    @torch.no_grad()
    def _project_with_trained_scales(self, views: dict[str, torch.Tensor]) -> None:
        """Write ``alpha * codes`` with the scales the last training steps used.

        Validation and the final weights must be the network training saw: re-solving the
        least-squares scales on the latent weights instead moves rounding thresholds under
        weights that STE has parked near them. On the PTB LSTM at row granularity that cost
        25% perplexity (210 against 169 on a valid slice; RESULTS "Distilled retraining").
        """
        if not self.alpha:  # nothing trained yet: the closed-form scales
            self.alpha = {n: self.q.solve_scale(n, v) for n, v in views.items()}
        for name, view in views.items():
            alpha = self.alpha[name].to(view.device)
            codes = self.q.codes(name, view, alpha)
            view.copy_(codes.to(view.dtype) * alpha.to(view.dtype))

    @torch.no_grad()
    def before_step(self, model: nn.Module) -> None:
        for name, view in self.q.views(model).items():
            view.copy_(self.latent[name])
        self.latent = {}

    def after_step(self, model: nn.Module, global_step: int, *, lr: float, loss_scale: float) -> None:
        self.steps += 1

    def evaluation(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        return self.q.swapped(model, self._project_with_trained_scales)

    def finish(self, model: nn.Module) -> None:
        # best.pt holds weights already on a table (projected with the scales of its epoch, not
        # necessarily the last one): the least-squares projection returns them unchanged.
        self.q.hard_project_(model)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "alpha": {k: v.cpu() for k, v in self.alpha.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.steps = int(state["steps"])
        self.alpha = {k: v.to(self.device) for k, v in state["alpha"].items()}
