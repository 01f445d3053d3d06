"""Corpus reading, vocabulary, batching and the data-location rules."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nas.core import data as data_mod
from nas.core.batches import iter_stream_chunks, num_stream_chunks, stream_batches, window_batches
from nas.core.data import EOS, DataError, Vocabulary, load_corpus, read_sentences, resolve_data_dir


def test_real_ptb_counts(ptb_dir: Path) -> None:
    corpus = load_corpus(ptb_dir)
    assert len(corpus.vocab) == 10_000
    assert (corpus.train.numel(), corpus.valid.numel(), corpus.test.numel()) == (929_589, 73_760, 82_430)
    eos = corpus.vocab.eos_id
    # one <eos> per line: 42,068 / 3,370 / 3,761 sentences
    assert [int((s == eos).sum()) for s in (corpus.train, corpus.valid, corpus.test)] == [42_068, 3_370, 3_761]
    assert corpus.vocab.unk_id is not None


def test_ptb_prefixed_names_are_accepted(tmp_path: Path, tiny_corpus_dir: Path) -> None:
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for split in ("train", "valid", "test"):
        (renamed / f"ptb.{split}.txt").write_bytes((tiny_corpus_dir / f"{split}.txt").read_bytes())
    a, b = load_corpus(tiny_corpus_dir), load_corpus(renamed)
    assert a.vocab == b.vocab and torch.equal(a.train, b.train)


def test_eos_appended_and_vocab_from_train(tmp_path: Path) -> None:
    path = tmp_path / "x.txt"
    path.write_text(" a b \n\n c a \n")
    assert read_sentences(path) == [["a", "b", EOS], [EOS], ["c", "a", EOS]]  # blank line: one <eos>
    vocab = Vocabulary.from_sentences(read_sentences(path))
    assert vocab.words == ("a", "b", EOS, "c")
    assert vocab.encode([["c", "a", EOS]]).tolist() == [3, 0, 2]


def test_missing_split_names_folder_and_split(tiny_corpus_dir: Path) -> None:
    (tiny_corpus_dir / "valid.txt").unlink()
    with pytest.raises(DataError, match=r"missing split 'valid'"):
        load_corpus(tiny_corpus_dir)


def test_empty_file_is_an_error(tiny_corpus_dir: Path) -> None:
    (tiny_corpus_dir / "test.txt").write_text("\n  \n")
    with pytest.raises(DataError, match=r"test\.txt: file is empty"):
        load_corpus(tiny_corpus_dir)


def test_undecodable_bytes_name_the_line(tiny_corpus_dir: Path) -> None:
    path = tiny_corpus_dir / "train.txt"
    path.write_bytes(b" ok line \n another \n bad \xff\xfe byte \n")
    with pytest.raises(DataError, match=r"train\.txt:3: undecodable bytes"):
        load_corpus(tiny_corpus_dir)


def test_oov_without_unk_names_file_line_and_word(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "train.txt").write_text(" a b \n b c \n")
    (folder / "valid.txt").write_text(" a b \n")
    (folder / "test.txt").write_text(" a \n c zebra \n")
    with pytest.raises(DataError, match=r"test\.txt:2: word 'zebra' is not in the training vocabulary"):
        load_corpus(folder)


def test_oov_maps_to_unk_when_vocab_has_it(tmp_path: Path) -> None:
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "train.txt").write_text(" a <unk> \n")
    (folder / "valid.txt").write_text(" zebra a \n")
    (folder / "test.txt").write_text(" a \n")
    corpus = load_corpus(folder)
    assert corpus.valid.tolist() == [corpus.vocab.unk_id, corpus.vocab.index["a"], corpus.vocab.eos_id]


def test_resolve_order_argument_then_env(tmp_path: Path, tiny_corpus_dir: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MPNAS_DATA", str(tiny_corpus_dir))
    assert resolve_data_dir() == tiny_corpus_dir
    assert resolve_data_dir(tmp_path) == tmp_path
    with pytest.raises(DataError, match="does not exist"):
        resolve_data_dir(tmp_path / "nope")


def test_failed_download_says_how_to_point_at_a_local_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MPNAS_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def offline(*_args: object, **_kwargs: object) -> None:
        raise OSError("network unreachable")

    monkeypatch.setattr(data_mod.urllib.request, "urlretrieve", offline)
    with pytest.raises(DataError, match=r"could not download PTB.*network unreachable.*--data DIR.*MPNAS_DATA"):
        resolve_data_dir()


def test_download_verifies_sha256(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import tarfile

    def fake_archive(_url: str, dest: Path) -> None:
        with tarfile.open(dest, "w:gz") as tar:
            for split in ("train", "valid", "test"):
                payload = b" tampered text \n"
                info = tarfile.TarInfo(f"./simple-examples/data/ptb.{split}.txt")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))

    monkeypatch.setattr(data_mod.urllib.request, "urlretrieve", fake_archive)
    with pytest.raises(DataError, match=r"ptb\.train\.txt has sha256 [0-9a-f]{64}, expected fcea919f"):
        data_mod.download_ptb(tmp_path / "ptb")
    assert not (tmp_path / "ptb" / "train.txt").exists()


def test_stream_batches_are_contiguous_rows() -> None:
    stream = torch.arange(103)
    rows = stream_batches(stream, batch_size=4, bptt=5)
    assert rows.shape == (4, 25)
    assert rows[1, 0] == 25 and rows[1, -1] == 49  # row b continues where its last chunk stopped
    chunks = list(iter_stream_chunks(rows, bptt=5))
    assert len(chunks) == num_stream_chunks(rows, 5) == 5
    _, x, y = chunks[-1]
    assert x.shape == (4, 4) and torch.equal(y, x + 1)  # last chunk is short: targets stay inside the row
    _, x0, _ = chunks[0]
    _, x1, _ = chunks[1]
    assert torch.equal(x1[:, 0], x0[:, -1] + 1)


def test_window_batches_cover_the_stream_once_and_are_seeded() -> None:
    stream = torch.arange(1000)
    batches = window_batches(stream, context=16, batch_size=8, generator=torch.Generator().manual_seed(3))
    inputs = torch.cat([x for x, _ in batches])
    targets = torch.cat([y for _, y in batches])
    assert inputs.shape[1] == 16 and torch.equal(targets, inputs + 1)
    assert inputs.unique().numel() == inputs.numel()  # windows do not overlap
    again = window_batches(stream, context=16, batch_size=8, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))
