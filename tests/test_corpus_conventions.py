"""Corpus line conventions and honest counts: blank lines, physical line numbers, BOM, CR,
``<unk>`` accounting, the per-split summary and the vocabulary-mismatch message.

The new API is reached through the module (``data.CorpusOptions``) so that every test
fails on its own when run against the code before these conventions existed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
import yaml

from nas.cli.main import main
from nas.core import data
from nas.core.corpus_report import corpus_summary, describe_vocab_mismatch, format_corpus_summary
from nas.core.data import EOS, UNK, DataError, load_corpus, read_sentences

TINY = {"model": {"type": "lstm", "embed_dim": 8, "hidden_dim": 8, "num_layers": 1},
        "data": {"batch_size": 4, "bptt": 8},
        "train": {"epochs": 1, "max_steps_per_epoch": 5},
        "space": {"bits": [1, 2, 4, 8]}, "budget": {"avg_bits": 3.0}}

# sha256 of "\n".join(vocabulary) for PTB as read before these conventions existed:
# they must not change PTB's token ids (it has no blank lines, BOM or CR).
PTB_VOCAB_SHA256 = "6f75f9b77981aa692ec71340f6152e1d94d98bc927ade6da20da7da68e3e55d1"


def _corpus(folder: Path, train: str | bytes, valid: str | bytes, test: str | bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (("train", train), ("valid", valid), ("test", test)):
        payload = text.encode("utf-8") if isinstance(text, str) else text
        (folder / f"{name}.txt").write_bytes(payload)
    return folder


WIKI_TRAIN = " \n = Héading = \n \n a b c \n d a \n \n"  # 6 lines, 3 blank: WikiText's layout


# 1. blank lines -------------------------------------------------------------------------

def test_blank_lines_get_one_eos_each_by_default(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_text(WIKI_TRAIN)
    assert read_sentences(path) == [[EOS], ["=", "Héading", "=", EOS], [EOS], ["a", "b", "c", EOS],
                                    ["d", "a", EOS], [EOS]]
    corpus = load_corpus(_corpus(tmp_path / "c", WIKI_TRAIN, " a \n\n", " d \n"))
    # one <eos> per line, blank lines included: 8 words + 6 lines
    assert corpus.train.numel() == 14
    assert int((corpus.train == corpus.vocab.eos_id).sum()) == 6
    assert corpus.valid.numel() == 3
    assert corpus.vocab.words[0] == EOS  # the first line is blank: <eos> is the first type seen


def test_blank_lines_skip_option_keeps_the_old_counts(tmp_path: Path) -> None:
    folder = _corpus(tmp_path / "c", WIKI_TRAIN, " a \n\n", " d \n")
    skip = data.CorpusOptions(blank_lines="skip")
    assert read_sentences(folder / "train.txt", skip) == [["=", "Héading", "=", EOS], ["a", "b", "c", EOS],
                                                          ["d", "a", EOS]]
    corpus = load_corpus(folder, skip)
    assert corpus.train.numel() == 11 and corpus.valid.numel() == 2
    assert corpus.vocab.words[:4] == ("=", "Héading", EOS, "a")
    assert data.CorpusOptions().blank_lines == "eos"
    with pytest.raises(ValueError, match="blank_lines='drop'"):
        data.CorpusOptions(blank_lines="drop")  # type: ignore[arg-type]


# 2. physical line numbers ---------------------------------------------------------------

@pytest.mark.parametrize("mode", ["eos", "skip"])
def test_oov_error_names_the_physical_line(tmp_path: Path, mode: str) -> None:
    folder = _corpus(tmp_path / "c", " a b \n c \n", " a \n\n b \n  \n\n c zebra \n", " a \n")
    with pytest.raises(DataError, match=r"valid\.txt:6: word 'zebra' is not in the training vocabulary"):
        load_corpus(folder, data.CorpusOptions(blank_lines=mode))  # type: ignore[arg-type]


def test_only_newline_ends_a_line(tmp_path: Path) -> None:
    # str.splitlines() also breaks on U+2028, \x85, \x0c, ...: those would add <eos> tokens
    # and shift every later line number
    folder = _corpus(tmp_path / "c", " a\u2028b \n c\x0cd \n e\x85f \n", " a \n", " a \n")
    corpus = load_corpus(folder)
    assert corpus.train.numel() == 9
    bad = _corpus(tmp_path / "e", " a b \n", " a \n", " a\u2028b \n\u2029\n zebra \n")
    with pytest.raises(DataError, match=r"test\.txt:3: word 'zebra'"):
        load_corpus(bad)


# 4. BOM and carriage returns ------------------------------------------------------------

def test_utf8_bom_is_stripped(tmp_path: Path) -> None:
    plain = load_corpus(_corpus(tmp_path / "plain", " a b \n b c \n", " a \n", " c \n"))
    bom = load_corpus(_corpus(tmp_path / "bom", "\ufeff a b \n b c \n", "\ufeffa \n", "\ufeff c \n"))
    assert bom.vocab == plain.vocab
    assert bom.vocab.words[0] == "a"
    assert all(torch.equal(bom.split(s), plain.split(s)) for s in data.SPLITS)


def test_crlf_line_endings_are_line_endings(tmp_path: Path) -> None:
    lf = load_corpus(_corpus(tmp_path / "lf", " a b \n\n c \n", " a \n", " c \n"))
    crlf = load_corpus(_corpus(tmp_path / "crlf", " a b \r\n\r\n c \r\n", " a \r\n", " c"))
    assert crlf.vocab == lf.vocab
    assert crlf.train.tolist() == lf.train.tolist() == [0, 1, 2, 2, 3, 2]


def test_lone_carriage_return_is_refused_naming_file_line_column(tmp_path: Path) -> None:
    folder = _corpus(tmp_path / "c", " a b \n\n c\rd \n", " a \n", " c \n")
    with pytest.raises(DataError, match=r"train\.txt:3: carriage return \(\\r\) at column 3 .*"
                                        r"expected lines ending in \\n or \\r\\n"):
        load_corpus(folder)
    old_mac = _corpus(tmp_path / "mac", " a \r b \r", " a \n", " a \n")
    with pytest.raises(DataError, match=r"train\.txt:1: carriage return"):
        load_corpus(old_mac)


def test_file_of_blank_lines_is_still_empty(tmp_path: Path) -> None:
    folder = _corpus(tmp_path / "c", " a \n", " a \n", "\ufeff\r\n  \n\n")
    with pytest.raises(DataError, match=r"test\.txt: file is empty"):
        load_corpus(folder)


# 3. summary and <unk> warning -----------------------------------------------------------

def _unk_corpus(tmp_path: Path) -> Path:
    return _corpus(tmp_path / "c", " a <unk> b \n\n", " a zebra \n zebra <unk> yak \n", f" a {UNK} \n")


def test_summary_counts_tokens_types_and_words_mapped_to_unk(tmp_path: Path) -> None:
    corpus = load_corpus(_unk_corpus(tmp_path))
    summary = corpus_summary(corpus)
    assert summary == corpus_summary(corpus)
    json.dumps(summary)  # plain data, ready for metrics.json
    assert summary["vocab_size"] == 4 and summary["has_unk"] and summary["blank_lines"] == "eos"
    train, valid, test = (summary["splits"][s] for s in data.SPLITS)
    assert (train["tokens"], train["lines"], train["blank_lines"], train["types"]) == (5, 2, 1, 4)
    assert (train["unk"], train["oov_tokens"], train["oov_words"]) == (1, 0, {})
    assert (valid["tokens"], valid["types"], valid["unk"]) == (7, 5, 4)  # a zebra <eos> <unk> yak
    assert valid["unk_rate"] == pytest.approx(4 / 7)
    assert (valid["oov_tokens"], valid["oov_types"]) == (3, 2)
    assert list(valid["oov_words"].items()) == [("zebra", 2), ("yak", 1)]
    assert (test["unk"], test["oov_tokens"]) == (1, 0)
    assert list(corpus_summary(corpus, max_words=1)["splits"]["valid"]["oov_words"]) == ["zebra"]
    text = format_corpus_summary(summary)
    assert "valid: 7 tokens" in text and "'zebra' x2" in text and "57.14%" in text


def test_warning_for_words_mapped_to_unk_but_not_for_literal_unk(tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="nas.core.data"):
        load_corpus(_unk_corpus(tmp_path))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "valid.txt: 3 tokens (2 word types, 42.86% of 7 tokens)" in warnings[0] and "'zebra' x2" in warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nas.core.data"):
        load_corpus(_corpus(tmp_path / "lit", " a <unk> \n", " <unk> a \n", " a \n"))
    assert not caplog.records


# vocabulary mismatch message ------------------------------------------------------------

def test_describe_vocab_mismatch_names_ids_words_and_sizes() -> None:
    text = describe_vocab_mismatch(("\ufeffa", "b", EOS), ("a", "b", EOS, "c"))
    assert "checkpoint has 3 words, corpus has 4" in text
    assert "#0: checkpoint '\\ufeffa' vs corpus 'a'" in text
    assert "only in corpus: 'a', 'c'" in text and "byte-order mark" in text
    reordered = describe_vocab_mismatch(("a", EOS, "b"), ("a", "b", EOS))
    assert "#1: checkpoint '<eos>' vs corpus 'b'" in reordered and "different order" in reordered
    longer = describe_vocab_mismatch(("a", "b"), ("a", "b", "c"), expected_name="model")
    assert "the first 2 agree; corpus goes on with 'c'" in longer and "model has 2 words" in longer


def test_evaluate_says_how_the_vocabulary_differs(tiny_corpus_dir: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import nas.cli.main

    words = load_corpus(tiny_corpus_dir).vocab.words
    stale = ("\ufeff" + words[0], *words[1:])
    monkeypatch.setattr(nas.cli.main, "load_any_model", lambda _path, **_kw: (torch.nn.Linear(1, 1), {}, stale))
    model = tmp_path / "best.pt"
    model.write_bytes(b"x")
    assert main(["evaluate", str(model), "--data", str(tiny_corpus_dir)]) == 2
    err = capsys.readouterr().err
    assert "its vocabulary differs" in err and f"#0: checkpoint '\\ufeff{words[0]}' vs corpus '{words[0]}'" in err


# CLI summary ----------------------------------------------------------------------------

def test_space_prints_the_corpus_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _unk_corpus(tmp_path)
    config = tmp_path / "space.yaml"
    config.write_text(yaml.safe_dump(TINY))
    assert main(["space", str(config), "--data", str(folder)]) == 0
    printed = capsys.readouterr().out
    assert "train: 5 tokens, 2 lines (1 blank), 4 types" in printed
    assert "valid: 7 tokens" in printed and "'zebra' x2" in printed


def test_train_prints_the_corpus_summary(tiny_corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    import nas.retrain.loop

    monkeypatch.setattr(nas.retrain.loop, "train", lambda *_a, **_k: {"valid_ppl": 1.0, "test_ppl": 1.0})
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    assert main(["train", str(config), "--data", str(tiny_corpus_dir), "--out", str(tmp_path / "run")]) == 0
    printed = capsys.readouterr().out
    tokens = load_corpus(tiny_corpus_dir).train.numel()
    assert f"train: {tokens:,} tokens, 400 lines (0 blank)" in printed


# PTB: counts and vocabulary order unchanged --------------------------------------------

def test_ptb_counts_and_vocabulary_order_are_unchanged(ptb_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="nas.core.data"):
        corpus = load_corpus(ptb_dir)
    assert not caplog.records  # PTB's own <unk> tokens are in the vocabulary
    assert hashlib.sha256("\n".join(corpus.vocab.words).encode()).hexdigest() == PTB_VOCAB_SHA256
    splits = corpus_summary(corpus)["splits"]
    assert [splits[s]["tokens"] for s in data.SPLITS] == [929_589, 73_760, 82_430]
    assert [splits[s]["lines"] for s in data.SPLITS] == [42_068, 3_370, 3_761]
    assert [splits[s]["blank_lines"] for s in data.SPLITS] == [0, 0, 0]
    assert [splits[s]["oov_tokens"] for s in data.SPLITS] == [0, 0, 0]
    assert splits["train"]["types"] == len(corpus.vocab) == 10_000
    assert [splits[s]["unk"] for s in data.SPLITS] == [45_020, 3_485, 4_794]
    skip = load_corpus(ptb_dir, data.CorpusOptions(blank_lines="skip"))
    assert skip.vocab == corpus.vocab and torch.equal(skip.train, corpus.train)


def test_blank_lines_is_an_experiment_key_used_by_the_commands(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """`data.blank_lines: skip` in the YAML reaches the corpus `mpnas train` reads; a bad value names the key."""
    from nas.config.sections import ConfigError, parse_config

    folder = _corpus(tmp_path / "c", WIKI_TRAIN, " a \n\n", " d \n")
    exp = {"model": {"type": "lstm", "embed_dim": 4, "hidden_dim": 4, "num_layers": 1},
           "data": {"batch_size": 2, "bptt": 2, "eval_batch_size": 1, "blank_lines": "skip"},
           "train": {"optimizer": "adam", "lr": 0.01, "schedule": "constant", "epochs": 1, "max_steps_per_epoch": 1}}
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(exp))
    assert main(["train", str(config), "--data", str(folder), "--out", str(tmp_path / "run"), "--no-progress",
                 "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "blank lines: skip" in printed and "train: 11 tokens, 6 lines (3 blank)" in printed
    assert parse_config(exp).data.corpus_options() == data.CorpusOptions(blank_lines="skip")
    with pytest.raises(ConfigError, match=r"'data\.blank_lines' = 'drop' must be one of \('eos', 'skip'\)"):
        parse_config({**exp, "data": {**exp["data"], "blank_lines": "drop"}}, "exp.yaml")
