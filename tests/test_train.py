"""FP training: learning, resume equality, divergence, and 2-process DDP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from nas.checkpoint import load_checkpoint
from nas.config import parse_config
from nas.data import load_corpus
from nas.distributed import DistInfo
from nas.train import TrainingDivergedError, epoch_batches, learning_rate, train

LSTM = {"model": {"type": "lstm", "embed_dim": 16, "hidden_dim": 16, "num_layers": 2, "dropout": 0.2},
        "data": {"batch_size": 4, "bptt": 10, "eval_batch_size": 2},
        "train": {"epochs": 2, "lr": 1.0, "decay_start_epoch": 1, "seed": 3}}
TRANSFORMER = {"model": {"type": "transformer", "d_model": 16, "num_layers": 2, "num_heads": 2, "d_ff": 32,
                         "context": 16, "dropout": 0.1},
               "data": {"batch_size": 4, "context": 16, "eval_batch_size": 8, "eval_stride": 8},
               "train": {"optimizer": "adamw", "lr": 0.01, "schedule": "cosine", "warmup_steps": 5,
                         "epochs": 2, "seed": 3}}


def _states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_training_learns_the_synthetic_corpus(tiny_corpus_dir: Path, tmp_path: Path) -> None:
    corpus = load_corpus(tiny_corpus_dir)
    raw = {**LSTM, "train": {**LSTM["train"], "optimizer": "adam", "lr": 0.02, "schedule": "constant",
                                    "epochs": 4}}
    metrics = train(parse_config(raw), corpus, tmp_path / "run", progress=False)
    vocab = len(corpus.vocab)
    # A 24-word corpus from a template grammar (true perplexity about 4): far below uniform.
    assert metrics["valid_ppl"] < vocab / 4
    assert metrics["history"][1]["valid_ppl"] < metrics["history"][0]["valid_ppl"]
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    assert best["vocab"] == list(corpus.vocab.words) and best["config"]["type"] == "lstm"
    assert (tmp_path / "run" / "metrics.json").is_file()


@pytest.mark.parametrize("raw", [LSTM, TRANSFORMER], ids=["lstm", "transformer"])
@pytest.mark.parametrize("where", ["mid-epoch", "epoch-end"])
def test_resume_ends_with_the_same_weights(raw: dict, where: str, tiny_corpus_dir: Path, tmp_path: Path) -> None:
    corpus = load_corpus(tiny_corpus_dir)
    exp = parse_config(raw)
    train(exp, corpus, tmp_path / "straight", progress=False)
    epoch_steps = len(epoch_batches(exp, corpus, 0, DistInfo(), recurrent=raw is LSTM))
    stop_after = 7 if where == "mid-epoch" else epoch_steps
    first = train(exp, corpus, tmp_path / "resumed", progress=False, stop_after_steps=stop_after)
    assert first.get("stopped_early"), first
    expected_position = {"epoch": 0, "step": 7} if where == "mid-epoch" else {"epoch": 1, "step": 0}
    assert {k: first["position"][k] for k in ("epoch", "step")} == expected_position
    train(exp, corpus, tmp_path / "resumed", progress=False, resume=True)
    straight = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")
    assert straight["position"] == resumed["position"] == {"epoch": 2, "step": 0, "global_step": 2 * epoch_steps}
    assert _states_equal(straight["model"], resumed["model"])
    assert straight["history"][-1]["valid_ppl"] == resumed["history"][-1]["valid_ppl"]


def test_divergence_stops_with_a_clear_message(tiny_corpus_dir: Path, tmp_path: Path) -> None:
    raw = {**LSTM, "train": {**LSTM["train"], "lr": 1e30, "clip": 0.0}}
    with pytest.raises(TrainingDivergedError, match=r"training diverged at epoch 1.*lr=1e\+30\)\. Lower train\.lr"):
        train(parse_config(raw), load_corpus(tiny_corpus_dir), tmp_path / "run", progress=False)


def test_learning_rate_schedules() -> None:
    step = parse_config({"model": {"type": "lstm"}, "train": {"lr": 1.0, "lr_decay": 0.5, "decay_start_epoch": 4}})
    assert [learning_rate(step.train, e, 0, 100) for e in range(6)] == [1, 1, 1, 1, 0.5, 0.25]
    cos = parse_config({"model": {"type": "lstm"},
                        "train": {"lr": 2.0, "schedule": "cosine", "warmup_steps": 10}}).train
    assert learning_rate(cos, 0, 0, 110) == pytest.approx(0.2)
    assert learning_rate(cos, 0, 10, 110) == pytest.approx(2.0)
    assert learning_rate(cos, 0, 60, 110) == pytest.approx(1.0)
    assert learning_rate(cos, 0, 110, 110) == pytest.approx(0.0)


@pytest.mark.parametrize("raw", [LSTM, TRANSFORMER], ids=["lstm", "transformer"])
def test_torchrun_ddp_matches_single_process(raw: dict, tiny_corpus_dir: Path, tmp_path: Path) -> None:
    """Two gloo processes with the same global batch reach the single-process weights."""
    raw = {**raw, "model": {**raw["model"], "dropout": 0.0}, "train": {**raw["train"], "epochs": 1}}
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPNAS_DATA": str(tiny_corpus_dir)}
    base = ["-m", "nas.cli", "train", str(config), "--no-progress"]
    subprocess.run([sys.executable, *base, "--out", str(tmp_path / "single")], env=env, check=True,
                   capture_output=True, timeout=300)
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          *base, "--out", str(tmp_path / "ddp")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    single = load_checkpoint(tmp_path / "single" / "checkpoint.pt")
    multi = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")
    assert single["position"] == multi["position"]
    for name, tensor in single["model"].items():
        # gloo sums gradients in another order: equal up to float32 rounding over ~100 steps
        torch.testing.assert_close(multi["model"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)
    assert multi["history"][0]["valid_ppl"] == pytest.approx(single["history"][0]["valid_ppl"], rel=1e-4)


def test_torchrun_retrain_reads_best_only_when_written(tiny_corpus_dir: Path, tmp_path: Path) -> None:
    """Regression: non-main ranks reloaded best.pt before rank 0 had written it (1 run in 3 failed)."""
    raw = {**LSTM, "model": {**LSTM["model"], "dropout": 0.0}, "train": {**LSTM["train"], "epochs": 1},
           "retrain": {"optimizer": "sgd", "lr": 0.1, "schedule": "constant", "epochs": 2, "project_every": 5}}
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPNAS_DATA": str(tiny_corpus_dir)}
    subprocess.run([sys.executable, "-m", "nas.cli", "train", str(config), "--no-progress", "--out",
                    str(tmp_path / "fp")], env=env, check=True, capture_output=True, timeout=300)
    for attempt in range(2):
        out = tmp_path / f"rt{attempt}"
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "nas.cli", "retrain", str(config), "--precision", "uniform:2", "--checkpoint",
                               str(tmp_path / "fp" / "best.pt"), "--out", str(out), "--no-progress"],
                              env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert (out / "best.pt").is_file() and (out / "metrics.json").is_file()


def test_best_checkpoint_keeps_tied_weights_tied(tiny_corpus_dir: Path, tmp_path: Path) -> None:
    """best.pt stores a tied embedding/decoder once (it used to clone them apart: twice the size)."""
    corpus = load_corpus(tiny_corpus_dir)
    exp = parse_config({**TRANSFORMER, "train": {**TRANSFORMER["train"], "epochs": 1}})
    train(exp, corpus, tmp_path / "run", progress=False)
    best = load_checkpoint(tmp_path / "run" / "best.pt")["model"]
    assert best["decoder.weight"].data_ptr() == best["embedding.weight"].data_ptr()
