"""FP training: learning, resume equality, divergence, and 2-process DDP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from nas.config.sections import parse_config
from nas.core.checkpoint import load_checkpoint
from nas.core.data import load_corpus
from nas.retrain.distributed import DistInfo
from nas.retrain.hooks import TrainingDivergedError
from nas.retrain.loop import epoch_batches, learning_rate, train

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


def test_fp_batch_order_is_unchanged(tiny_corpus_dir: Path) -> None:
    """FP training shuffles Transformer windows exactly as before retrain.seed took over retraining's
    order: by train.seed and the epoch (so the committed reference checkpoints stay reproducible)."""
    from nas.core.batches import window_batches

    corpus = load_corpus(tiny_corpus_dir)
    exp = parse_config(TRANSFORMER)
    for epoch in (0, 1):
        expected = window_batches(corpus.train, 16, 4, torch.Generator().manual_seed(3 * 100_003 + epoch))
        got = epoch_batches(exp, corpus, epoch, DistInfo(), recurrent=False)
        assert len(got) == len([x for x, _ in expected if x.size(0) == 4])
        assert all(torch.equal(a[0], b[0]) for a, b in zip(got, expected, strict=False))


def _retrain_first_batches(corpus_dir: Path, fp: Path, out: Path, seed: int,
                           monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """The inputs of every batch a Transformer retraining with ``retrain.seed: seed`` shuffles."""
    import nas.core.batches
    import nas.retrain.loop
    from nas.retrain.run import retrain
    from search_spaces.models import build_model
    from search_spaces.precision import PrecisionMap

    seen: list[torch.Tensor] = []
    real = nas.core.batches.window_batches

    def spy(*args: object, **kwargs: object) -> list[tuple[torch.Tensor, torch.Tensor]]:
        batches = real(*args, **kwargs)
        seen.append(torch.cat([x for x, _ in batches]))
        return batches

    monkeypatch.setattr(nas.retrain.loop, "window_batches", spy)
    raw = {**TRANSFORMER, "retrain": {"method": "ste", "optimizer": "adam", "lr": 1e-3, "schedule": "constant",
                                      "epochs": 2, "max_steps_per_epoch": 2, "seed": seed}}
    exp = parse_config(raw)
    corpus = load_corpus(corpus_dir)
    config = dict(load_checkpoint(fp)["config"])
    precision = PrecisionMap.uniform(build_model(config.pop("type"), **config), 4)
    retrain(exp, corpus, fp, precision, out, method="ste", progress=False)
    return seen


def test_retrain_seed_drives_the_batch_order(tiny_corpus_dir: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    raw = {**TRANSFORMER, "train": {**TRANSFORMER["train"], "epochs": 1, "max_steps_per_epoch": 2}}
    train(parse_config(raw), load_corpus(tiny_corpus_dir), tmp_path / "fp", progress=False)
    fp = tmp_path / "fp" / "best.pt"
    one = _retrain_first_batches(tiny_corpus_dir, fp, tmp_path / "a", 1, monkeypatch)
    again = _retrain_first_batches(tiny_corpus_dir, fp, tmp_path / "b", 1, monkeypatch)
    other = _retrain_first_batches(tiny_corpus_dir, fp, tmp_path / "c", 2, monkeypatch)
    assert len(one) == len(again) == len(other) >= 2  # the epoch length, then one order per epoch
    assert all(torch.equal(a, b) for a, b in zip(one, again, strict=True))  # same seed: same order
    assert not torch.equal(one[1], other[1])  # another retrain.seed: another order


def test_retrain_with_its_own_seed_resumes_exactly(tiny_corpus_dir: Path, tmp_path: Path) -> None:
    """A Transformer retrained with retrain.seed != train.seed, killed mid-epoch, resumes to the same weights."""
    from nas.retrain.run import retrain
    from search_spaces.models import build_model
    from search_spaces.precision import PrecisionMap

    corpus = load_corpus(tiny_corpus_dir)
    raw = {**TRANSFORMER, "train": {**TRANSFORMER["train"], "epochs": 1, "max_steps_per_epoch": 2},
           "retrain": {"method": "ste", "optimizer": "adam", "lr": 1e-3, "schedule": "constant", "epochs": 2,
                       "max_steps_per_epoch": 4, "seed": 5}}
    exp = parse_config(raw)
    train(exp, corpus, tmp_path / "fp", progress=False)
    fp = tmp_path / "fp" / "best.pt"
    config = dict(load_checkpoint(fp)["config"])
    precision = PrecisionMap.uniform(build_model(config.pop("type"), **config), 4)
    retrain(exp, corpus, fp, precision, tmp_path / "straight", method="ste", progress=False)
    first = retrain(exp, corpus, fp, precision, tmp_path / "resumed", method="ste", progress=False,
                    stop_after_steps=6)
    assert first["stopped_early"] and first["position"]["epoch"] == 1
    retrain(exp, corpus, fp, precision, tmp_path / "resumed", method="ste", progress=False, resume=True)
    for name in ("checkpoint.pt", "best.pt"):
        assert _states_equal(load_checkpoint(tmp_path / "straight" / name)["model"],
                             load_checkpoint(tmp_path / "resumed" / name)["model"]), name


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
    base = ["-m", "nas.cli.main", "train", str(config), "--no-progress"]
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
    subprocess.run([sys.executable, "-m", "nas.cli.main", "train", str(config), "--no-progress", "--out",
                    str(tmp_path / "fp")], env=env, check=True, capture_output=True, timeout=300)
    for attempt in range(2):
        out = tmp_path / f"rt{attempt}"
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               "-m", "nas.cli.main", "retrain", str(config), "--precision", "uniform:2", "--checkpoint",
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


def test_a_finite_but_huge_validation_loss_stops_as_divergence(tmp_path: Path) -> None:
    """A model whose validation loss is finite but above ~709 nats (exp overflows) is reported as
    diverged, not as an OverflowError from the perplexity."""
    import math

    from evaluators.perplexity import perplexity
    from search_spaces.models import build_model
    from tests.synthetic import write_synthetic_corpus

    corpus = load_corpus(write_synthetic_corpus(tmp_path / "c"))
    exp = parse_config({"model": {"type": "lstm", "embed_dim": 8, "hidden_dim": 8, "num_layers": 1},
                        "data": {"batch_size": 4, "bptt": 8, "eval_batch_size": 2},
                        "train": {"optimizer": "sgd", "lr": 1e12, "schedule": "constant", "epochs": 1, "clip": 0.0,
                                  "max_steps_per_epoch": 5}})
    with pytest.raises(TrainingDivergedError, match="training diverged"):
        train(exp, corpus, tmp_path / "run", progress=False)
    model = build_model("lstm", vocab_size=len(corpus.vocab), embed_dim=8, hidden_dim=8, num_layers=1)
    with torch.no_grad():
        model.decoder.bias.copy_(torch.linspace(0, 5000, model.decoder.bias.numel()))
    assert perplexity(model, corpus.valid, corpus.vocab.eos_id)["ppl"] == math.inf
