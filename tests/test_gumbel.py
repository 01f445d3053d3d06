"""The supernet's fused mixture: same values and gradients as the per-branch STE sum."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from nas.search.gumbel import GumbelSupernet, _MixedQuantize
from nas.search.gumbel_export import budgeted_argmax, fill_reward
from search_spaces.clusters import find_clusters
from search_spaces.models import build_model
from search_spaces.quant import dequantize, fake_quantize, quantize_codes, solve_scale, table_values


@pytest.mark.parametrize("granularity", ["matrix", "row"])
def test_table_values_equal_dequantized_codes(granularity: str) -> None:
    w = torch.randn(64, 33, generator=torch.Generator().manual_seed(1)) * 0.1
    for bits in (1, 2, 3, 4, 8, 16):
        alpha = solve_scale(w, bits, granularity)
        assert torch.equal(table_values(w, bits, alpha), dequantize(quantize_codes(w, bits, alpha), alpha))


def test_fused_mixture_matches_branch_sum_and_gradients() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(30, 20, generator=gen).requires_grad_()
    logits = torch.randn(4, generator=gen).requires_grad_()
    bits = (1, 2, 4, 32)
    alphas = tuple(solve_scale(w.detach(), b) if b < 32 else None for b in bits)
    pi = logits.softmax(0)
    branches = [w if b == 32 else fake_quantize(w, b, alpha=a) for b, a in zip(bits, alphas, strict=True)]
    reference = sum(p * q for p, q in zip(pi, branches, strict=True))
    upstream = torch.randn(reference.shape, generator=gen)
    ref_grads = torch.autograd.grad((reference * upstream).sum(), (w, logits))
    fused = _MixedQuantize.apply(w, logits.softmax(0), bits, alphas)
    grads = torch.autograd.grad((fused * upstream).sum(), (w, logits))
    torch.testing.assert_close(fused, reference)
    torch.testing.assert_close(grads[0], ref_grads[0])
    torch.testing.assert_close(grads[1], ref_grads[1], rtol=1e-5, atol=1e-5)


def test_supernet_export_repairs_an_over_budget_argmax() -> None:
    model = build_model("lstm", vocab_size=30, embed_dim=8, hidden_dim=8, num_layers=1)
    names = list(find_clusters(model))
    net = GumbelSupernet(model, {n: (2, 8) for n in names})
    with torch.no_grad():
        for p in net.arch_parameters():
            p.copy_(torch.tensor([0.0, 1.0]))  # every argmax says 8 bits
    sizes = {n: c.numel for n, c in find_clusters(model).items()}
    cap = 4 * sum(sizes.values())
    bits, repair = net.export(cap)
    assert repair == "shrink" and sum(bits[n] * sizes[n] for n in names) <= cap
    assert set(bits.values()) == {2, 8}  # the repair keeps as many 8-bit clusters as fit
    assert net.export(None) == ({n: 8 for n in names}, "none")


def _brute(probs: dict, sizes: dict, cap: float) -> list[tuple[int, float, dict]]:
    """(weight bits, log-probability, map) of every map within ``cap``."""
    names = list(probs)
    out = []
    for combo in itertools.product(*(sorted(probs[n]) for n in names)):
        bits = dict(zip(names, combo, strict=True))
        used = sum(b * sizes[n] for n, b in bits.items())
        if used <= cap:
            out.append((used, sum(math.log(probs[n][b]) for n, b in bits.items()), bits))
    return out


def test_budgeted_argmax_fills_an_under_budget_argmax() -> None:
    probs = {"a": {1: 0.6, 2: 0.3, 4: 0.1}, "b": {1: 0.9, 2: 0.05, 4: 0.05},
             "c": {1: 0.55, 2: 0.44, 4: 0.01}, "d": {1: 0.5, 2: 0.2, 4: 0.3}}
    sizes = {"a": 100, "b": 100, "c": 300, "d": 200}
    cap = 2.0 * sum(sizes.values())  # argmax is all 1-bit: 700 of 1400 bits
    bits, repair = budgeted_argmax(probs, sizes, cap)
    used = sum(bits[n] * sizes[n] for n in bits)
    assert repair == "fill" and used <= cap
    # 99% of 1400 is out of reach; 1400 itself is reachable (e.g. a2 b2 c2 d2): the fill takes
    # the most probable of the maps that use it
    full = [row for row in _brute(probs, sizes, cap) if row[0] == 1400]
    assert used == 1400 and bits == max(full, key=lambda row: row[1])[2]
    assert bits["b"] == 1  # the cluster that put 90% on 1 bit is not upgraded
    # without fill: the plain argmax, untouched
    assert budgeted_argmax(probs, sizes, cap, fill=False) == ({n: 1 for n in probs}, "none")
    # every cluster at its widest fits: take it
    assert budgeted_argmax(probs, sizes, 4.0 * sum(sizes.values()))[0] == {n: 4 for n in probs}


def test_budgeted_argmax_fill_reaches_the_budget_on_the_rewarded_path() -> None:
    rng = random.Random(3)
    fills = 0
    for _ in range(60):
        names = [f"c{i}" for i in range(rng.randint(2, 5))]
        probs = {}
        for n in names:
            raw = [rng.random() + 1e-3 for _ in range(3)]
            probs[n] = {b: r / sum(raw) for b, r in zip((1, 2, 4), raw, strict=True)}
        sizes = {n: rng.randint(1, 50) for n in names}
        cap = rng.uniform(1.2, 3.5) * sum(sizes.values())
        bits, repair = budgeted_argmax(probs, sizes, cap)
        used = sum(bits[n] * sizes[n] for n in names)
        table = _brute(probs, sizes, cap)
        fullest = max(row[0] for row in table)
        argmax = {n: max(p, key=p.get) for n, p in probs.items()}
        argmax_used = sum(argmax[n] * sizes[n] for n in names)
        assert used <= cap
        assert used >= min(0.99 * cap, fullest)  # the budget is spent as far as the clusters allow
        if argmax_used <= cap:
            assert used >= argmax_used  # never gives bits back
            assert (repair == "none") == (bits == argmax)
        else:
            assert repair in ("shrink", "fill")
        if repair == "fill":
            fills += 1
            # exact: at the fill's reward no map within the cap scores higher (brute force)
            logp = {n: {b: math.log(v) for b, v in p.items()} for n, p in probs.items()}
            mu = fill_reward(logp, sizes, cap, min(0.99 * cap, fullest))
            value = sum(logp[n][b] + mu * sizes[n] * b for n, b in bits.items())
            best = max(lp + mu * u for u, lp, _ in table)
            assert value == pytest.approx(best, abs=1e-9)
    assert fills >= 10  # the fill branch was exercised


def test_integral_resets_when_the_budget_is_crossed() -> None:
    from nas.search.gumbel import _integrate

    assert _integrate(1.0, 0.5, 0.1) == pytest.approx(1.05)  # over budget, still pushing down: integrate
    assert _integrate(1.0, -0.05, 0.1) == pytest.approx(-0.005)  # under budget: the push-down is dropped
    assert _integrate(-2.0, 0.2, 0.1) == pytest.approx(0.02)  # over budget again: the bits reward is dropped
    assert _integrate(-2.0, -0.2, 0.1) == pytest.approx(-2.02)
