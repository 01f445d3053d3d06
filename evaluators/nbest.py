"""Readers for ASR n-best lists (no scoring here).

Three formats are read into :class:`NBestList` records:

HyPoradise JSON (:func:`read_hyporadise`)
    One JSON array; element ``k`` is an object with ``input`` (list of hypothesis
    strings, best first), ``output`` (the reference) and optionally ``score`` (one number
    per hypothesis; ``test_wsj_score.json`` has it, a length-normalised log-probability,
    higher is better). Other keys (``input1``, ``input2``, ``instruction``) are ignored.
    The files carry no utterance ids, so element ``k`` gets ``utt{k:05d}``.

Kaldi-style text files (:func:`read_kaldi_nbest`)
    ``text``: lines ``UTTID-N word word ...`` (N is the 1-based rank; the words may be
    empty), grouped into one list per UTTID in order of first appearance and sorted by N.
    Optional ``acscore`` / ``lmscore``: lines ``UTTID-N float``, which must cover exactly
    the hypotheses of ``text``; Kaldi writes them as costs (negated log-likelihoods,
    lower is better) and they are stored unchanged in ``am_scores`` / ``lm_scores``.
    Optional reference file: lines ``UTTID word ...``; every n-best utterance needs one
    (extra references are ignored).

JSONL (:func:`read_jsonl`)
    One JSON object per non-blank line::

        {"id": "utt1", "hyps": ["a b", "a c"], "ref": "a b", "scores": [-1.5, -2.0]}

    ``id`` (string, unique) and ``hyps`` (non-empty list of strings) are required;
    ``ref`` (string or null) and ``scores`` / ``am_scores`` / ``lm_scores`` (one number
    per hypothesis, or null) are optional.

Every malformed input raises :class:`NBestError` whose message starts with the file and
the line (text/JSONL) or record index (JSON array) and says what was expected. Scores
must be finite numbers (JSON booleans are rejected).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from nas.core.errors import MpnasError

WSJ_DEV93_COUNT = 503  # test_wsj_score.json: 836 = 503 (dev93) + 333 (eval92), if in that order


class NBestError(MpnasError):
    """Malformed n-best input; the message names the file and the line or record."""

    def __init__(self, path: str | Path, where: str, what: str) -> None:
        self.path = str(path)
        self.where = where
        super().__init__(f"{path}: {where}: {what}")


@dataclass
class NBestList:
    """The hypotheses of one utterance, best first, with optional reference and scores."""

    utt_id: str
    hypotheses: list[str]
    reference: str | None = None
    scores: list[float] | None = None
    am_scores: list[float] | None = None
    lm_scores: list[float] | None = None

    def __post_init__(self) -> None:
        for name in ("scores", "am_scores", "lm_scores"):
            values = getattr(self, name)
            if values is not None and len(values) != len(self.hypotheses):
                raise ValueError(f"{self.utt_id}: {len(values)} {name} for {len(self.hypotheses)} hypotheses")


def _hypotheses(value: object, path: Path, where: str, key: str) -> list[str]:
    if not isinstance(value, list):
        raise NBestError(path, where, f"'{key}' must be a list of strings, got {type(value).__name__}")
    if not value:
        raise NBestError(path, where, f"'{key}' is an empty hypothesis list")
    for k, hyp in enumerate(value):
        if not isinstance(hyp, str):
            raise NBestError(path, where, f"'{key}'[{k}] must be a string, got {type(hyp).__name__}")
    return value


def _scores(value: object, n_hyps: int, path: Path, where: str, key: str) -> list[float] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise NBestError(path, where, f"'{key}' must be a list of numbers, got {type(value).__name__}")
    if len(value) != n_hyps:
        raise NBestError(path, where, f"'{key}' has {len(value)} scores but there are {n_hyps} hypotheses")
    out = []
    for k, score in enumerate(value):
        # bool is an int subclass, but true/false in a score list is a data error
        if isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score):
            raise NBestError(path, where, f"'{key}'[{k}] must be a finite number, got {score!r}")
        out.append(float(score))
    return out


def _reference(value: object, path: Path, where: str, key: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise NBestError(path, where, f"'{key}' must be a string, got {type(value).__name__}")
    return value


def _read_text(path: Path) -> str:
    """The whole file as UTF-8; a decoding error is reported with its line number."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise NBestError(path, f"line {line}", f"not valid UTF-8 ({err.reason})") from None


def _lines(path: Path) -> list[str]:
    # split on \n only: str.splitlines() would also break at form feeds and U+2028
    return _read_text(path).split("\n")


def _load_json(path: Path) -> object:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise NBestError(path, f"line {err.lineno} column {err.colno}", f"invalid JSON ({err.msg})") from None


def read_hyporadise(path: str | Path) -> list[NBestList]:
    """Read a HyPoradise JSON file (see the module docstring) into n-best lists ``utt00000``, ..."""
    path = Path(path)
    data = _load_json(path)
    if not isinstance(data, list):
        raise NBestError(path, "top level", f"expected a JSON array of records, got {type(data).__name__}")
    lists = []
    for index, record in enumerate(data):
        where = f"record {index}"
        if not isinstance(record, dict):
            raise NBestError(path, where, f"expected an object, got {type(record).__name__}")
        for key in ("input", "output"):
            if key not in record:
                raise NBestError(path, where, f"missing key '{key}'")
        hyps = _hypotheses(record["input"], path, where, "input")
        ref = _reference(record["output"], path, where, "output")
        if ref is None:
            raise NBestError(path, where, "'output' must be a string, got NoneType")
        scores = _scores(record.get("score"), len(hyps), path, where, "score")
        lists.append(NBestList(f"utt{index:05d}", hyps, ref, scores))
    return lists


def read_jsonl(path: str | Path) -> list[NBestList]:
    """Read the JSONL n-best format documented in the module docstring."""
    path = Path(path)
    lists: list[NBestList] = []
    seen: dict[str, int] = {}
    for lineno, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        where = f"line {lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise NBestError(path, where, f"invalid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise NBestError(path, where, f"expected an object, got {type(record).__name__}")
        for key in ("id", "hyps"):
            if key not in record:
                raise NBestError(path, where, f"missing key '{key}'")
        utt_id = record["id"]
        if not isinstance(utt_id, str):
            raise NBestError(path, where, f"'id' must be a string, got {type(utt_id).__name__}")
        if utt_id in seen:
            raise NBestError(path, where, f"duplicate id '{utt_id}' (first on line {seen[utt_id]})")
        seen[utt_id] = lineno
        hyps = _hypotheses(record["hyps"], path, where, "hyps")
        lists.append(NBestList(
            utt_id, hyps, _reference(record.get("ref"), path, where, "ref"),
            *(_scores(record.get(key), len(hyps), path, where, key)
              for key in ("scores", "am_scores", "lm_scores")),
        ))
    return lists


def _split_hyp_key(key: str, path: Path, where: str) -> tuple[str, int]:
    utt_id, dash, rank = key.rpartition("-")
    if not dash or not utt_id or not rank.isdigit() or int(rank) < 1:
        raise NBestError(path, where, f"expected a hypothesis key 'UTTID-N' with N >= 1, got '{key}'")
    return utt_id, int(rank)


def _read_score_file(path: Path, known: dict[str, int]) -> dict[str, float]:
    """``UTTID-N float`` lines; every key must be a hypothesis of the text file, and all must be present."""
    scores: dict[str, float] = {}
    lines: dict[str, int] = {}
    for lineno, line in enumerate(_lines(path), start=1):
        fields = line.split()
        if not fields:
            continue
        where = f"line {lineno}"
        if len(fields) != 2:
            raise NBestError(path, where, f"expected 'UTTID-N score', got {len(fields)} fields")
        key, raw = fields
        if key not in known:
            raise NBestError(path, where, f"score for unknown hypothesis '{key}' (not in the text file)")
        if key in scores:
            raise NBestError(path, where, f"duplicate score for '{key}' (first on line {lines[key]})")
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise NBestError(path, where, f"expected a finite number as the score, got '{raw}'")
        scores[key], lines[key] = value, lineno
    missing = [key for key in known if key not in scores]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise NBestError(path, f"end of file ({len(known)} hypotheses in the text file)",
                         f"no score for '{missing[0]}' (text line {known[missing[0]]}){more}")
    return scores


def _read_references(path: Path) -> dict[str, str]:
    refs: dict[str, str] = {}
    lines: dict[str, int] = {}
    for lineno, line in enumerate(_lines(path), start=1):
        fields = line.split(maxsplit=1)
        if not fields:
            continue
        utt_id = fields[0]
        if utt_id in refs:
            raise NBestError(path, f"line {lineno}", f"duplicate reference id '{utt_id}' "
                                                      f"(first on line {lines[utt_id]})")
        refs[utt_id] = " ".join(fields[1].split()) if len(fields) > 1 else ""
        lines[utt_id] = lineno
    return refs


def read_kaldi_nbest(
    text: str | Path,
    acscore: str | Path | None = None,
    lmscore: str | Path | None = None,
    ref: str | Path | None = None,
) -> list[NBestList]:
    """Read Kaldi-style n-best files (see the module docstring) into one list per utterance."""
    text = Path(text)
    hyps: dict[str, dict[int, str]] = {}  # insertion order = order of first appearance
    key_line: dict[str, int] = {}
    for lineno, line in enumerate(_lines(text), start=1):
        fields = line.split(maxsplit=1)
        if not fields:
            continue
        where = f"line {lineno}"
        key = fields[0]
        utt_id, rank = _split_hyp_key(key, text, where)
        if key in key_line:
            raise NBestError(text, where, f"duplicate hypothesis '{key}' (first on line {key_line[key]})")
        key_line[key] = lineno
        hyps.setdefault(utt_id, {})[rank] = " ".join(fields[1].split()) if len(fields) > 1 else ""
    if not hyps:
        raise NBestError(text, "end of file", "no hypotheses: expected lines 'UTTID-N word ...'")

    def keyed(scores: dict[str, float] | None, utt_id: str, ranks: list[int]) -> list[float] | None:
        return None if scores is None else [scores[f"{utt_id}-{r}"] for r in ranks]

    ac = _read_score_file(Path(acscore), key_line) if acscore is not None else None
    lm = _read_score_file(Path(lmscore), key_line) if lmscore is not None else None
    ref_path = Path(ref) if ref is not None else None
    refs = _read_references(ref_path) if ref_path is not None else None
    lists = []
    for utt_id, by_rank in hyps.items():
        if refs is not None and utt_id not in refs:
            raise NBestError(ref_path or "", "end of file", f"no reference for utterance '{utt_id}' "
                             f"(text line {key_line[f'{utt_id}-{min(by_rank)}']})")
        ranks = sorted(by_rank)
        lists.append(NBestList(utt_id, [by_rank[r] for r in ranks], refs[utt_id] if refs is not None else None,
                               None, keyed(ac, utt_id, ranks), keyed(lm, utt_id, ranks)))
    return lists


def dev_test_split(
    lists: Sequence[NBestList], dev_fraction: float = 0.5, dev_count: int | None = None
) -> tuple[list[NBestList], list[NBestList]]:
    """Split by file order: the first ``k`` lists are dev, the rest test.

    ``k = dev_count`` when given, else ``floor(len(lists) * dev_fraction)``. Deterministic,
    no shuffling: for ``test_wsj_score.json`` ``dev_count=WSJ_DEV93_COUNT`` (503) gives
    503 dev / 333 test, which matches dev93 / eval92 if the file keeps that order
    (plausible, not verified: the file has no ids).
    """
    n = len(lists)
    if dev_count is None:
        if not 0.0 <= dev_fraction <= 1.0:
            raise ValueError(f"dev_fraction must be in [0, 1], got {dev_fraction}")
        dev_count = math.floor(n * dev_fraction)
    elif not 0 <= dev_count <= n:
        raise ValueError(f"dev_count must be in [0, {n}], got {dev_count}")
    return list(lists[:dev_count]), list(lists[dev_count:])
