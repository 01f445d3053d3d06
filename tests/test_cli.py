"""The ``mpnas`` command line: train, evaluate, and clear errors with exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nas.cli import main

TINY = {"model": {"type": "lstm", "embed_dim": 8, "hidden_dim": 8, "num_layers": 1},
        "data": {"batch_size": 4, "bptt": 8},
        "train": {"epochs": 1, "max_steps_per_epoch": 5}}


def test_train_then_evaluate(tiny_corpus_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "run"
    assert main(["train", str(config), "--data", str(tiny_corpus_dir), "--out", str(out), "--no-progress"]) == 0
    assert "test ppl" in capsys.readouterr().out
    assert main(["evaluate", str(out / "best.pt"), "--data", str(tiny_corpus_dir), "--json"]) == 0
    printed = capsys.readouterr().out
    assert "valid: ppl" in printed and "test: ppl" in printed


def test_bad_config_exits_2_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("model: {type: lstm, layers: 2}\n")
    assert main(["train", str(config)]) == 2
    err = capsys.readouterr().err
    assert str(config) in err and "model.layers" in err


def test_missing_data_folder_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "quick", "--data", str(tmp_path / "absent")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_evaluate_rejects_a_corrupt_checkpoint(tiny_corpus_dir: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "best.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["evaluate", str(bad), "--data", str(tiny_corpus_dir)]) == 2
    assert "not a readable mpnas checkpoint" in capsys.readouterr().err


SEARCH_EXP = {**TINY, "space": {"bits": [1, 2, 4, 8]}, "budget": {"avg_bits": 3.0}}


def test_space_and_search_commands(tiny_corpus_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "search.yaml"
    config.write_text(yaml.safe_dump(SEARCH_EXP))
    assert main(["space", str(config), "--data", str(tiny_corpus_dir)]) == 0
    printed = capsys.readouterr().out
    assert "layers.0.forget_gate.hh" in printed and "1 2 4 8" in printed and "avg_bits 3" in printed
    out = tmp_path / "run"
    assert main(["train", str(config), "--data", str(tiny_corpus_dir), "--out", str(out), "--no-progress"]) == 0
    map_path = tmp_path / "maps" / "kl.yaml"
    assert main(["search", str(config), "--checkpoint", str(out / "best.pt"), "--strategy", "kl", "--budget", "2",
                 "--out", str(map_path), "--data", str(tiny_corpus_dir)]) == 0
    assert "kl: average bits" in capsys.readouterr().out
    saved = yaml.safe_load(map_path.read_text())
    assert saved["meta"]["strategy"] == "kl" and saved["meta"]["budget"] == {"avg_bits": 2.0}
    assert (tmp_path / "maps" / "score_cache").is_dir()


def test_space_errors_name_file_and_key(tiny_corpus_dir: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad_space.yaml"
    config.write_text(yaml.safe_dump({**TINY, "space": {"overrides": [{"match": "layrs.*", "bits": [2]}]}}))
    assert main(["space", str(config), "--data", str(tiny_corpus_dir)]) == 2
    err = capsys.readouterr().err
    assert str(config) in err and "space.overrides[0].match" in err
    assert main(["space", str(config), "--data", str(tiny_corpus_dir), "--budget", "huge=3"]) == 2
    assert "unknown kind 'huge'" in capsys.readouterr().err
