r"""Word-level corpora in PTB format: locating, reading, vocabulary and batching.

A corpus is a folder holding ``train.txt``, ``valid.txt`` and ``test.txt`` (the
``ptb.train.txt`` naming is accepted too), one sentence per line, and the vocabulary
is built from the training split only (ids in order of first appearance).

Line conventions (see :class:`CorpusOptions`):

- Files are UTF-8. A byte-order mark (U+FEFF) at the very start of a file is dropped.
- Lines end in ``\n``; a ``\r`` just before it (CRLF files) is part of the line ending
  and dropped. Any other ``\r`` is refused with a :class:`DataError` naming file, line
  and column. Nothing else ends a line: characters that :meth:`str.splitlines` would
  also break on (``\x0b``, ``\x0c``, ``\x85``, U+2028, ...) are whitespace inside the line.
- Words are separated by whitespace (:meth:`str.split`, Unicode whitespace included).
- Every line gets one ``<eos>``, blank (whitespace-only) lines included, which is how
  the PyTorch word-language-model reader and the published PTB / WikiText token counts
  count; ``CorpusOptions(blank_lines="skip")`` drops blank lines instead.
- Error messages name the file and its physical line number (1-based, counting every
  ``\n``, blank lines included).

Unknown words in valid/test become ``<unk>`` when the training vocabulary has it (and
are an error otherwise); :func:`nas.core.corpus_report.corpus_summary` counts them, and :func:`load_corpus`
logs a warning when there are any.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import urllib.request
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from nas.core.errors import MpnasError

EOS = "<eos>"
UNK = "<unk>"
SPLITS = ("train", "valid", "test")
DATA_ENV = "MPNAS_DATA"
BOM = "\ufeff"
BLANK_LINE_MODES = ("eos", "skip")

logger = logging.getLogger(__name__)

# Mikolov's simple-examples archive is the usual public home of PTB; these are the
# sha256 digests of its three files (identical to the copies in ../shared/data/ptb).
PTB_URL = "https://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"
PTB_SHA256 = {
    "train": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
    "valid": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
    "test": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0",
}


class DataError(MpnasError):
    """A corpus file is missing or malformed, or too small for the run; the message names file and line."""


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


@dataclass(frozen=True)
class CorpusOptions:
    """How corpus text becomes tokens; the defaults follow the common LM benchmarks.

    ``blank_lines``: ``"eos"`` (default) gives a blank or whitespace-only line one
    ``<eos>``, like every other line, so token counts match the published figures of
    corpora with blank lines (WikiText); ``"skip"`` drops such lines (what mpnas did
    before; it lowers the token count and, when ``train.txt`` starts with a blank
    line, moves ``<eos>`` in the vocabulary). PTB has no blank lines: both give the
    same tokens and vocabulary there.
    """

    blank_lines: Literal["eos", "skip"] = "eos"

    def __post_init__(self) -> None:
        if self.blank_lines not in BLANK_LINE_MODES:
            raise ValueError(f"blank_lines={self.blank_lines!r}: expected one of {BLANK_LINE_MODES}")


@dataclass(frozen=True)
class SplitText:
    """One split file read into sentences, each with its physical line number."""

    path: Path
    sentences: list[list[str]]
    line_numbers: list[int]
    lines: int
    blank_lines: int


def read_split(path: Path, options: CorpusOptions | None = None) -> SplitText:
    r"""Read one file under the module's line conventions; ``<eos>`` ends each sentence.

    Raises :class:`DataError` (naming file and line) for unreadable or non-UTF-8 files,
    a ``\r`` that is not part of a CRLF line ending, and files without a single word.
    """
    options = options or CorpusOptions()
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        hint = " (the file starts with a UTF-16 byte-order mark)" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise DataError(f"{path}:{line}: undecodable bytes {raw[exc.start:exc.end]!r} "
                        f"(expected UTF-8 text){hint}") from exc
    if text.startswith(BOM):
        text = text[len(BOM):]
    lines = text.split("\n")
    if lines[-1] == "":  # the text after the final newline is not a line
        lines.pop()
    sentences: list[list[str]] = []
    line_numbers: list[int] = []
    blank = 0
    for lineno, line in enumerate(lines, start=1):
        if line.endswith("\r"):
            line = line[:-1]
        if "\r" in line:
            column = line.index("\r") + 1
            raise DataError(f"{path}:{lineno}: carriage return (\\r) at column {column} "
                            "inside the line (expected lines ending in \\n or \\r\\n; convert old Mac "
                            "\\r line endings or remove the stray \\r)")
        words = line.split()
        if not words:
            blank += 1
            if options.blank_lines == "skip":
                continue
        sentences.append(words + [EOS])
        line_numbers.append(lineno)
    if blank == len(lines):
        raise DataError(f"{path}: file is empty (expected one sentence per line)")
    return SplitText(path=path, sentences=sentences, line_numbers=line_numbers, lines=len(lines),
                     blank_lines=blank)


def read_sentences(path: Path, options: CorpusOptions | None = None) -> list[list[str]]:
    """Read one sentence per line as word lists; ``<eos>`` is appended to each line.

    Blank lines give ``[<eos>]`` unless ``options.blank_lines == "skip"``; see
    :func:`read_split` for the conventions and errors.
    """
    return read_split(path, options).sentences


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

    def encode(self, sentences: list[list[str]], source: str = "<memory>", *,
               line_numbers: Sequence[int] | None = None,
               unknown: Counter[str] | None = None) -> torch.Tensor:
        """Map sentences to one id stream; unknown words become ``<unk>`` or an error.

        ``line_numbers`` (one per sentence) are the line numbers errors name (default:
        the sentence's position, 1-based). Words mapped to ``<unk>`` are counted into
        ``unknown`` when given.
        """
        index = self.index
        unk = self.unk_id
        ids: list[int] = []
        for position, sentence in enumerate(sentences):
            for word in sentence:
                i = index.get(word)
                if i is None:
                    if unk is None:
                        lineno = line_numbers[position] if line_numbers is not None else position + 1
                        raise DataError(f"{source}:{lineno}: word {word!r} is not in the training "
                                        f"vocabulary and the vocabulary has no {UNK}")
                    if unknown is not None:
                        unknown[word] += 1
                    i = unk
                ids.append(i)
        return torch.tensor(ids, dtype=torch.long)


@dataclass(frozen=True)
class SplitStats:
    """Counts of one split as loaded: lines, tokens, types and what became ``<unk>``."""

    file: str
    lines: int
    blank_lines: int
    tokens: int
    types: int
    unk: int
    oov_words: tuple[tuple[str, int], ...]

    @property
    def oov_tokens(self) -> int:
        """Tokens that were not in the training vocabulary and became ``<unk>``."""
        return sum(count for _, count in self.oov_words)


@dataclass(frozen=True)
class Corpus:
    """The three splits as id streams plus the vocabulary, with per-split counts."""

    vocab: Vocabulary
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    folder: Path
    options: CorpusOptions = field(default_factory=CorpusOptions)
    stats: Mapping[str, SplitStats] = field(default_factory=dict, compare=False)

    def split(self, name: str) -> torch.Tensor:
        """The id stream of ``name`` (train, valid or test)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)


def count_noun(n: int, noun: str) -> str:
    """``1 token``, ``2,000 tokens``."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def load_corpus(folder: str | os.PathLike, options: CorpusOptions | None = None) -> Corpus:
    """Read a PTB-format corpus folder; errors name the file and physical line.

    Logs a warning when valid or test has words outside the training vocabulary that
    were mapped to ``<unk>`` (``<unk>`` tokens already in the text do not count).
    """
    options = options or CorpusOptions()
    folder = Path(folder)
    paths = {}
    for split in SPLITS:
        path = split_path(folder, split)
        if path is None:
            raise DataError(f"{folder}: missing split {split!r} (expected {split}.txt or "
                            f"ptb.{split}.txt)")
        paths[split] = path
    texts = {split: read_split(path, options) for split, path in paths.items()}
    vocab = Vocabulary.from_sentences(texts["train"].sentences)
    streams: dict[str, torch.Tensor] = {}
    stats: dict[str, SplitStats] = {}
    unk_id = vocab.unk_id
    for split, text in texts.items():
        unknown: Counter[str] = Counter()
        stream = vocab.encode(text.sentences, str(text.path), line_numbers=text.line_numbers, unknown=unknown)
        streams[split] = stream
        stats[split] = SplitStats(
            file=str(text.path), lines=text.lines, blank_lines=text.blank_lines, tokens=stream.numel(),
            types=len({word for sentence in text.sentences for word in sentence}),
            unk=int((stream == unk_id).sum()) if unk_id is not None else 0,
            oov_words=tuple(unknown.most_common()))
        if unknown:
            s = stats[split]
            listed = ", ".join(f"{word!r} x{count}" for word, count in s.oov_words[:10])
            more = f" and {len(s.oov_words) - 10} more" if len(s.oov_words) > 10 else ""
            logger.warning("%s: %s (%s, %.2f%% of %s) not in the training vocabulary, mapped to %s: %s%s",
                           text.path, count_noun(s.oov_tokens, "token"), count_noun(len(s.oov_words), "word type"),
                           100.0 * s.oov_tokens / max(s.tokens, 1), count_noun(s.tokens, "token"), UNK, listed, more)
    return Corpus(vocab=vocab, folder=folder, options=options, stats=stats, **streams)


