"""Differentiable mixed-precision search: a Gumbel-softmax supernet (EdMIPS-style).

Every searchable cluster keeps its one full-precision latent weight ``W`` and logits ``a``
over its candidate bit-widths ``B``. The layer runs on the composite weight

    W_mix = sum_b pi_b * Q_b(W),   pi = gumbel_softmax(a, tau)

and then ONE matmul, so a step costs about one forward pass, not |B| of them. ``Q_b`` is the
straight-through quantizer, so ``W`` keeps learning while ``a`` learns which bit-width costs
least. The composite weights reach the unmodified model through ``torch.func.functional_call``
(tied embedding/softmax weights stay tied).

Size term: the expected weight bits ``E = sum_c numel_c * sum_b softmax(a_c / tau)_b * b`` is driven
to the budget's ``max_weight_bits`` (the budget is meant to be spent: bits left unused are
accuracy left on the table). A Lagrange multiplier ``lam`` follows dual ascent on the
equality ``E / cap = 1``: ``lam <- lam + lambda_lr * (E / cap - 1)``; it grows while the
supernet is too big and turns negative (rewarding bits) while it is too small, so no per-model
penalty weight needs hand tuning. The multiplier applied is ``lam + lambda_kp * (E / cap - 1)``
(a PI controller): with Adam on the logits only the sign of the size force matters once the
cross-entropy signal is weak, and the integral term alone overshoots and oscillates around the
budget; the proportional term flips the force as soon as the budget is crossed. Anti-windup:
while ``tau`` is high, ``softmax(a / tau)`` is near uniform and the expected bits sit far above
the budget whatever the logits, so the integral winds up; it used to unwind so slowly that the
size force still pushed down at the end, below the budget (PTB LSTM: expected bits at 0.93 of a
2.0 budget, argmax map at 1.64 bits). The integral is therefore reset when the budget is
crossed (it never keeps pushing the way the size already went too far).

Prototype mode (the papers' DARTS over prototypes, issue 13 item 4): with ``prototypes``
``{bits: {cluster: weight}}`` the candidate b of a cluster is its weight in the b-bit uniform
retrained prototype, a constant: ``W_mix = sum_b pi_b * P_b`` (the 32-bit candidate, if any, is
the live ``W``), so the search compares what retraining at each width achieved instead of one
shared latent weight quantized b ways. The cluster weights then learn only through a 32-bit
candidate; biases and norms keep training. Without prototypes the shared-weight mode above runs.

Export (``budgeted_argmax``): the argmax map when it spends the budget; otherwise a documented
repair step, exact in both directions:

- *shrink*, argmax over the budget: the map of highest probability within the budget
  (multiple-choice knapsack on ``-log p``);
- *fill*, the map (argmax or shrunk) uses less than 99% of the budget (a residual undershoot
  of the controller, or the most probable map within a budget lying far below it because
  clusters are coarse). Fill maximizes ``sum_c log p_c(b_c) + mu * numel_c * b_c`` within the
  budget (exact knapsack) with the smallest bits reward ``mu`` that reaches 99% of the budget
  (bisection; the knapsack's size grows with ``mu``), or the fullest reachable map. Clusters
  whose wider bit-widths kept the most probability per bit are upgraded first.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from tqdm import tqdm

from nas.config.defaults import GumbelSettings
from nas.core.batches import stream_batches, window_batches
from nas.core.errors import MpnasError
from nas.search.gumbel_export import budgeted_argmax
from search_spaces.clusters import Cluster, cluster_parameter, cluster_weight, find_clusters
from search_spaces.precision import PrecisionMap
from search_spaces.quant import FULL_PRECISION, fake_quantize, solve_scale, table_values


class _MixedQuantize(torch.autograd.Function):
    """``sum_b pi_b * Q_b(W)`` with the straight-through gradient to ``W`` and the exact one to ``pi``.

    Since ``sum_b pi_b = 1`` the STE gradient to W is the incoming gradient itself, and
    ``d/dpi_b = <grad, Q_b(W)>``. One fused function instead of |B| autograd branches saves
    the per-branch backward passes over large clusters (embedding and softmax).
    """

    @staticmethod
    def forward(ctx: Any, w: torch.Tensor, pi: torch.Tensor, bits: tuple[int, ...], alphas: tuple) -> torch.Tensor:
        tables = [table_values(w, b, a) if b < FULL_PRECISION else w.detach()
                  for b, a in zip(bits, alphas, strict=True)]
        out = tables[0] * pi[0]
        for weight, table in zip(pi[1:], tables[1:], strict=True):
            out.add_(table * weight)
        ctx.save_for_backward(*tables)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None, None]:
        tables = ctx.saved_tensors
        flat = grad.reshape(-1)
        grad_pi = torch.stack([torch.dot(flat, table.reshape(-1)) for table in tables])
        return grad, grad_pi, None, None


def _param_key(cluster: Cluster) -> str:
    return f"{cluster.module}.{cluster.param}" if cluster.module else cluster.param


class GumbelSupernet(nn.Module):
    """Logits over candidate bits for every cluster of ``model``; mixes weights on demand."""

    def __init__(self, model: nn.Module, candidates: Mapping[str, tuple[int, ...]], granularity: str = "matrix",
                 prototypes: Mapping[int, Mapping[str, torch.Tensor]] | None = None) -> None:
        super().__init__()
        self.model = model
        self.granularity = granularity
        clusters = find_clusters(model)
        unknown = sorted(set(candidates) - set(clusters))
        if unknown:
            raise ValueError(f"candidates name clusters the model does not have: {unknown}")
        self.clusters = {name: clusters[name] for name in clusters if name in candidates}
        self.candidates = {name: tuple(sorted(candidates[name])) for name in self.clusters}
        # ParameterDict keys may not contain dots.
        self.logits = nn.ParameterDict({self._key(n): nn.Parameter(torch.zeros(len(b)))
                                        for n, b in self.candidates.items() if len(b) > 1})
        self.alpha: dict[tuple[str, int], torch.Tensor] = {}
        # prototype mode: (cluster, bits) -> the constant candidate weight
        self.prototype: dict[tuple[str, int], torch.Tensor] = {}
        if prototypes is not None:
            for name, bits_list in self.candidates.items():
                for bits in bits_list:
                    if bits == FULL_PRECISION:
                        continue
                    weight = (prototypes.get(bits) or {}).get(name)
                    if weight is None:
                        raise MpnasError(f"no {bits}-bit prototype for cluster {name!r}: prototypes exist for "
                                         f"{sorted(prototypes)} bits (`mpnas prototypes --bits {bits}`)")
                    if tuple(weight.shape) != self.clusters[name].shape:
                        raise MpnasError(f"the {bits}-bit prototype of {name!r} has shape {tuple(weight.shape)}, "
                                         f"the model's cluster {self.clusters[name].shape}")
                    self.prototype[(name, bits)] = weight.detach().to(self._weight(name).dtype)

    @staticmethod
    def _key(name: str) -> str:
        return name.replace(".", "__")

    def arch_parameters(self) -> list[nn.Parameter]:
        """The logits (what the architecture optimizer updates)."""
        return list(self.logits.values())

    def _weight(self, name: str) -> torch.Tensor:
        """The cluster's live weights: its whole parameter, or its rows of a fused one (torch's nn.LSTM)."""
        return cluster_weight(self.model, self.clusters[name])

    def _assemble(self, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{parameter key: composite weight}`` from each cluster's composite weight.

        A fused parameter (the gate rows of torch's nn.LSTM, q/k/v of nn.MultiheadAttention) is
        the concatenation of its clusters' rows in order; rows of no searched cluster stay live.
        """
        mixed: dict[str, torch.Tensor] = {}
        fused: dict[str, list[tuple[int, int, torch.Tensor]]] = {}
        for name, part in parts.items():
            cluster = self.clusters[name]
            if cluster.rows is None:
                mixed[_param_key(cluster)] = part
            else:
                fused.setdefault(_param_key(cluster), []).append((*cluster.rows, part))
        for key, pieces in fused.items():
            cluster = next(self.clusters[n] for n in parts if _param_key(self.clusters[n]) == key)
            whole = cluster_parameter(self.model, cluster)
            rows, cursor = [], 0
            for lo, hi, part in sorted(pieces, key=lambda piece: piece[0]):
                if lo > cursor:
                    rows.append(whole[cursor:lo])
                rows.append(part)
                cursor = hi
            if cursor < whole.shape[0]:
                rows.append(whole[cursor:])
            mixed[key] = torch.cat(rows)
        return mixed

    @torch.no_grad()
    def refresh_scales(self) -> None:
        """Re-solve the closed-form scale of every (cluster, candidate) pair."""
        for name, bits_list in self.candidates.items():
            weight = self._weight(name)
            for bits in bits_list:
                if bits < FULL_PRECISION:
                    self.alpha[(name, bits)] = solve_scale(weight, bits, self.granularity)

    def probabilities(self) -> dict[str, dict[int, float]]:
        """softmax(logits) per cluster (no noise)."""
        out = {}
        for name, bits_list in self.candidates.items():
            if len(bits_list) == 1:
                out[name] = {bits_list[0]: 1.0}
            else:
                probs = self.logits[self._key(name)].detach().softmax(0).tolist()
                out[name] = dict(zip(bits_list, probs, strict=True))
        return out

    def mixed_weights(self, tau: float, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        """``W_mix`` for every cluster; Gumbel noise from ``generator`` (None: plain softmax)."""
        if not self.alpha and not self.prototype:
            self.refresh_scales()
        mixed = {}
        for name, bits_list in self.candidates.items():
            weight = self._weight(name)
            if self.prototype:
                mixed[name] = self._mixed_prototypes(name, weight, tau, generator)
                continue
            if len(bits_list) == 1:
                only = bits_list[0]
                mixed[name] = (
                    weight if only == FULL_PRECISION else fake_quantize(weight, only, alpha=self.alpha[(name, only)]))
                continue
            logits = self.logits[self._key(name)]
            if generator is not None:
                uniform = torch.rand(logits.shape, generator=generator).clamp_(1e-10, 1 - 1e-10).to(logits.device)
                logits = logits - torch.log(-torch.log(uniform))
            pi = F.softmax(logits / tau, dim=0)
            alphas = tuple(self.alpha.get((name, b)) for b in bits_list)
            mixed[name] = _MixedQuantize.apply(weight, pi, bits_list, alphas)
        return self._assemble(mixed)

    def _candidate(self, name: str, bits: int, weight: torch.Tensor) -> torch.Tensor:
        """Prototype mode: the b-bit candidate of ``name`` (the live weight at 32 bits)."""
        if bits == FULL_PRECISION:
            return weight
        return self.prototype[(name, bits)].to(weight.device)

    def _mixed_prototypes(self, name: str, weight: torch.Tensor, tau: float,
                          generator: torch.Generator | None) -> torch.Tensor:
        bits_list = self.candidates[name]
        if len(bits_list) == 1:
            return self._candidate(name, bits_list[0], weight)
        logits = self.logits[self._key(name)]
        if generator is not None:
            uniform = torch.rand(logits.shape, generator=generator).clamp_(1e-10, 1 - 1e-10).to(logits.device)
            logits = logits - torch.log(-torch.log(uniform))
        pi = F.softmax(logits / tau, dim=0)
        out = pi[0] * self._candidate(name, bits_list[0], weight)
        for p, bits in zip(pi[1:], bits_list[1:], strict=True):
            out = out + p * self._candidate(name, bits, weight)
        return out

    def expected_weight_bits(self, tau: float = 1.0) -> torch.Tensor:
        """``sum_c numel_c * E_softmax(a_c / tau)[bits]`` (differentiable in the logits).

        Taken at the annealed temperature: as tau falls the expectation approaches the bits of
        the argmax map, so the budget constrains the map that is finally exported.
        """
        total = torch.zeros(())
        for name, bits_list in self.candidates.items():
            numel = self.clusters[name].numel
            if len(bits_list) == 1:
                total = total + numel * bits_list[0]
            else:
                logits = self.logits[self._key(name)]
                bits = torch.tensor(bits_list, dtype=logits.dtype, device=logits.device)
                total = total.to(logits.device) + numel * ((logits / tau).softmax(0) * bits).sum()
        return total

    def forward(self, tokens: torch.Tensor, state: object = None, targets: torch.Tensor | None = None, *,
                tau: float = 1.0, generator: torch.Generator | None = None) -> Any:
        """The wrapped model's forward on the composite weights."""
        return functional_call(self.model, self.mixed_weights(tau, generator), (tokens, state, targets))

    def export(self, max_weight_bits: float | None, fill: bool = True) -> tuple[dict[str, int], str]:
        """Bits per cluster from the logits, repaired to spend ``max_weight_bits``; see ``budgeted_argmax``."""
        sizes = {name: self.clusters[name].numel for name in self.candidates}
        return budgeted_argmax(self.probabilities(), sizes, max_weight_bits, fill=fill)


def _integrate(lam: float, excess: float, rate: float) -> float:
    """One dual-ascent step of the multiplier with anti-windup (reset on crossing the budget).

    A multiplier that still pushes the size down after the supernet went under the budget (or up
    after it went over) is wound-up history from the high-temperature phase, not a force the
    budget asks for: it is dropped, so the proportional term acts at once on the new side.
    """
    if excess * lam < 0:
        lam = 0.0
    return lam + rate * excess


def _lm_batches(model: nn.Module, stream: torch.Tensor, batch_size: int, length: int, generator: torch.Generator
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless batches: contiguous stream chunks for LSTMs, shuffled windows for Transformers."""
    while True:
        if hasattr(model, "init_state"):
            rows = stream_batches(stream, batch_size, length)
            for begin in range(0, rows.size(1) - 1, length):
                end = min(begin + length, rows.size(1) - 1)
                yield rows[:, begin:end], rows[:, begin + 1 : end + 1]
        else:
            yield from window_batches(stream, length, batch_size, generator)


def gumbel_search(model: nn.Module, candidates: Mapping[str, tuple[int, ...]], train_tokens: torch.Tensor, *,
                  max_weight_bits: float | None, settings: GumbelSettings, batch_size: int, length: int,
                  granularity: str = "matrix", device: torch.device | str = "cpu", progress: bool = False,
                  prototypes: Mapping[int, Mapping[str, torch.Tensor]] | None = None) -> PrecisionMap:
    """Run the supernet search on ``train_tokens``; returns the exported map with its evidence.

    ``length`` is the BPTT length (LSTM) or context (Transformer). ``model`` is trained in place
    (its weights adapt to quantization during the search); pass a copy to keep the FP model.
    The global RNG (the model's dropout) is seeded with ``settings.seed`` inside and restored
    afterwards, so the map depends on the seed, not on what the caller drew before.
    """
    device = torch.device(device)
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(settings.seed)
        return _supernet_search(model, candidates, train_tokens, max_weight_bits=max_weight_bits, settings=settings,
                                batch_size=batch_size, length=length, granularity=granularity, device=device,
                                progress=progress, prototypes=prototypes)


def _supernet_search(model: nn.Module, candidates: Mapping[str, tuple[int, ...]], train_tokens: torch.Tensor, *,
                     max_weight_bits: float | None, settings: GumbelSettings, batch_size: int, length: int,
                     granularity: str, device: torch.device, progress: bool,
                     prototypes: Mapping[int, Mapping[str, torch.Tensor]] | None) -> PrecisionMap:
    """:func:`gumbel_search` with the global RNG already seeded."""
    start_time = time.perf_counter()
    device = torch.device(device)
    model.to(device).train()
    net = GumbelSupernet(model, candidates, granularity, prototypes).to(device)
    generator = torch.Generator().manual_seed(settings.seed)
    split = int(train_tokens.numel() * (1 - settings.arch_fraction))
    data = {"w": _lm_batches(model, train_tokens[:split], batch_size, length, generator),
            "a": _lm_batches(model, train_tokens[split:], batch_size, length, generator)}
    steps_per_epoch = max(1, split // (batch_size * length))
    total_steps = max(1, int(settings.epochs * steps_per_epoch))
    run = _SupernetTraining(net, model, settings, max_weight_bits, device, generator)
    cap, history = max_weight_bits, []
    bar = tqdm(range(total_steps), disable=not progress, desc="gumbel search", dynamic_ncols=True)
    for step in bar:
        tau = settings.tau_start * (settings.tau_end / settings.tau_start) ** (step / max(1, total_steps - 1))
        if step % settings.rescale_every == 0 and prototypes is None:
            net.refresh_scales()
        for phase in ("w", "a") if settings.bilevel else ("joint",):
            out = run.phase(phase, next(data["a" if phase == "a" else "w"]), tau, step)
        if step % max(1, steps_per_epoch // 10) == 0 or step == total_steps - 1:
            expected = float(net.expected_weight_bits(tau).detach())
            history.append({"step": step, "tau": tau, "lambda": run.lam, "expected_weight_bits": expected,
                            "probabilities": net.probabilities()})
            bar.set_postfix(tau=f"{tau:.2f}", lam=f"{run.lam:.3g}",
                            budget=f"{expected / cap:.3f}" if cap else "n/a", loss=f"{float(out.loss.detach()):.3f}")
    bits, repair = net.export(cap, fill=settings.fill_budget)
    meta = {"strategy": "gumbel", "seed": settings.seed, "max_weight_bits": cap, "repair": repair,
            "supernet": "shared" if prototypes is None else "prototype",
            "probabilities": _string_keys(net.probabilities()),
            "history": [{**h, "probabilities": _string_keys(h["probabilities"])} for h in history],
            "wall_s": time.perf_counter() - start_time,
            "search_fp_epochs": run.tokens_seen / max(1, train_tokens.numel()), "settings": settings.__dict__}
    return PrecisionMap({**bits}, granularity=granularity, meta=meta)


def _string_keys(probs: Mapping[str, Mapping[int, float]]) -> dict[str, dict[str, float]]:
    """Probabilities with the widths as strings (JSON/YAML keys)."""
    return {n: {str(b): p for b, p in d.items()} for n, d in probs.items()}


class _SupernetTraining:
    """The optimizers, carried LSTM states and size multiplier of one supernet search."""

    def __init__(self, net: GumbelSupernet, model: nn.Module, settings: GumbelSettings, cap: float | None,
                 device: torch.device, generator: torch.Generator) -> None:
        self.net, self.model, self.settings, self.cap = net, model, settings, cap
        self.device, self.generator = device, generator
        self.w_opt = torch.optim.SGD(model.parameters(), lr=settings.weight_lr)
        self.a_opt = torch.optim.Adam(net.arch_parameters(), lr=settings.arch_lr)
        self.recurrent = hasattr(model, "init_state")
        self.states: dict[str, Any] = {"w": None, "a": None}
        self.lam, self.tokens_seen = 0.0, 0

    def phase(self, phase: str, batch: tuple[torch.Tensor, torch.Tensor], tau: float, step: int) -> Any:
        """One step: ``w`` trains the weights, ``a`` the logits (with the size penalty), ``joint`` both."""
        settings, cap = self.settings, self.cap
        inputs, targets = (t.to(self.device) for t in batch)
        state_key = "a" if phase == "a" else "w"
        out = self.net(inputs, self.states[state_key], targets, tau=tau, generator=self.generator)
        loss = out.loss * inputs.size(1)  # summed over time, as in the FP recipe
        size_excess = None
        if phase != "w" and cap is not None:
            size_excess = self.net.expected_weight_bits(tau) / cap - 1.0
            multiplier = self.lam + settings.lambda_kp * float(size_excess.detach())
            loss = loss + multiplier * size_excess * inputs.size(1)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"gumbel search diverged at step {step}: loss={float(loss)} (tau={tau:.3g}, "
                                     f"lambda={self.lam:.3g}); lower search.weight_lr or search.arch_lr")
        self.w_opt.zero_grad(set_to_none=True)
        self.a_opt.zero_grad(set_to_none=True)
        loss.backward()
        if phase != "a":
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), settings.clip)
            self.w_opt.step()
        if phase != "w":
            self.a_opt.step()
            if size_excess is not None:
                self.lam = _integrate(self.lam, float(size_excess.detach()), settings.lambda_lr)
        if self.recurrent:
            self.states[state_key] = self.model.detach_state(out.state)
        self.tokens_seen += inputs.numel()
        return out
