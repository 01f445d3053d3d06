"""Validation in proportion (issue 16): a valid slice per epoch, no measurement taken twice,
time spent training and validating, and the epochs actually run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import nas.pipeline.stages
import nas.retrain.loop
from evaluators.perplexity import perplexity
from nas.config.sections import ConfigError, TrainSection, parse_config
from nas.core.checkpoint import load_checkpoint
from nas.core.data import Corpus, load_corpus
from nas.retrain.distributed import DistInfo
from nas.retrain.loop import epoch_batches, train
from nas.retrain.run import retrain
from search_spaces.models import restore_model
from search_spaces.precision import PrecisionMap

EXP = {"model": {"type": "lstm", "embed_dim": 16, "hidden_dim": 16, "num_layers": 1, "dropout": 0.1},
       "data": {"batch_size": 4, "bptt": 10, "eval_batch_size": 2},
       "train": {"optimizer": "adam", "lr": 0.02, "schedule": "constant", "epochs": 2, "seed": 1},
       "retrain": {"method": "ste", "optimizer": "adam", "lr": 0.005, "schedule": "constant", "epochs": 1,
                   "max_steps_per_epoch": 10, "project_every": 5, "seed": 2}}
SLICE = 60


def _with(section: str, **values: Any) -> dict[str, Any]:
    return {**EXP, section: {**EXP[section], **values}}


def _spy(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[int]:
    """Record the token count of every perplexity pass ``module`` makes."""
    calls: list[int] = []

    def counting(model: torch.nn.Module, tokens: torch.Tensor, *args: Any, **kwargs: Any) -> dict[str, float]:
        calls.append(tokens.numel())
        return perplexity(model, tokens, *args, **kwargs)

    monkeypatch.setattr(module, "perplexity", counting)
    return calls


def _model_from(path: Path) -> torch.nn.Module:
    ckpt = load_checkpoint(path)
    model = restore_model(ckpt)
    return model


def _ppl(model: torch.nn.Module, corpus: Corpus, tokens: torch.Tensor) -> float:
    return perplexity(model, tokens, corpus.vocab.eos_id, batch_size=EXP["data"]["eval_batch_size"],
                      bptt=EXP["data"]["bptt"])["ppl"]


@pytest.fixture(scope="module")
def fp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Corpus, Path]:
    from tests.synthetic import write_synthetic_corpus

    root = tmp_path_factory.mktemp("fp")
    corpus = load_corpus(write_synthetic_corpus(root / "corpus"))
    train(parse_config(_with("train", epochs=1)), corpus, root / "fp", progress=False)
    return corpus, root / "fp" / "best.pt"


def test_valid_tokens_is_checked_and_inherited_by_retrain() -> None:
    with pytest.raises(ConfigError, match=r"'train\.valid_tokens' = 0 must be >= 1"):
        parse_config(_with("train", valid_tokens=0))
    with pytest.raises(ConfigError, match=r"'retrain\.valid_tokens' = -5 must be >= 1"):
        parse_config(_with("retrain", valid_tokens=-5))
    with pytest.raises(ConfigError, match=r"'train\.valid_tokens' = 'all' has the wrong type"):
        parse_config(_with("train", valid_tokens="all"))
    exp = parse_config(_with("retrain", valid_tokens=500))
    assert (exp.train.valid_tokens, exp.retrain.valid_tokens) == (None, 500)


def test_epochs_validate_on_a_slice_and_the_end_on_the_whole_splits(
        tiny_corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = load_corpus(tiny_corpus_dir)
    calls = _spy(monkeypatch, nas.retrain.loop)
    metrics = train(parse_config(_with("train", valid_tokens=SLICE)), corpus, tmp_path / "run", progress=False)
    assert calls == [SLICE, SLICE, corpus.valid.numel(), corpus.test.numel()]
    best = load_checkpoint(tmp_path / "run" / "best.pt")
    model = _model_from(tmp_path / "run" / "best.pt")
    assert best["valid_tokens"] == metrics["selection_valid_tokens"] == SLICE
    assert best["valid_ppl"] == metrics["selection_valid_ppl"] == min(h["valid_ppl"] for h in metrics["history"])
    assert metrics["selection_valid_ppl"] == _ppl(model, corpus, corpus.valid[:SLICE])
    assert metrics["valid_ppl"] == _ppl(model, corpus, corpus.valid)
    assert metrics["test_ppl"] == _ppl(model, corpus, corpus.test)


def test_a_whole_split_validation_is_not_measured_again(
        tiny_corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    corpus = load_corpus(tiny_corpus_dir)
    calls = _spy(monkeypatch, nas.retrain.loop)
    metrics = train(parse_config(EXP), corpus, tmp_path / "run", progress=False)
    valid, test = corpus.valid.numel(), corpus.test.numel()
    assert calls == [valid, valid, test]  # was [valid, valid, valid, test]
    model = _model_from(tmp_path / "run" / "best.pt")
    assert metrics["valid_ppl"] == min(h["valid_ppl"] for h in metrics["history"]) == _ppl(model, corpus, corpus.valid)
    assert metrics["selection_valid_tokens"] == valid


@pytest.mark.parametrize("tokens", [None, SLICE], ids=["whole", "slice"])
def test_retraining_validates_in_proportion(tokens: int | None, fp_run: tuple[Corpus, Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    corpus, fp = fp_run
    precision = PrecisionMap.uniform(_model_from(fp), 2)
    calls = _spy(monkeypatch, nas.retrain.loop)
    metrics = retrain(parse_config(_with("retrain", valid_tokens=tokens)), corpus, fp, precision, tmp_path / "rt",
                      progress=False)
    valid, test = corpus.valid.numel(), corpus.test.numel()
    if tokens is None:  # the epoch's pass is the final valid_ppl; the start's chooses (was 3 valid passes)
        assert calls == [valid, test, valid]
        assert metrics["start_valid_ppl"] == metrics["start_selection_valid_ppl"]
    else:  # the epoch and the projected start on the slice; the end on the whole splits
        assert calls == [SLICE, valid, test, SLICE]
        assert metrics["start_valid_ppl"] is None
    assert not metrics["kept_start"]
    model = _model_from(tmp_path / "rt" / "best.pt")
    assert metrics["valid_ppl"] == _ppl(model, corpus, corpus.valid)
    assert metrics["test_ppl"] == _ppl(model, corpus, corpus.test)
    full = len(epoch_batches(parse_config(EXP), corpus, 0, DistInfo(), recurrent=True))
    assert metrics["epochs_run"] == pytest.approx(10 / full)
    assert metrics["train_seconds"] > 0 and metrics["valid_seconds"] > 0


def test_the_ste_tail_is_chosen_on_the_slice(fp_run: tuple[Corpus, Path], tmp_path: Path) -> None:
    corpus, fp = fp_run
    precision = PrecisionMap.uniform(_model_from(fp), 2)
    exp = parse_config(_with("retrain", method="admm", rho=1.0, ste_finetune_steps=4, valid_tokens=SLICE))
    metrics = retrain(exp, corpus, fp, precision, tmp_path / "rt", progress=False)
    admm = json.loads((tmp_path / "rt" / "admm_metrics.json").read_text())
    tail = json.loads((tmp_path / "rt" / "ste_finetune" / "metrics.json").read_text())
    assert metrics["ste_finetune_kept"] == (tail["selection_valid_ppl"] < admm["selection_valid_ppl"])
    winner = tail if metrics["ste_finetune_kept"] else admm
    assert metrics["valid_ppl"] == winner["valid_ppl"]
    assert metrics["selection_valid_ppl"] == winner["selection_valid_ppl"]
    assert metrics["train_seconds"] == pytest.approx(admm["train_seconds"] + tail["train_seconds"])


def test_the_fp_row_reuses_a_train_runs_measurement(fp_run: tuple[Corpus, Path],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Any `mpnas train` best.pt (e.g. a pipeline's --checkpoint) is measured once, when the settings match."""
    corpus, fp = fp_run
    calls = _spy(monkeypatch, nas.pipeline.stages)
    measured = json.loads((fp.parent / "metrics.json").read_text())
    row = nas.pipeline.stages.fp_row(parse_config(EXP), corpus, fp, "m", device="cpu", trained_here=False)
    assert calls == [] and (row["valid_ppl"], row["test_ppl"]) == (measured["valid_ppl"], measured["test_ppl"])
    other = parse_config(_with("data", eval_batch_size=3))  # batched otherwise: other numbers, measured again
    row = nas.pipeline.stages.fp_row(other, corpus, fp, "m", device="cpu", trained_here=True)
    assert calls == [corpus.valid.numel(), corpus.test.numel()]
    assert row["valid_ppl"] != measured["valid_ppl"]


def test_seconds_are_recorded_and_summed_over_resumed_calls(tiny_corpus_dir: Path, tmp_path: Path) -> None:
    corpus = load_corpus(tiny_corpus_dir)
    exp = parse_config(EXP)
    first = train(exp, corpus, tmp_path / "run", progress=False, stop_after_steps=70)  # into epoch 2
    assert first.get("stopped_early")
    saved = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["seconds"]
    assert saved["train"] > 0 and saved["valid"] > 0
    metrics = train(exp, corpus, tmp_path / "run", progress=False, resume=True)
    assert metrics["train_seconds"] > saved["train"] and metrics["valid_seconds"] > saved["valid"]
    on_disk = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert on_disk["train_seconds"] == metrics["train_seconds"]


def test_epochs_run_counts_epochs_cut_short(tiny_corpus_dir: Path, tmp_path: Path) -> None:
    corpus = load_corpus(tiny_corpus_dir)
    exp = parse_config(_with("train", max_steps_per_epoch=5))
    full = len(epoch_batches(exp, corpus, 0, DistInfo(), recurrent=True))
    metrics = train(exp, corpus, tmp_path / "run", progress=False)
    assert (metrics["epochs"], metrics["steps"]) == (2, 10)
    assert metrics["epochs_run"] == pytest.approx(10 / full) and metrics["epochs_run"] < 1
    uncut = train(parse_config(_with("train", epochs=1)), corpus, tmp_path / "uncut", progress=False)
    assert uncut["epochs_run"] == 1.0 and uncut["steps"] == full


def test_resume_with_a_slice_is_exact_and_keeps_its_slice(tiny_corpus_dir: Path, tmp_path: Path) -> None:
    corpus = load_corpus(tiny_corpus_dir)
    exp = parse_config(_with("train", valid_tokens=SLICE))
    straight = train(exp, corpus, tmp_path / "straight", progress=False)
    train(exp, corpus, tmp_path / "resumed", progress=False, stop_after_steps=7)
    with pytest.raises(ValueError, match=r"validated on 60 valid tokens per epoch.*valid_tokens = 80"):
        train(parse_config(_with("train", valid_tokens=80)), corpus, tmp_path / "resumed", progress=False,
              resume=True)
    resumed = train(exp, corpus, tmp_path / "resumed", progress=False, resume=True)
    a = load_checkpoint(tmp_path / "straight" / "best.pt")["model"]
    b = load_checkpoint(tmp_path / "resumed" / "best.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["valid_ppl"] for h in straight["history"]] == [h["valid_ppl"] for h in resumed["history"]]
    assert (straight["valid_ppl"], straight["test_ppl"]) == (resumed["valid_ppl"], resumed["test_ppl"])


def test_stage_hashes_leave_out_the_default_valid_tokens() -> None:
    """Run folders from before the key keep their hashes: their FP and retrain stages are not redone."""
    import dataclasses

    from nas.pipeline.state import section_inputs

    section = TrainSection()
    before = {k: v for k, v in dataclasses.asdict(section).items() if k != "valid_tokens"}
    assert section_inputs(section) == before
    assert section_inputs(dataclasses.replace(section, valid_tokens=100))["valid_tokens"] == 100
