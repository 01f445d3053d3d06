"""Quantization-aware retraining hooks: ADMM (the papers' method) and plain STE (the baseline).

Both plug into :func:`nas.train.train` as :class:`~nas.train.TrainingHooks`, so retraining
shares the FP loop's batching, checkpoint/resume, DDP and divergence checks.

ADMM (Leng et al., AAAI 2018), scaled form, one (G, U) pair per quantized cluster:
- theta step: SGD/Adam on ``CE(W) + rho/2 * sum_c ||W_c - G_c + U_c||^2``; the penalty's gradient
  ``rho (W - G + U)`` is added after gradient clipping (scaled like the loss), because clipping
  the sum let a large constraint violation shrink the loss gradient and the pull alike (the
  first PTB runs stalled at 2 bits with a primal residual that grew instead of shrinking);
- every ``project_every`` steps: ``G_c = Q_b(W_c + U_c)`` (closed-form alpha), ``U_c += W_c - G_c``;
- rho grows by ``rho_growth`` at every projection up to ``rho_max`` (U is rescaled by
  rho_old / rho_new, as the scaled dual requires);
- primal residual ``||W - G|| / ||W||`` and dual residual ``rho ||G - G_prev|| / ||W||`` are logged;
- validation and the best checkpoint use the hard-projected weights; the run ends with a
  hard projection, so every quantized weight lies exactly on its table.

STE (BinaryConnect style weight swapping): before each forward the latent weights are
replaced by their quantized values; after backward the latent weights come back, so the
gradient taken at Q(W) updates W unchanged (the identity straight-through estimator). This
works for every module, torch's fused nn.LSTM included, without parametrizations.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from nas.train import TrainingHooks
from search_spaces.precision import PrecisionMap, cluster_parameter, cluster_weight, find_clusters
from search_spaces.quant import FULL_PRECISION, quantize, quantize_codes, solve_scale


class _QuantizedClusters:
    """The quantized clusters of one model under one precision map."""

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
        return int(self.precision.bits[name])

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


class AdmmHooks(TrainingHooks):
    """ADMM retraining towards a precision map (see the module docstring)."""

    def __init__(self, model: nn.Module, precision: PrecisionMap, *, rho: float = 1e-3, rho_growth: float = 1.1,
                 rho_max: float = 1.0, project_every: int = 200) -> None:
        if rho <= 0 or rho_growth < 1 or rho_max < rho or project_every < 1:
            raise ValueError(f"ADMM needs 0 < rho <= rho_max, rho_growth >= 1, project_every >= 1; got rho={rho}, "
                             f"rho_growth={rho_growth}, rho_max={rho_max}, project_every={project_every}")
        self.q = _QuantizedClusters(model, precision)
        self.rho, self.rho_growth, self.rho_max, self.project_every = rho, rho_growth, rho_max, project_every
        views = self.q.views(model)
        self.g = {name: self.q.project(name, v) for name, v in views.items()}
        self.u = {name: torch.zeros_like(v, memory_format=torch.contiguous_format) for name, v in views.items()}
        self.residuals: list[dict[str, float]] = []

    @torch.no_grad()
    def penalty_value(self, model: nn.Module) -> float:
        """``rho/2 * sum_c ||W_c - G_c + U_c||^2`` (what :meth:`after_clip` adds the gradient of)."""
        views = self.q.views(model)
        return 0.5 * self.rho * sum(float(((views[n] - self.g[n] + self.u[n]) ** 2).sum()) for n in views)

    @torch.no_grad()
    def after_clip(self, model: nn.Module, loss_scale: float) -> None:
        for name, cluster in self.q.clusters.items():
            param = cluster_parameter(model, cluster)
            view = cluster_weight(model, cluster)
            pull = (view - self.g[name] + self.u[name]) * (self.rho * loss_scale)
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            grad = param.grad if cluster.rows is None else param.grad[cluster.rows[0]:cluster.rows[1]]
            grad.add_(pull)

    @torch.no_grad()
    def after_step(self, model: nn.Module, global_step: int) -> None:
        if (global_step + 1) % self.project_every:
            return
        views = self.q.views(model)
        primal = dual = norm = 0.0
        for name, w in views.items():
            g_prev = self.g[name]
            g = self.q.project(name, w + self.u[name])
            self.u[name] += w - g
            self.g[name] = g
            primal += float(((w - g) ** 2).sum())
            dual += float(((g - g_prev) ** 2).sum())
            norm += float((w**2).sum())
        scale = math.sqrt(norm) or 1.0
        self.residuals.append({"step": global_step + 1, "rho": self.rho, "primal": math.sqrt(primal) / scale,
                               "dual": self.rho * math.sqrt(dual) / scale})
        new_rho = min(self.rho * self.rho_growth, self.rho_max)
        for name in self.u:
            self.u[name] *= self.rho / new_rho
        self.rho = new_rho

    def evaluation(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        return self.q.swapped(model)

    def finish(self, model: nn.Module) -> None:
        self.q.hard_project_(model)

    def postfix(self) -> dict[str, str]:
        if not self.residuals:
            return {"rho": f"{self.rho:.2g}"}
        last = self.residuals[-1]
        return {"rho": f"{self.rho:.2g}", "r_primal": f"{last['primal']:.3g}", "r_dual": f"{last['dual']:.3g}"}

    def state_dict(self) -> dict[str, Any]:
        return {"rho": self.rho, "g": {k: v.cpu() for k, v in self.g.items()},
                "u": {k: v.cpu() for k, v in self.u.items()}, "residuals": list(self.residuals)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        device = next(iter(self.g.values())).device if self.g else torch.device("cpu")
        self.rho = float(state["rho"])
        self.g = {k: v.to(device) for k, v in state["g"].items()}
        self.u = {k: v.to(device) for k, v in state["u"].items()}
        self.residuals = list(state["residuals"])

    def metrics(self) -> dict[str, Any]:
        return {"admm_residuals": self.residuals}


class SteHooks(TrainingHooks):
    """Straight-through quantization-aware training (the baseline ADMM must beat).

    Scales are re-solved every ``rescale_every`` steps and reused in between, so the per-step
    cost is one rounding pass, not a scale search.
    """

    def __init__(self, model: nn.Module, precision: PrecisionMap, *, rescale_every: int = 200) -> None:
        if rescale_every < 1:
            raise ValueError(f"rescale_every must be >= 1, got {rescale_every}")
        self.q = _QuantizedClusters(model, precision)
        self.rescale_every = rescale_every
        self.alpha: dict[str, torch.Tensor] = {}
        self.latent: dict[str, torch.Tensor] = {}
        self.steps = 0

    @torch.no_grad()
    def before_forward(self, model: nn.Module) -> None:
        views = self.q.views(model)
        if self.steps % self.rescale_every == 0 or not self.alpha:
            self.alpha = {n: solve_scale(v, self.q.bits(n), self.q.precision.granularity) for n, v in views.items()}
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
            self.alpha = {n: solve_scale(v, self.q.bits(n), self.q.precision.granularity) for n, v in views.items()}
        for name, view in views.items():
            alpha = self.alpha[name].to(view.device)
            codes = quantize_codes(view, self.q.bits(name), alpha)
            view.copy_(codes.to(view.dtype) * alpha.to(view.dtype))

    @torch.no_grad()
    def before_step(self, model: nn.Module) -> None:
        for name, view in self.q.views(model).items():
            view.copy_(self.latent[name])
        self.latent = {}

    def after_step(self, model: nn.Module, global_step: int) -> None:
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
        self.alpha = dict(state["alpha"])  # moved to the weights' device on use
