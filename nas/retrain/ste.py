"""Straight-through quantization-aware retraining (STE) and the cluster bookkeeping it shares with ADMM.

STE (BinaryConnect-style weight swapping): before each forward the latent weights are replaced
by ``alpha * codes(W)``; after backward the latent weights come back, so the gradient taken at
Q(W) updates W unchanged (the identity straight-through estimator). This works for every module,
torch's fused nn.LSTM included, without parametrizations. The scales ``alpha`` are re-solved on
the latent weights once per period (``rescale_every`` steps) and held fixed in between; the
network that is validated, checkpointed and finally kept is the one the forward trained.

``learn_scales=True`` learns the scales instead (LSQ, Esser et al. 2020): they start at the
closed-form solution and follow the loss gradient ``dL/dalpha = sum dL/dQ * (codes - W/alpha *
[|W/alpha| <= qmax])`` (rounding passed straight through, clipped weights giving their level),
taken by Adam on ``log alpha`` at ``scale_lr`` (Adam: the step does not depend on the loss
scale; log: alpha stays positive). NNI's LSQ beat every closed-form-scale method on the PTB
LSTM at 2 bits (RESULTS), which is what this is for.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from nas.retrain.hooks import TrainingHooks
from search_spaces.apply import quantize_leftovers_
from search_spaces.clusters import cluster_parameter, cluster_weight, find_clusters, find_leftovers
from search_spaces.precision import PrecisionMap
from search_spaces.quant import FULL_PRECISION, qmax, quantize, quantize_codes, solve_scale


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

    def grads(self, model: nn.Module) -> dict[str, torch.Tensor | None]:
        """The gradient of every quantized cluster (the rows of its parameter's ``.grad``), None if absent."""
        out: dict[str, torch.Tensor | None] = {}
        for name, cluster in self.clusters.items():
            grad = cluster_parameter(model, cluster).grad
            if grad is not None and cluster.rows is not None:
                grad = grad[cluster.rows[0]:cluster.rows[1]]
            out[name] = grad
        return out

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
        """Write the quantized weights (and the map's ``leftover_bits`` leftovers) into the model, in place."""
        for name, view in self.views(model).items():
            view.copy_(self.project(name, view))
        quantize_leftovers_(model, self.precision.leftover_bits)

    @contextlib.contextmanager
    def swapped(self, model: nn.Module,
                project: Callable[[dict[str, torch.Tensor]], None] | None = None) -> Iterator[None]:
        """Run the body with quantized weights, then put the latent weights back.

        ``project(views)`` writes the quantized weights into the live views; the default is
        the closed-form projection (:meth:`hard_project_`).
        """
        views = self.views(model)
        latent = {name: view.detach().clone() for name, view in views.items()}
        # leftovers (biases, LayerNorm) at the map's leftover_bits: what the packed file will hold;
        # they train in full precision, so they come back too
        leftovers = find_leftovers(model) if self.precision.leftover_bits < FULL_PRECISION else {}
        latent_leftovers = {name: tensor.detach().clone() for name, tensor in leftovers.items()}
        if project is None:
            self.hard_project_(model)
        else:
            project(views)
            with torch.no_grad():
                quantize_leftovers_(model, self.precision.leftover_bits)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, view in views.items():
                    view.copy_(latent[name])
                for name, tensor in leftovers.items():
                    tensor.copy_(latent_leftovers[name])


class SteHooks(TrainingHooks):
    """Straight-through quantization-aware training (see the module docstring).

    Scales are re-solved every ``rescale_every`` steps and reused in between, so the per-step
    cost is one rounding pass, not a scale search; with ``learn_scales`` they are solved once and
    then learned (module docstring).
    """

    def __init__(self, model: nn.Module, precision: PrecisionMap, *, rescale_every: int = 200,
                 rescale_every_epochs: float = 0.0, learn_scales: bool = False, scale_lr: float = 1e-3,
                 ste_clip: bool = False) -> None:
        if rescale_every < 1 or rescale_every_epochs < 0 or not scale_lr > 0:
            raise ValueError(f"need rescale_every >= 1, rescale_every_epochs >= 0 and scale_lr > 0, got "
                             f"{rescale_every}, {rescale_every_epochs} and {scale_lr}")
        self.learn_scales, self.scale_lr = learn_scales, scale_lr
        # LSQ's weight gradient: none for weights beyond the table's range (|W/alpha| > qmax)
        self.ste_clip = ste_clip
        self.log_alpha: dict[str, torch.Tensor] = {}
        self.scale_optimizer: torch.optim.Adam | None = None
        # from a checkpoint, until the optimizer exists at the next forward
        self._scale_optimizer_state: dict[str, Any] | None = None
        self._saved_log_alpha: dict[str, torch.Tensor] | None = None
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
        if not self.alpha or (self.steps % self.rescale_every == 0 and not self.learn_scales):
            self.alpha = {n: self.q.solve_scale(n, v) for n, v in views.items()}
        if self.learn_scales and self.scale_optimizer is None:
            self._start_scale_learning()
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

    def _start_scale_learning(self) -> None:
        """Learnable ``log alpha`` from the current scales, and its Adam (state restored on resume)."""
        # alpha = 0 only for all-zero rows, whose codes are 0 whatever the scale
        if self._saved_log_alpha is not None:  # resume: exactly the learned values (exp/log is not exact)
            self.log_alpha = {n: v.to(self.device).requires_grad_(True) for n, v in self._saved_log_alpha.items()}
            self._saved_log_alpha = None
        else:
            self.log_alpha = {n: a.detach().float().clamp_min(1e-30).log().requires_grad_(True)
                              for n, a in self.alpha.items()}
        self.scale_optimizer = torch.optim.Adam(list(self.log_alpha.values()), lr=self.scale_lr)
        if self._scale_optimizer_state is not None:
            self.scale_optimizer.load_state_dict(self._scale_optimizer_state)
            self._scale_optimizer_state = None

    @torch.no_grad()
    def _scale_gradients(self, model: nn.Module) -> None:
        """``d loss / d log alpha`` from the gradient at the quantized weights (LSQ's estimator)."""
        for name, grad in self.q.grads(model).items():
            log_alpha = self.log_alpha[name]
            if grad is None:
                log_alpha.grad = None
                continue
            alpha = self.alpha[name].to(grad.device, torch.float32)
            latent = self.latent[name].to(torch.float32)
            ratio = latent / torch.where(alpha > 0, alpha, torch.ones_like(alpha))
            codes = self.q.codes(name, latent, alpha).to(torch.float32)
            inside = ratio.abs() <= qmax(self.q.bits(name))
            d_alpha = (grad.to(torch.float32) * (codes - torch.where(inside, ratio, 0.0))).sum_to_size(alpha.shape)
            log_alpha.grad = (d_alpha * alpha).to(log_alpha.device)

    @torch.no_grad()
    def _clip_gradients(self, model: nn.Module) -> None:
        """Zero the gradient of weights outside their table's range (the clipped straight-through estimator)."""
        for name, grad in self.q.grads(model).items():
            if grad is None:
                continue
            alpha = self.alpha[name].to(grad.device, torch.float32)
            ratio = self.latent[name].to(torch.float32) / torch.where(alpha > 0, alpha, torch.ones_like(alpha))
            grad.mul_((ratio.abs() <= qmax(self.q.bits(name))).to(grad.dtype))

    @torch.no_grad()
    def before_step(self, model: nn.Module) -> None:
        learning = self.learn_scales and self.scale_optimizer is not None and self.latent
        if learning:
            self._scale_gradients(model)  # from the full gradient, before any clipping
        if self.ste_clip and self.latent:
            self._clip_gradients(model)  # with the scales the forward used, before they move
        if learning:
            self.scale_optimizer.step()
            self.scale_optimizer.zero_grad(set_to_none=True)
            self.alpha = {n: la.detach().exp().to(self.alpha[n].dtype) for n, la in self.log_alpha.items()}
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
        state: dict[str, Any] = {"steps": self.steps, "alpha": {k: v.cpu() for k, v in self.alpha.items()}}
        if self.scale_optimizer is not None:
            state["scale_optimizer"] = self.scale_optimizer.state_dict()
            state["log_alpha"] = {k: v.detach().cpu() for k, v in self.log_alpha.items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.steps = int(state["steps"])
        self.alpha = {k: v.to(self.device) for k, v in state["alpha"].items()}
        # the learned scales are `alpha`; their Adam moments resume with them at the next forward
        self._scale_optimizer_state = state.get("scale_optimizer") if self.learn_scales else None
        self._saved_log_alpha = state.get("log_alpha") if self.learn_scales else None
        self.scale_optimizer = None
