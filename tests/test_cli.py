"""The ``mpnas`` command line: train, evaluate, and clear errors with exit code 2."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from nas.cli.main import main

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


def test_evaluate_says_when_the_precision_map_is_missing(tiny_corpus_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A checkpoint without precision.yaml beside it is sized as FP32, and the output says so."""
    import json

    from nas.core.checkpoint import load_checkpoint
    from search_spaces.models import build_model
    from search_spaces.precision import PrecisionMap

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "run"
    assert main(["train", str(config), "--data", str(tiny_corpus_dir), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out / "best.pt"), "--data", str(tiny_corpus_dir), "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    note = next(line for line in lines if line.startswith("note:"))
    assert str(out / "precision.yaml") in note and "FP32 (unquantized)" in note
    assert any(line.startswith("size (FP32, unquantized: no precision map): ") for line in lines)
    assert json.loads(lines[-1])["precision"] is None
    assert json.loads(lines[-1])["size"]["avg_bits"] == 32.0
    # with the map beside it: its sizes, no note
    ckpt_config = dict(load_checkpoint(out / "best.pt")["config"])
    PrecisionMap.uniform(build_model(ckpt_config.pop("type"), **ckpt_config), 4).save(out / "precision.yaml")
    assert main(["evaluate", str(out / "best.pt"), "--data", str(tiny_corpus_dir), "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert not any(line.startswith("note:") for line in lines)
    assert any(line.startswith("size: ") and "average bits 4.00" in line for line in lines)
    assert json.loads(lines[-1])["precision"] == str(out / "precision.yaml")


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


# User errors exit 2 with one line; anything else is a bug and keeps its traceback -----------------

def _user_error_types() -> list[type[Exception]]:
    from evaluators.nbest import NBestError
    from evaluators.report import ReportError
    from nas.config.sections import ConfigError
    from nas.core.data import DataError
    from nas.core.errors import CheckpointError, MpnasError, UsageError
    from nas.pipeline.state import PipelineError
    from nas.retrain.hooks import TrainingDivergedError
    from nas.retrain.prototype_store import PrototypeError
    from search_spaces.packed_format import PackedFileError
    from search_spaces.precision import PrecisionMapError
    from search_spaces.space_parsing import SpaceError

    return [MpnasError, UsageError, CheckpointError, DataError, ConfigError, SpaceError, PackedFileError,
            PrecisionMapError, PrototypeError, PipelineError, NBestError, ReportError, TrainingDivergedError,
            FileNotFoundError]


def _raising(exc: Exception):  # noqa: ANN202 - a stand-in for a command function
    def command(_args: object) -> int:
        raise exc

    return command


@pytest.mark.parametrize("kind", _user_error_types(), ids=lambda kind: kind.__name__)
def test_user_errors_exit_2_with_one_line(kind: type[Exception], monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    import nas.cli.main

    exc = kind("x", "y", "what went wrong") if kind.__name__ == "NBestError" else kind("what went wrong")
    monkeypatch.setattr(nas.cli.main, "cmd_export", _raising(exc))
    assert main(["export", "ckpt.pt", "--out", "x.mpq"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mpnas: error: ") and "what went wrong" in err and "Traceback" not in err


@pytest.mark.parametrize("exc", [ValueError("internal invariant broken"), KeyError("internal"),
                                 RuntimeError("internal"), TypeError("internal")], ids=lambda e: type(e).__name__)
def test_internal_errors_keep_their_traceback(exc: Exception, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain ValueError (or any other exception) is a bug in mpnas: it is not turned into exit 2."""
    import nas.cli.main

    monkeypatch.setattr(nas.cli.main, "cmd_export", _raising(exc))
    with pytest.raises(type(exc)):
        main(["export", "ckpt.pt", "--out", "x.mpq"])


def test_nbest_entry_point_reports_user_errors_only(monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    import nas.cli.nbest
    from nas.core.errors import UsageError

    monkeypatch.setattr(nas.cli.nbest, "run_nbest", lambda *_a: (_ for _ in ()).throw(UsageError("bad option")))
    assert nas.cli.nbest.main(["model.pt", "--nbest", "lists.json"]) == 2
    assert "mpnas: error: bad option" in capsys.readouterr().err
    monkeypatch.setattr(nas.cli.nbest, "run_nbest", lambda *_a: (_ for _ in ()).throw(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        nas.cli.nbest.main(["model.pt", "--nbest", "lists.json"])


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "{model}", "--threads", "0"], "--threads 0: expected a positive integer"),
    (["retrain", "quick", "--precision", "uniform:x", "--checkpoint", "{model}"], "expected uniform:BITS"),
    (["retrain", "quick", "--precision", "uniform:7", "--checkpoint", "{model}"], "bits=7 is not supported"),
    (["search", "quick", "--checkpoint", "{model}", "--budget", "size_mb=big", "--out", "m.yaml"],
     "is not a number"),
    (["search", "quick", "--checkpoint", "{model}", "--out", "m.yaml"], "a search needs a budget"),
])
def test_user_errors_of_real_commands_exit_2(argv: list[str], message: str, tiny_corpus_dir: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "run"
    assert main(["train", str(config), "--data", str(tiny_corpus_dir), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    args = [a.replace("{model}", str(out / "best.pt")).replace("quick", str(config)) for a in argv]
    assert main([*args, "--data", str(tiny_corpus_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mpnas: error: ") and message in err


def test_train_shows_the_epoch_line(tiny_corpus_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Training logs its per-epoch line (nas.retrain.loop's logger); `mpnas train` shows it on stdout."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    assert main(["train", str(config), "--data", str(tiny_corpus_dir), "--out", str(tmp_path / "run"),
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "epoch 1: train ppl " in out and " valid ppl " in out


def test_search_and_retrain_reject_bad_settings_before_running(tiny_corpus_dir: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Out-of-range settings that used to run (kl on all but 5 valid tokens) or fail mid-run exit 2 (issue 14)."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "run"
    assert main(["train", str(config), "--data", str(tiny_corpus_dir), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    cases = [({"search": {"kl_tokens": -5}}, ["search", "--strategy", "kl", "--budget", "2", "--out", "{map}"],
              "'search.kl_tokens' = -5 must be >= 1"),
             ({"search": {"hessian_max_iters": 3}}, ["search", "--strategy", "hessian", "--budget", "2", "--out",
                                                     "{map}"], "'search.hessian_max_iters' = 3 must be >= 30"),
             ({"search": {"arch_fraction": 2}}, ["search", "--strategy", "gumbel", "--budget", "2", "--out", "{map}"],
              "'search.arch_fraction' = 2.0 must be in (0, 1)"),
             ({"retrain": {"epochs": 0}}, ["retrain", "--precision", "uniform:4"], "'retrain.epochs' = 0 must be >= 1"),
             ({"retrain": {"clip": -1}}, ["retrain", "--precision", "uniform:4"], "'retrain.clip' = -1.0 must be >= 0")]
    for section, argv, message in cases:
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({**SEARCH_EXP, **section}))
        command, *options = [a.replace("{map}", str(tmp_path / "m.yaml")) for a in argv]
        assert main([command, str(bad), "--checkpoint", str(out / "best.pt"), *options, "--data", str(tiny_corpus_dir),
                     "--out" if command == "retrain" else "--cache", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"mpnas: error: {bad}: ") and message in err, err
    assert not (tmp_path / "m.yaml").exists() and not (tmp_path / "x").exists()
