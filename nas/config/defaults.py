"""Defaults of the search algorithms that the config sections read (defined once, here).

They live below both the sections (which take their defaults) and the search code (which runs
with them), so neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass

from nas.core.errors import MpnasError

# Default fewest probes per cluster of hutchinson_traces (see its docstring). search.hessian_max_iters
# must be at least this: a cap below it ends every cluster on too few samples to measure its error.
# Why 30: the samples are skewed quadratic forms, and a short run without a large one
# underestimates both the trace and its error (a tiny LSTM with exact traces, 40 seeds at
# tol=0.1: with 10 probes up to 17% of a cluster's estimates were more than 2 standard errors
# off; with 30, at most 5%). A cluster's mean stays unbiased as others retire (each sample has
# the same expectation, only a smaller variance), and s_c^2 / k stays an unbiased variance estimate.
MIN_PROBES = 30


@dataclass(frozen=True)
class GumbelSettings:
    """Knobs of the supernet search (the ``search`` section of an experiment file)."""

    epochs: float = 1.0  # passes over the weight-training part of the train split
    weight_lr: float = 0.05  # SGD on the latent weights
    arch_lr: float = 0.01  # Adam on the logits
    lambda_lr: float = 0.01  # integral (dual ascent) step of the size multiplier
    lambda_kp: float = 10.0  # proportional gain: reacts at once when the size crosses the budget
    tau_start: float = 5.0
    tau_end: float = 0.5
    bilevel: bool = True  # logits on held-out batches (first-order DARTS); False: joint steps
    arch_fraction: float = 0.1  # tail of the train split held out for the logits
    rescale_every: int = 50  # steps between scale re-solves
    clip: float = 5.0
    fill_budget: bool = True  # export: spend bits the argmax leaves unused (see the module docstring)
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.tau_end <= self.tau_start:
            raise MpnasError(f"need 0 < tau_end <= tau_start, got tau_start={self.tau_start}, tau_end={self.tau_end}")
        if not 0 < self.arch_fraction < 1:
            raise MpnasError(f"arch_fraction must be in (0, 1), got {self.arch_fraction}")
        if self.epochs <= 0 or self.rescale_every < 1:
            raise MpnasError(f"need epochs > 0 and rescale_every >= 1, got {self.epochs}, {self.rescale_every}")
