"""ADMM quantization-aware retraining (the papers' method), built on the straight-through forward.

Scaled-form ADMM (Leng et al., AAAI 2018), one (G, U) pair per quantized cluster, minimising
``CE(W) + rho/2 * sum_c ||W_c - G_c + U_c||^2`` with ``G_c`` on the cluster's table:

- W step: the loss gradient is taken at the quantized weights, exactly as in STE
  (:class:`nas.retrain.ste.SteHooks`: forward at ``alpha * codes(W)``, scales held fixed inside a
  period), and the optimizer (SGD or Adam) steps on it. The proximal pull towards ``G - U`` is
  then applied as its own exact proximal step, outside the optimizer:
  ``W <- (W + eta (G - U)) / (1 + eta)`` with ``eta = lr * rho * loss_scale``. For SGD this is the
  implicit form of the penalty's gradient step; with Adam it is not normalised away (the old
  design added ``rho (W - G + U)`` to the gradient, and Adam's normalisation made rho 0.01, 0.1
  and 1 give the same step). With ``rho = 0`` the hooks are exactly STE.
- ``forward="latent"`` is the papers' W step instead: loss and gradient at the continuous W (no
  straight-through swap), validation at the closed-form projection of W. It suits training from
  scratch, where W is far from any table; retraining a converged model wants the default.
- Every period (``project_every`` steps, or ``project_every_epochs`` epochs):
  ``G = Q(W + U)`` with the closed-form scale, ``U += W - G``; the forward's scales are re-solved
  on W at the same moment (STE's rescale). With ``learn_scales`` the scales are learned as in
  STE and G is projected on the learned table.
- rho follows the amount of training, not the number of projections:
  ``rho = min(rho0 * rho_growth ** epochs_trained, rho_max)``, set at each projection before
  the dual update (U rescaled by rho_old / rho_new, as the scaled dual requires).
- Logged per projection: primal residual ``||W - G|| / ||W||``, dual residual
  ``rho ||G - G_prev|| / ||W||``, the fraction of G's codes that changed since the previous
  projection and since the first one (the FP projection).

Why the redesign (measured on the PTB LSTM, 2 bits, 800 steps): with the gradient at the
continuous W and rho growing per projection, G+ = Q(G - grad/rho) moved a code only when
|grad| > rho*alpha/2; 0.017% of codes ever changed (STE: 1.94%) and ADMM lost to STE by 40%.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import nn

from nas.core.errors import CheckpointError
from nas.retrain.ste import SteHooks
from search_spaces.precision import PrecisionMap
from search_spaces.quant import dequantize

FORWARDS = ("quantized", "latent")


class AdmmHooks(SteHooks):
    """ADMM retraining towards a precision map (see the module docstring)."""

    def __init__(self, model: nn.Module, precision: PrecisionMap, *, rho: float = 1e-3, rho_growth: float = 1.0,
                 rho_max: float = 1.0, project_every: int = 200, project_every_epochs: float = 0.0,
                 forward: str = "quantized", learn_scales: bool = False, scale_lr: float = 1e-3,
                 ste_clip: bool = False) -> None:
        if forward not in FORWARDS:
            raise ValueError(f"ADMM forward must be one of {FORWARDS}, got {forward!r}")
        if learn_scales and forward != "quantized":
            raise ValueError("learned scales need the quantized forward (admm_forward: quantized): the latent "
                             "forward takes no gradient at the quantized weights")
        if rho < 0 or rho_growth < 1 or rho_max < rho or project_every < 1 or project_every_epochs < 0:
            raise ValueError(f"ADMM needs 0 <= rho <= rho_max, rho_growth >= 1, project_every >= 1 and "
                             f"project_every_epochs >= 0; got rho={rho}, rho_growth={rho_growth}, rho_max={rho_max}, "
                             f"project_every={project_every}, project_every_epochs={project_every_epochs}")
        super().__init__(model, precision, rescale_every=project_every, rescale_every_epochs=project_every_epochs,
                         learn_scales=learn_scales, scale_lr=scale_lr, ste_clip=ste_clip)
        self.rho0, self.rho, self.rho_growth, self.rho_max = rho, rho, rho_growth, rho_max
        self.forward = forward
        views = self.q.views(model)
        self.g_alpha = {n: self.q.solve_scale(n, v) for n, v in views.items()}
        self.g_codes = {n: self.q.codes(n, v, self.g_alpha[n]) for n, v in views.items()}
        self.start_codes = {n: c.clone() for n, c in self.g_codes.items()}
        self.u = {n: torch.zeros_like(v, memory_format=torch.contiguous_format) for n, v in views.items()}
        self.residuals: list[dict[str, float]] = []

    def before_forward(self, model: nn.Module) -> None:
        if self.forward == "quantized":
            super().before_forward(model)

    def before_step(self, model: nn.Module) -> None:
        if self.forward == "quantized":
            super().before_step(model)

    def evaluation(self, model: nn.Module) -> contextlib.AbstractContextManager[None]:
        if self.forward == "quantized":
            return super().evaluation(model)
        return self.q.swapped(model)  # latent forward: the closed-form projection of W

    def g(self, name: str) -> torch.Tensor:
        """The cluster's current point on its table, ``alpha_G * codes_G``."""
        return dequantize(self.g_codes[name], self.g_alpha[name]).to(self.u[name].dtype)

    @torch.no_grad()
    def penalty_value(self, model: nn.Module) -> float:
        """``rho/2 * sum_c ||W_c - G_c + U_c||^2``, the term the proximal step minimises."""
        views = self.q.views(model)
        return 0.5 * self.rho * sum(float(((views[n] - self.g(n) + self.u[n]) ** 2).sum()) for n in views)

    @torch.no_grad()
    def after_step(self, model: nn.Module, global_step: int, *, lr: float, loss_scale: float) -> None:
        super().after_step(model, global_step, lr=lr, loss_scale=loss_scale)
        views = self.q.views(model)
        eta = lr * self.rho * loss_scale
        if eta > 0:
            for name, w in views.items():
                # exact prox of eta/2 ||W - (G - U)||^2: W + eta/(1+eta) * ((G - U) - W)
                w.add_(self.g(name) - self.u[name] - w, alpha=eta / (1.0 + eta))
        if self.steps % self.rescale_every == 0:
            self._project(views)

    @torch.no_grad()
    def _project(self, views: dict[str, torch.Tensor]) -> None:
        epochs = self.steps / self.steps_per_epoch if self.steps_per_epoch else 0.0
        new_rho = min(self.rho0 * self.rho_growth**epochs, self.rho_max)
        if self.rho > 0 and new_rho != self.rho:
            for name in self.u:
                self.u[name] *= self.rho / new_rho
        self.rho = new_rho
        primal = dual = norm = 0.0
        changed = moved = total = 0
        for name, w in views.items():
            g_prev = self.g(name)
            target = w + self.u[name]
            # learned scales: G lives on the table the forward learned, not the least-squares one
            alpha = self.alpha[name] if self.learn_scales and self.alpha else self.q.solve_scale(name, target)
            codes = self.q.codes(name, target, alpha)
            changed += int((codes != self.g_codes[name]).sum())
            moved += int((codes != self.start_codes[name]).sum())
            total += codes.numel()
            self.g_alpha[name], self.g_codes[name] = alpha, codes
            g = self.g(name)
            self.u[name] += w - g
            primal += float(((w - g) ** 2).sum())
            dual += float(((g - g_prev) ** 2).sum())
            norm += float((w**2).sum())
        scale = math.sqrt(norm) or 1.0
        self.residuals.append({"step": self.steps, "epoch": epochs, "rho": self.rho,
                               "primal": math.sqrt(primal) / scale, "dual": self.rho * math.sqrt(dual) / scale,
                               "codes_changed": changed / max(1, total), "codes_moved": moved / max(1, total)})

    def postfix(self) -> dict[str, str]:
        if not self.residuals:
            return {"rho": f"{self.rho:.2g}"}
        last = self.residuals[-1]
        return {"rho": f"{self.rho:.2g}", "r_primal": f"{last['primal']:.3g}", "r_dual": f"{last['dual']:.3g}",
                "changed": f"{last['codes_changed']:.2%}"}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "rho": self.rho,
                "g_alpha": {k: v.cpu() for k, v in self.g_alpha.items()},
                "g_codes": {k: v.cpu() for k, v in self.g_codes.items()},
                "start_codes": {k: v.cpu() for k, v in self.start_codes.items()},
                "u": {k: v.cpu() for k, v in self.u.items()}, "residuals": list(self.residuals)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        if "g_codes" not in state:
            raise CheckpointError("this checkpoint's ADMM state was written by the old ADMM (gradient at W, "
                                  "projection per step count); start the retraining again without --resume")
        super().load_state_dict(state)
        device = next(iter(self.u.values())).device if self.u else torch.device("cpu")
        self.rho = float(state["rho"])
        self.g_alpha = {k: v.to(device) for k, v in state["g_alpha"].items()}
        self.g_codes = {k: v.to(device) for k, v in state["g_codes"].items()}
        self.start_codes = {k: v.to(device) for k, v in state["start_codes"].items()}
        self.u = {k: v.to(device) for k, v in state["u"].items()}
        self.residuals = list(state["residuals"])

    def metrics(self) -> dict[str, Any]:
        return {"admm_residuals": self.residuals}
