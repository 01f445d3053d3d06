"""Theoretical model size: hand-computed byte counts on tiny models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from search_spaces.apply import fake_quantize_
from search_spaces.models import LSTMLM, LSTMConfig, TransformerConfig, TransformerLM
from search_spaces.precision import PrecisionMap
from search_spaces.size import model_size


class Tiny(nn.Module):
    """Embedding [10x4] (40) + Linear [3x4] (12, bias 3) + LayerNorm(4) (8): 63 parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.norm = nn.LayerNorm(4)
        self.out = nn.Linear(4, 3)


def lstm_lm(tie: bool) -> LSTMLM:
    torch.manual_seed(0)
    return LSTMLM(LSTMConfig(vocab_size=50, embed_dim=16, hidden_dim=16, num_layers=2, tie_weights=tie))


def test_hand_computed_matrix_granularity() -> None:
    size = model_size(Tiny(), PrecisionMap({"emb": 2, "out": 4}))
    # emb: 2*40/8 = 10 B + one scale 4 B; out: 4*12/8 = 6 B + 4 B; leftovers (3 + 8) * 4 = 44 B.
    assert size["theoretical_bytes"] == 68.0
    assert size["fp32_bytes"] == 4 * 63
    assert size["compression"] == pytest.approx(252 / 68)
    assert size["avg_bits"] == pytest.approx((2 * 40 + 4 * 12) / 52)
    assert (size["quantized_params"], size["fp_cluster_params"], size["fp_leftover_params"]) == (52, 0, 11)


def test_hand_computed_row_granularity_and_fp_cluster() -> None:
    size = model_size(Tiny(), PrecisionMap({"emb": 1, "out": 32}, granularity="row"))
    # emb: 40/8 = 5 B + 10 row scales (40 B); out at 32 bits: 48 B, no scale; leftovers 44 B.
    assert size["theoretical_bytes"] == 5 + 40 + 48 + 44
    assert size["avg_bits"] == pytest.approx((1 * 40 + 32 * 12) / 52)
    assert (size["quantized_params"], size["fp_cluster_params"], size["fp_leftover_params"]) == (40, 12, 11)


@pytest.mark.parametrize("tie", [False, True])
def test_tied_weights_counted_once(tie: bool) -> None:
    model = lstm_lm(tie)
    size = model_size(model, PrecisionMap.uniform(model, 4))
    emb, gates = 50 * 16, 2 * 4 * (16 * 16 + 16 * 16)  # both layers: input dim 16 = hidden dim
    biases = 2 * 4 * 16 + 50
    weights = emb + gates + (0 if tie else 50 * 16)
    clusters = 1 + 16 + (0 if tie else 1)
    assert size["fp32_bytes"] == 4 * (weights + biases)
    assert size["theoretical_bytes"] == 4 * weights / 8 + 4 * clusters + 4 * biases
    assert size["quantized_params"] == weights and size["fp_leftover_params"] == biases
    assert size["avg_bits"] == 4.0


@pytest.mark.parametrize("build", [
    lambda: lstm_lm(True),
    lambda: TransformerLM(TransformerConfig(vocab_size=40, d_model=8, num_layers=2, num_heads=2, d_ff=16,
                                            context=8)),
    lambda: nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.LSTM(4, 3)),
])
def test_uniform_32_has_compression_one(build) -> None:
    model = build()
    size = model_size(model, PrecisionMap.uniform(model, 32))
    assert size["compression"] == 1.0 and size["avg_bits"] == 32.0 and size["quantized_params"] == 0


def test_batchnorm_buffers_are_fp_leftovers() -> None:
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.BatchNorm1d(4))
    size = model_size(model, PrecisionMap.uniform(model, 8))
    # weight 16 B + scale 4 B; BN weight/bias 8 + running mean/var 8 + num_batches_tracked 1 element.
    assert size["fp_leftover_params"] == 17 and size["theoretical_bytes"] == 16 + 4 + 4 * 17


def test_uniform_8_bit_quantized_part_is_just_under_4x() -> None:
    model = lstm_lm(False)
    size = model_size(model, PrecisionMap.uniform(model, 8))
    leftover = 4 * size["fp_leftover_params"]
    cluster_ratio = 4 * size["quantized_params"] / (size["theoretical_bytes"] - leftover)
    # 18 clusters: 5,696 one-byte weights plus 18 four-byte scales, against 4 bytes per weight.
    assert size["quantized_params"] == 5696
    assert cluster_ratio == pytest.approx(4 * 5696 / (5696 + 4 * 18)) and 3.9 < cluster_ratio < 4.0
    assert 3.5 < size["compression"] < cluster_ratio  # FP32 biases pull the whole model further down


def test_mixed_avg_bits_and_fake_quantized_model_gives_same_sizes() -> None:
    model = Tiny()
    pm = PrecisionMap({"emb": 3, "out": 16})
    before = model_size(model, pm)
    assert before["avg_bits"] == pytest.approx((3 * 40 + 16 * 12) / 52)
    fake_quantize_(model, pm)
    assert model_size(model, pm) == before


def test_map_is_validated() -> None:
    with pytest.raises(ValueError, match="missing clusters.*out"):
        model_size(Tiny(), PrecisionMap({"emb": 2}))
