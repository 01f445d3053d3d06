"""Smoke check of the NNI 3.0 peer baselines (benchmarks/nni_peers.py).

Not part of the main suite's dependencies: it skips where NNI is missing (the main venv, CI).
Run it in the NNI venv: ``.venv-nni/bin/python -m pytest -q tests/test_nni_peers.py``.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

pytest.importorskip("nni")
# NNI 3.0's QAT backward uses the deprecated ctx.saved_variables on every step.
pytestmark = pytest.mark.filterwarnings("ignore:'saved_variables' is deprecated:DeprecationWarning")

from benchmarks.nni_peers import (  # noqa: E402 - only importable once NNI is known to be there
    ONE_BIT_REASON,
    attach_nni,
    main,
    nni_quantize_train,
    nni_targets,
)
from nas.config.sections import ExperimentConfig, parse_config  # noqa: E402
from nas.core.checkpoint import load_checkpoint  # noqa: E402
from nas.core.data import Corpus, load_corpus  # noqa: E402
from nas.retrain.loop import train  # noqa: E402
from search_spaces.clusters import find_clusters  # noqa: E402
from search_spaces.models import restore_model  # noqa: E402
from tests.synthetic import write_synthetic_corpus  # noqa: E402

LSTM = {"model": {"type": "lstm", "embed_dim": 16, "hidden_dim": 16, "num_layers": 1, "dropout": 0.1},
        "data": {"batch_size": 4, "bptt": 10, "eval_batch_size": 2},
        "train": {"optimizer": "adam", "lr": 0.02, "schedule": "constant", "epochs": 2, "seed": 1},
        "retrain": {"optimizer": "adam", "lr": 0.005, "schedule": "constant", "epochs": 1, "seed": 2}}
TRANSFORMER = {"model": {"type": "transformer", "d_model": 16, "num_layers": 1, "num_heads": 2, "d_ff": 32,
                         "context": 16, "dropout": 0.1},
               "data": {"batch_size": 4, "context": 16, "eval_batch_size": 8, "eval_stride": 8},
               "train": {"optimizer": "adamw", "lr": 0.01, "schedule": "constant", "epochs": 1, "seed": 3},
               "retrain": {"optimizer": "adamw", "lr": 0.002, "schedule": "constant", "epochs": 1, "seed": 3}}


def _fp_model(root: Path, raw: dict[str, Any]) -> tuple[ExperimentConfig, Corpus, nn.Module, Path]:
    corpus_dir = write_synthetic_corpus(root / "corpus")
    exp, corpus = parse_config(raw), load_corpus(corpus_dir)
    train(exp, corpus, root / "fp", progress=False)
    ckpt = load_checkpoint(root / "fp" / "best.pt")
    model = restore_model(ckpt)
    return exp, corpus, model, root / "fp" / "best.pt"


@pytest.fixture(scope="module")
def lstm_fp(tmp_path_factory: pytest.TempPathFactory) -> tuple[ExperimentConfig, Corpus, nn.Module, Path]:
    return _fp_model(tmp_path_factory.mktemp("lstm"), LSTM)


def _assert_quantized(model: nn.Module, bits: int) -> None:
    for name, cluster in find_clusters(model).items():
        levels = model.get_submodule(cluster.module).weight.unique().numel()
        assert 2 < levels <= 2**bits - 1, (name, levels)  # quantized, and not collapsed


@pytest.mark.parametrize("method", ["qat", "lsq"])
def test_lstm_int4(method: str, lstm_fp: tuple[ExperimentConfig, Corpus, nn.Module, Path]) -> None:
    exp, corpus, model, _ = lstm_fp
    before = {k: v.clone() for k, v in model.state_dict().items()}
    quantized, metrics = nni_quantize_train(model, method, 4, exp, corpus, max_steps_per_epoch=8,
                                            fp_timing_steps=3, log=None)
    _assert_quantized(quantized, 4)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the input is untouched
    assert math.isfinite(metrics["valid_ppl"]) and math.isfinite(metrics["test_ppl"])
    assert metrics["levels_max"] <= metrics["levels_limit"] == 15
    assert metrics["avg_bits"] == pytest.approx(4.0)
    assert metrics["compression"] > 4
    assert metrics["step_s"] > 0 and metrics["fp_step_s"] > 0


def test_transformer_tied_int4(tmp_path: Path) -> None:
    exp, corpus, model, _ = _fp_model(tmp_path, TRANSFORMER)
    quantized, metrics = nni_quantize_train(model, "qat", 4, exp, corpus, max_steps_per_epoch=5,
                                            fp_timing_steps=2, log=None)
    _assert_quantized(quantized, 4)
    assert quantized.decoder.weight is quantized.embedding.weight  # one cluster, one scale
    assert math.isfinite(metrics["test_ppl"])


@pytest.mark.parametrize("method", ["qat", "lsq"])
def test_every_wrapped_weight_is_trained(method: str, lstm_fp: tuple[ExperimentConfig, Corpus, nn.Module, Path]
                                         ) -> None:
    """Gradients reach NNI's latent copy of every cluster: the LSTM gates use quantized weights."""
    exp, corpus, model, _ = lstm_fp
    grads: dict[str, bool] = {}

    def one_step(net: nn.Module, optimizer: torch.optim.Optimizer, training_step: Any, *_: Any) -> None:
        inputs = corpus.split("train")[:20].view(2, 10)
        loss, _ = training_step((inputs, corpus.split("train")[1:21].view(2, 10), None), net)
        optimizer.zero_grad()
        loss.backward()
        grads.update({name: p.grad is not None and bool(p.grad.abs().sum() > 0)
                      for name, p in net.named_parameters()})
        optimizer.step()

    net = copy.deepcopy(model)
    quantizer = attach_nni(net, method, 4, exp.retrain, one_step,
                           lambda batch, m: (m(batch[0], batch[2], batch[1]).loss, None))
    quantizer.compress(1, 1)
    wrapped, _ = nni_targets(model)
    assert wrapped and all(grads[f"{name}._nni_wrapper.weight"] for name in wrapped)


@pytest.mark.parametrize("method", ["qat", "lsq"])
def test_int1_is_degenerate(method: str, lstm_fp: tuple[ExperimentConfig, Corpus, nn.Module, Path]) -> None:
    """Why 1 bit is skipped: NNI's narrow-range int1 has the single level 0 (QAT: 0 * inf = NaN)."""
    exp, corpus, model, _ = lstm_fp
    with pytest.raises(ValueError, match="single level"):
        nni_quantize_train(model, method, 1, exp, corpus)
    tokens = corpus.split("train")[:11]

    def one_step(net: nn.Module, optimizer: torch.optim.Optimizer, training_step: Any, *_: Any) -> None:
        loss, _ = training_step((tokens[:-1].view(1, 10), tokens[1:].view(1, 10), None), net)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    net = copy.deepcopy(model)
    attach_nni(net, method, 1, exp.retrain, one_step,
               lambda batch, m: (m(batch[0], batch[2], batch[1]).loss, None)).compress(1, 1)
    net.eval()
    with torch.no_grad():
        net(tokens.view(1, -1))  # every wrapper writes its int1 weight
    for name in nni_targets(model)[0]:
        weight = net.get_submodule(name).weight
        assert bool(weight.isnan().all()) if method == "qat" else not weight.any(), name


def test_cli_skips_one_bit(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--checkpoint", "unused.pt", "--config", "quick", "--method", "lsq", "--bits", "1"])
    assert ONE_BIT_REASON in capsys.readouterr().out


def test_cli_row(lstm_fp: tuple[ExperimentConfig, Corpus, nn.Module, Path], tmp_path: Path,
                 capsys: pytest.CaptureFixture[str]) -> None:
    exp, corpus, _, checkpoint = lstm_fp
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(LSTM))
    main(["--checkpoint", str(checkpoint), "--config", str(config), "--method", "qat", "--bits", "2",
          "--max-steps", "4", "--data", str(corpus.folder)])
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["method"] == "nni_qat" and row["bits"] == 2 and row["levels_max"] <= 3
    assert math.isfinite(row["valid_ppl"]) and row["avg_bits"] == pytest.approx(2.0)
