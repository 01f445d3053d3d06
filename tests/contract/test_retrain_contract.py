"""The contract both retraining methods and the packed format pass on every kind of LM (issue 14, item 5).

Parametrised over every method of ``nas.api.RETRAIN_CONFIGS`` and the four tiny LMs of
``tests/lms.py``, through the library verbs ``retrain``, ``export`` and ``load_packed``, at a
mixed map (1 to 8 bits and clusters kept at 32) whose granularity and leftover width vary by LM:

- after retraining, every quantized cluster lies on its grid (quantizing it again at its map's
  width gives the same weights, within ``levels(bits)`` values) and so does every leftover
  (biases, norms) when the map's ``leftover_bits`` is below 32; the weights are not just the FP weights
  projected onto the map (training happened); the loss is finite;
- the same seed gives bit-identical weights, whatever the global RNGs hold and whichever mode the
  model came in; the model is handed back in the mode it came in (``nas/fit.py``);
- ``export`` then ``load_packed(path, model=skeleton)`` gives the exported weights bit for bit, the
  retrained ones too up to an ulp (exporting re-solves the scales), and identical logits; an
  mpnas model also rebuilds from the file alone; a truncated file raises ``PackedFileError`` and
  leaves the skeleton as it was.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from nas.api import (
    RETRAIN_CONFIGS,
    PrecisionMap,
    RetrainConfig,
    as_lm,
    evaluate,
    export,
    load_packed,
    quantize_,
    retrain,
)
from search_spaces.clusters import cluster_weight, find_clusters, find_leftovers
from search_spaces.packed_format import PackedFileError
from search_spaces.quant import levels, quantize, quantize_affine
from tests.contract.common import ambient_rng, assert_same_state, snapshot
from tests.lms import LM_KINDS, build_lm

METHODS = sorted(RETRAIN_CONFIGS)
# A few Adam steps on short rows or windows; two epochs so that the second epoch's batches are drawn too.
SHORT: dict[str, Any] = {"epochs": 2, "max_steps_per_epoch": 3, "optimizer": "adam", "lr": 0.01, "batch_size": 4,
                         "bptt": 16, "context": 16, "seed": 5, "project_every": 2}
METHOD_SETTINGS: dict[str, dict[str, Any]] = {"admm": {"rho": 0.01, "rho_max": 1.0}}
WIDTHS = (2, 4, 1, 8, 32, 3)  # cluster i of the model gets WIDTHS[i % 6]
ULP = torch.finfo(torch.float32).eps  # relative: one unit in the last place of a float32 weight
# Per LM: the map's granularity and leftover width (every combination of the packed format's pieces).
MAP_KINDS: dict[str, tuple[str, int]] = {"mpnas_lstm": ("matrix", 32), "mpnas_transformer": ("row", 8),
                                         "plain_lstm": ("row", 16), "plain_transformer": ("matrix", 8)}


def method_config(method: str) -> RetrainConfig:
    return RETRAIN_CONFIGS[method](**SHORT, **METHOD_SETTINGS.get(method, {}))


def mixed_map(kind: str, model: nn.Module) -> PrecisionMap:
    granularity, leftover_bits = MAP_KINDS[kind]
    bits = {name: WIDTHS[i % len(WIDTHS)] for i, name in enumerate(find_clusters(model))}
    return PrecisionMap(bits, granularity, leftover_bits=leftover_bits)


def assert_on_grids(model: nn.Module, precision: PrecisionMap) -> None:
    """Every quantized cluster and leftover is on its grid: quantizing it again gives the same weights, up
    to the ulp that re-solving a scale from float32 table values may move them (as
    ``search_spaces.apply.quantize_`` documents: 1-bit scales are a float32 mean), and every scale
    has at most ``levels(bits)`` values."""
    for name, cluster in find_clusters(model).items():
        bits = precision.bits[name]
        if bits == 32:
            continue
        weight = cluster_weight(model, cluster).detach()
        again = quantize(weight, bits, precision.granularity)
        torch.testing.assert_close(again.weight, weight, rtol=ULP, atol=0, msg=f"{name} at {bits} bits is off its grid")
        groups = [weight] if precision.granularity == "matrix" else list(weight)
        assert max(group.unique().numel() for group in groups) <= levels(bits), f"{name}: too many values"
    for name, tensor in find_leftovers(model).items():
        if precision.leftover_bits < 32:
            again = quantize_affine(tensor.detach(), precision.leftover_bits).weight
            torch.testing.assert_close(again, tensor.detach(), rtol=ULP, atol=0, msg=f"leftover {name} is off its grid")


def logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return as_lm(model.eval(), context=16)(tokens.view(4, -1)[:, :16]).logits


@pytest.fixture(scope="module")
def retrained(pretrained_lms: Mapping[str, nn.Module], lm_tokens: torch.Tensor
              ) -> Callable[[str, str], tuple[nn.Module, PrecisionMap]]:
    """``retrained(method, kind)``: a copy of the trained LM retrained from eval mode, and its map (run once)."""
    done: dict[tuple[str, str], tuple[nn.Module, PrecisionMap]] = {}

    def get(method: str, kind: str) -> tuple[nn.Module, PrecisionMap]:
        if (method, kind) not in done:
            model = build_lm(kind)
            model.load_state_dict(pretrained_lms[kind].state_dict())
            precision = mixed_map(kind, model)
            assert retrain(model.eval(), precision, lm_tokens, method_config(method)) is model
            done[method, kind] = model, precision
        return done[method, kind]

    return get


def test_every_lm_kind_has_a_map_kind() -> None:
    assert set(MAP_KINDS) == set(LM_KINDS)
    assert set(METHOD_SETTINGS) <= set(RETRAIN_CONFIGS)


@pytest.mark.parametrize("kind", LM_KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_retrained_weights_lie_on_their_grids(method: str, kind: str, retrained: Any, pretrained_lms: Mapping,
                                              lm_test_tokens: torch.Tensor) -> None:
    model, precision = retrained(method, kind)
    assert_on_grids(model, precision)
    projected = copy.deepcopy(pretrained_lms[kind])
    quantize_(projected, precision)
    moved = max(float((v - projected.state_dict()[k]).abs().max()) for k, v in model.state_dict().items())
    assert moved > 1e-4, "retraining changed nothing but the projection onto the map"  # it moves by ~1e-2 here
    assert math.isfinite(evaluate(copy.deepcopy(model), lm_test_tokens)["loss"])


@pytest.mark.parametrize("training", [True, False], ids=["train_mode", "eval_mode"])
@pytest.mark.parametrize("kind", LM_KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_same_seed_gives_the_same_weights_and_the_mode_is_kept(method: str, kind: str, training: bool, retrained: Any,
                                                               lm_copy: Any, lm_tokens: torch.Tensor) -> None:
    """From either mode and another global RNG state: the weights of the reference run, bit for bit."""
    reference, precision = retrained(method, kind)
    model = lm_copy(kind).train(training)
    with ambient_rng(11):
        assert retrain(model, precision, lm_tokens, method_config(method)) is model
    assert [m.training for m in model.modules()] == [training] * len(list(model.modules()))
    assert_same_state(reference.state_dict(), model.state_dict(), f"{method} on {kind} run twice")


@pytest.mark.parametrize("kind", LM_KINDS)
@pytest.mark.parametrize("method", METHODS)
def test_packed_round_trip_is_bit_identical(method: str, kind: str, retrained: Any, lm_test_tokens: torch.Tensor,
                                            tmp_path: Path) -> None:
    trained, precision = retrained(method, kind)
    model = build_lm(kind)
    model.load_state_dict(trained.state_dict())
    before, _ = snapshot(model)
    path = tmp_path / "model.mpq"
    header = export(model, precision, path)
    assert header["precision"]["bits"] == dict(precision.bits)
    for key, value in model.state_dict().items():  # the retrained model was on its grids already
        torch.testing.assert_close(value, before[key], rtol=ULP, atol=0, msg=f"export moved {key}")

    skeleton = build_lm(kind, seed=7)
    loaded, again = load_packed(path, model=skeleton)
    assert loaded is skeleton and again == precision
    assert_same_state(model.state_dict(), loaded.state_dict(), f"{kind} through {path.name}")
    assert torch.equal(logits(loaded, lm_test_tokens), logits(model, lm_test_tokens))
    if kind.startswith("mpnas"):  # an mpnas model is rebuilt from the header alone
        rebuilt, _ = load_packed(path)
        assert type(rebuilt) is type(model)
        assert_same_state(model.state_dict(), rebuilt.state_dict(), f"{kind} rebuilt from {path.name}")


@pytest.mark.parametrize("kind", LM_KINDS)
def test_an_exported_fp_model_loads_back_and_a_truncated_file_is_refused(kind: str, lm_copy: Any,
                                                                         tmp_path: Path) -> None:
    model = lm_copy(kind)
    path = tmp_path / "model.mpq"
    export(model, mixed_map(kind, model), path)
    loaded, _ = load_packed(path, model=build_lm(kind, seed=7))  # FP weights: export quantized them in place
    assert_same_state(model.state_dict(), loaded.state_dict(), f"{kind} through {path.name}")
    data = path.read_bytes()
    header_end = 16 + int.from_bytes(data[8:16], "little")
    skeleton = build_lm(kind, seed=7)
    state, _ = snapshot(skeleton)
    for size in (0, 7, 16, header_end // 2, header_end, (header_end + len(data)) // 2, len(data) - 1):
        cut = tmp_path / f"cut{size}.mpq"
        cut.write_bytes(data[:size])
        with pytest.raises(PackedFileError, match=str(cut)):
            load_packed(cut, model=skeleton)
    assert_same_state(state, skeleton.state_dict(), "a skeleton a refused file was loaded into")
