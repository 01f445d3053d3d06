"""The supernet's fused mixture: same values and gradients as the per-branch STE sum."""

from __future__ import annotations

import pytest
import torch

from nas.gumbel import GumbelSupernet, _MixedQuantize
from search_spaces.models import build_model
from search_spaces.precision import find_clusters
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
    bits, repaired = net.export(cap)
    assert repaired and sum(bits[n] * sizes[n] for n in names) <= cap
    assert set(bits.values()) == {2, 8}  # the repair keeps as many 8-bit clusters as fit
    assert net.export(None) == ({n: 8 for n in names}, False)
