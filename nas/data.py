"""Word-level corpora in PTB format: locating, reading, vocabulary and batching.

A corpus is a folder holding ``train.txt``, ``valid.txt`` and ``test.txt`` (the
``ptb.train.txt`` naming is accepted too), one sentence per line. Every line gets an
``<eos>`` appended, and the vocabulary is built from the training split only.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

EOS = "<eos>"
UNK = "<unk>"
SPLITS = ("train", "valid", "test")
DATA_ENV = "MPNAS_DATA"

# Mikolov's simple-examples archive is the usual public home of PTB; these are the
# sha256 digests of its three files (identical to the copies in ../shared/data/ptb).
PTB_URL = "https://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"
PTB_SHA256 = {
    "train": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
    "valid": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
    "test": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
}


class DataError(ValueError):
    """A corpus file is missing or malformed; the message names file and line."""


def split_path(folder: Path, split: str) -> Path | None:
    """Return the file holding ``split`` in ``folder`` (``train.txt`` or ``ptb.train.txt``)."""
    for name in (f"{split}.txt", f"ptb.{split}.txt"):
        candidate = folder / name
        if candidate.is_file():
            return candidate
    return None


def default_cache_dir() -> Path:
    """Folder where a downloaded PTB is kept (``$XDG_CACHE_HOME/mpnas/ptb``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mpnas" / "ptb"


def resolve_data_dir(data: str | os.PathLike | None = None, *, download: bool = True) -> Path:
    """Find the corpus folder: ``data`` argument, else ``$MPNAS_DATA``, else the PTB cache.

    The cache is filled by downloading PTB and checking sha256; if that fails the error
    says how to point mpnas at a local copy.
    """
    if data is None:
        data = os.environ.get(DATA_ENV) or None
    if data is not None:
        folder = Path(data).expanduser()
        if not folder.is_dir():
            raise DataError(f"data folder {folder} does not exist (expected a folder with "
                            "train.txt, valid.txt and test.txt)")
        return folder
    cache = default_cache_dir()
    if all(split_path(cache, s) is not None for s in SPLITS):
        return cache
    if not download:
        raise DataError(f"no corpus given and no PTB in {cache}; pass --data DIR or set {DATA_ENV}")
    try:
        download_ptb(cache)
    except Exception as exc:  # any network or archive failure gets the same advice
        raise DataError(
            f"could not download PTB from {PTB_URL} into {cache}: {exc}. "
            f"Point mpnas at a local copy with --data DIR or the {DATA_ENV} environment "
            "variable (a folder with train.txt, valid.txt, test.txt, e.g. ../shared/data/ptb)."
        ) from exc
    return cache


def download_ptb(target: Path, url: str = PTB_URL) -> None:
    """Download Mikolov's archive, verify each split's sha256, and place it in ``target``."""
    import tarfile

    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target) as tmp:
        archive = Path(tmp) / "simple-examples.tgz"
        urllib.request.urlretrieve(url, archive)  # noqa: S310 - fixed https URL
        with tarfile.open(archive) as tar:
            for split in SPLITS:
                member = tar.extractfile(f"./simple-examples/data/ptb.{split}.txt")
                if member is None:
                    raise DataError(f"{url}: archive has no ptb.{split}.txt")
                payload = member.read()
                digest = hashlib.sha256(payload).hexdigest()
                if digest != PTB_SHA256[split]:
                    raise DataError(f"{url}: ptb.{split}.txt has sha256 {digest}, "
                                    f"expected {PTB_SHA256[split]}")
                part = Path(tmp) / f"{split}.txt"
                part.write_bytes(payload)
                os.replace(part, target / f"{split}.txt")


def read_sentences(path: Path) -> list[list[str]]:
    """Read one sentence per line as word lists; ``<eos>`` is appended to each line."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: undecodable bytes {raw[exc.start:exc.end]!r} "
                        "(expected UTF-8 text)") from exc
    sentences = [line.split() + [EOS] for line in text.splitlines() if line.strip()]
    if not sentences:
        raise DataError(f"{path}: file is empty (expected one sentence per line)")
    return sentences


@dataclass(frozen=True)
class Vocabulary:
    """Word <-> id map; ids follow first appearance in the training split."""

    words: tuple[str, ...]

    @classmethod
    def from_sentences(cls, sentences: list[list[str]]) -> Vocabulary:
        """Build from training sentences; ``<eos>`` always exists."""
        seen: dict[str, None] = {}
        for sentence in sentences:
            for word in sentence:
                seen.setdefault(word, None)
        seen.setdefault(EOS, None)
        return cls(tuple(seen))

    def __len__(self) -> int:
        return len(self.words)

    @property
    def index(self) -> dict[str, int]:
        """Word to id (built on demand; the vocabulary is immutable)."""
        return {w: i for i, w in enumerate(self.words)}

    @property
    def eos_id(self) -> int:
        return self.words.index(EOS)

    @property
    def unk_id(self) -> int | None:
        return self.words.index(UNK) if UNK in self.words else None

    def encode(self, sentences: list[list[str]], source: str = "<memory>") -> torch.Tensor:
        """Map sentences to one id stream; unknown words become ``<unk>`` or an error."""
        index = self.index
        unk = self.unk_id
        ids: list[int] = []
        for lineno, sentence in enumerate(sentences, start=1):
            for word in sentence:
                i = index.get(word)
                if i is None:
                    if unk is None:
                        raise DataError(f"{source}:{lineno}: word {word!r} is not in the training "
                                        f"vocabulary and the vocabulary has no {UNK}")
                    i = unk
                ids.append(i)
        return torch.tensor(ids, dtype=torch.long)


@dataclass(frozen=True)
class Corpus:
    """The three splits as id streams plus the vocabulary."""

    vocab: Vocabulary
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    folder: Path

    def split(self, name: str) -> torch.Tensor:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)


def load_corpus(folder: str | os.PathLike) -> Corpus:
    """Read a PTB-format corpus folder; errors name the file and line."""
    folder = Path(folder)
    paths = {}
    for split in SPLITS:
        path = split_path(folder, split)
        if path is None:
            raise DataError(f"{folder}: missing split {split!r} (expected {split}.txt or "
                            f"ptb.{split}.txt)")
        paths[split] = path
    sentences = {split: read_sentences(path) for split, path in paths.items()}
    vocab = Vocabulary.from_sentences(sentences["train"])
    streams = {split: vocab.encode(sentences[split], str(paths[split])) for split in SPLITS}
    return Corpus(vocab=vocab, folder=folder, **streams)


def stream_batches(stream: torch.Tensor, batch_size: int, bptt: int) -> torch.Tensor:
    """Lay a token stream out as ``batch_size`` contiguous rows (``[batch, length]``).

    Row ``b`` continues in the next chunk, so an LSTM carries its state across chunks.
    Tokens that do not fill a whole column are dropped (fewer than ``batch_size``).
    """
    length = stream.numel() // batch_size
    if length < 2:
        raise ValueError(f"stream of {stream.numel()} tokens is too short for batch size {batch_size}")
    return stream[: length * batch_size].view(batch_size, length)


def iter_stream_chunks(rows: torch.Tensor, bptt: int,
                       start: int = 0) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Yield ``(index, inputs, targets)`` chunks of ``bptt`` steps from batched rows."""
    n_chunks = num_stream_chunks(rows, bptt)
    for index in range(start, n_chunks):
        begin = index * bptt
        end = min(begin + bptt, rows.size(1) - 1)
        yield index, rows[:, begin:end], rows[:, begin + 1 : end + 1]


def num_stream_chunks(rows: torch.Tensor, bptt: int) -> int:
    """Number of chunks :func:`iter_stream_chunks` yields."""
    return (rows.size(1) - 1 + bptt - 1) // bptt


def window_batches(stream: torch.Tensor, context: int, batch_size: int, generator: torch.Generator
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Cut a stream into fixed context windows, shuffled, grouped into batches.

    A random offset (from ``generator``) shifts the window grid each epoch so that
    every position is sometimes near the start of a window.
    """
    offset = int(torch.randint(0, context, (1,), generator=generator))
    usable = (stream.numel() - 1 - offset) // context
    if usable < 1:
        raise ValueError(f"stream of {stream.numel()} tokens is shorter than one context of {context}")
    inputs = stream[offset : offset + usable * context].view(usable, context)
    targets = stream[offset + 1 : offset + 1 + usable * context].view(usable, context)
    order = torch.randperm(usable, generator=generator)
    return [(inputs[order[i : i + batch_size]], targets[order[i : i + batch_size]])
            for i in range(0, usable, batch_size)]
