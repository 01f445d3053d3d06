"""N-best readers: the three formats, every malformed case, and the real HyPoradise file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from evaluators.nbest import (
    WSJ_DEV93_COUNT,
    NBestError,
    NBestList,
    dev_test_split,
    read_hyporadise,
    read_jsonl,
    read_kaldi_nbest,
)
from evaluators.normalize import Normalizer
from evaluators.wer import corpus_wer

HYPORADISE = Path(__file__).resolve().parents[1].parent / "shared/data/nbest/hyporadise"


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def write_json(path: Path, data: object) -> Path:
    return write(path, json.dumps(data))


def expect_error(call: Callable[[], object], path: Path, where: str, what: str) -> None:
    with pytest.raises(NBestError) as info:
        call()
    message = str(info.value)
    assert str(path) in message, message
    assert where in message, message
    assert what in message, message
    assert isinstance(info.value, ValueError)


# ---------------------------------------------------------------- HyPoradise JSON

def test_hyporadise_reader(tmp_path: Path) -> None:
    path = write_json(tmp_path / "h.json", [
        {"input": ["a b", "a c"], "output": "a b", "score": [-0.1, -0.5], "input1": "ignored"},
        {"input": ["x"], "output": "y", "instruction": "ignored"},
    ])
    lists = read_hyporadise(path)
    assert lists == [
        NBestList("utt00000", ["a b", "a c"], "a b", [-0.1, -0.5]),
        NBestList("utt00001", ["x"], "y", None),
    ]


@pytest.mark.parametrize(
    ("data", "where", "what"),
    [
        ({"input": ["a"]}, "top level", "expected a JSON array"),
        ([{"input": ["a"], "output": "a"}, {"output": "a"}], "record 1", "missing key 'input'"),
        ([{"input": ["a"]}], "record 0", "missing key 'output'"),
        ([{"input": "a b", "output": "a"}], "record 0", "'input' must be a list of strings"),
        ([{"input": ["a", 3], "output": "a"}], "record 0", "'input'[1] must be a string, got int"),
        ([{"input": [], "output": "a"}], "record 0", "empty hypothesis list"),
        ([{"input": ["a"], "output": 5}], "record 0", "'output' must be a string"),
        ([{"input": ["a"], "output": None}], "record 0", "'output' must be a string"),
        ([{"input": ["a", "b"], "output": "a", "score": [1.0]}], "record 0", "1 scores but there are 2"),
        ([{"input": ["a"], "output": "a", "score": ["x"]}], "record 0", "'score'[0] must be a finite number"),
        ([{"input": ["a"], "output": "a", "score": [True]}], "record 0", "must be a finite number"),
        ([{"input": ["a"], "output": "a", "score": 1.0}], "record 0", "'score' must be a list of numbers"),
        (["a"], "record 0", "expected an object"),
    ],
)
def test_hyporadise_malformed(tmp_path: Path, data: object, where: str, what: str) -> None:
    path = write_json(tmp_path / "bad.json", data)
    expect_error(lambda: read_hyporadise(path), path, where, what)


def test_hyporadise_invalid_json(tmp_path: Path) -> None:
    path = write(tmp_path / "broken.json", '[\n {"input": ["a"], "output": "a"},\n {"input": [}\n]')
    expect_error(lambda: read_hyporadise(path), path, "line 3", "invalid JSON")
    nan = write(tmp_path / "nan.json", '[{"input": ["a"], "output": "a", "score": [NaN]}]')
    expect_error(lambda: read_hyporadise(nan), nan, "record 0", "finite number")


# ---------------------------------------------------------------- JSONL

def test_jsonl_reader(tmp_path: Path) -> None:
    path = write(tmp_path / "n.jsonl", "\n".join([
        json.dumps({"id": "u1", "hyps": ["a b", "a"], "ref": "a b", "scores": [-1, -2.5]}),
        "",
        json.dumps({"id": "u2", "hyps": [""], "am_scores": [3.0], "lm_scores": [4.0]}),
    ]) + "\n")
    assert read_jsonl(path) == [
        NBestList("u1", ["a b", "a"], "a b", [-1.0, -2.5]),
        NBestList("u2", [""], None, None, [3.0], [4.0]),
    ]


@pytest.mark.parametrize(
    ("line", "what"),
    [
        ('{"hyps": ["a"]}', "missing key 'id'"),
        ('{"id": "u9"}', "missing key 'hyps'"),
        ('{"id": 7, "hyps": ["a"]}', "'id' must be a string"),
        ('{"id": "u9", "hyps": "a"}', "'hyps' must be a list of strings"),
        ('{"id": "u9", "hyps": [null]}', "'hyps'[0] must be a string"),
        ('{"id": "u9", "hyps": []}', "empty hypothesis list"),
        ('{"id": "u9", "hyps": ["a"], "ref": ["a"]}', "'ref' must be a string"),
        ('{"id": "u9", "hyps": ["a", "b"], "scores": [1, 2, 3]}', "3 scores but there are 2"),
        ('{"id": "u9", "hyps": ["a"], "lm_scores": ["1.0"]}', "'lm_scores'[0] must be a finite number"),
        ('{"id": "u1", "hyps": ["a"]}', "duplicate id 'u1' (first on line 1)"),
        ('{"id": "u9", "hyps": ["a"]', "invalid JSON"),
        ('["u9", ["a"]]', "expected an object"),
    ],
)
def test_jsonl_malformed(tmp_path: Path, line: str, what: str) -> None:
    path = write(tmp_path / "bad.jsonl", '{"id": "u1", "hyps": ["a"]}\n\n' + line + "\n")
    expect_error(lambda: read_jsonl(path), path, "line 3", what)


# ---------------------------------------------------------------- Kaldi-style

@pytest.fixture
def kaldi(tmp_path: Path) -> dict[str, Path]:
    return {
        "text": write(tmp_path / "text", "u1-1 a b c\nu1-2 a b\nu2-2 y\nu2-1 x  y\n\nu1-3\n"),
        "ac": write(tmp_path / "acscore", "u1-1 10.5\nu1-2 11\nu1-3 12\nu2-1 5\nu2-2 6\n"),
        "lm": write(tmp_path / "lmscore", "u2-2 2\nu2-1 1\nu1-3 -3e1\nu1-2 2\nu1-1 1\n"),
        "ref": write(tmp_path / "ref", "u0 unused\nu1 a b c\nu2 x y\n"),
    }


def test_kaldi_reader(kaldi: dict[str, Path]) -> None:
    lists = read_kaldi_nbest(kaldi["text"], kaldi["ac"], kaldi["lm"], kaldi["ref"])
    assert lists == [
        NBestList("u1", ["a b c", "a b", ""], "a b c", None, [10.5, 11.0, 12.0], [1.0, 2.0, -30.0]),
        NBestList("u2", ["x y", "y"], "x y", None, [5.0, 6.0], [1.0, 2.0]),
    ]
    bare = read_kaldi_nbest(kaldi["text"])
    assert [b.hypotheses for b in bare] == [["a b c", "a b", ""], ["x y", "y"]]
    assert all(b.reference is None and b.am_scores is None for b in bare)


def test_kaldi_utterance_ids_may_contain_dashes(tmp_path: Path) -> None:
    text = write(tmp_path / "text", "spk-a-001-1 hello\nspk-a-001-2 hullo\n")
    (only,) = read_kaldi_nbest(text)
    assert only.utt_id == "spk-a-001" and only.hypotheses == ["hello", "hullo"]


@pytest.mark.parametrize(
    ("text", "where", "what"),
    [
        ("u1-1 a\nu1 a b\n", "line 2", "expected a hypothesis key 'UTTID-N'"),
        ("u1-1 a\nu1-x a b\n", "line 2", "expected a hypothesis key 'UTTID-N'"),
        ("u1-1 a\nu1-0 a b\n", "line 2", "N >= 1"),
        ("u1-1 a\nu1-1 a b\n", "line 2", "duplicate hypothesis 'u1-1' (first on line 1)"),
        ("\n\n", "end of file", "no hypotheses"),
    ],
)
def test_kaldi_text_malformed(tmp_path: Path, text: str, where: str, what: str) -> None:
    path = write(tmp_path / "text", text)
    expect_error(lambda: read_kaldi_nbest(path), path, where, what)


@pytest.mark.parametrize(
    ("scores", "where", "what"),
    [
        ("u1-1 1\nu1-2 abc\n", "line 2", "finite number as the score, got 'abc'"),
        ("u1-1 1\nu1-2 nan\n", "line 2", "finite number"),
        ("u1-1 1\nu1-2\n", "line 2", "expected 'UTTID-N score', got 1 fields"),
        ("u1-1 1 2\n", "line 1", "got 3 fields"),
        ("u1-1 1\nu1-2 2\nu1-3 3\n", "line 3", "unknown hypothesis 'u1-3'"),
        ("u1-1 1\nu9-1 2\n", "line 2", "unknown hypothesis 'u9-1'"),
        ("u1-1 1\nu1-1 2\n", "line 2", "duplicate score for 'u1-1' (first on line 1)"),
        ("u1-1 1\n", "end of file", "no score for 'u1-2' (text line 2)"),
        ("", "end of file", "no score for 'u1-1' (text line 1) and 1 more"),
    ],
)
def test_kaldi_score_malformed(tmp_path: Path, scores: str, where: str, what: str) -> None:
    text = write(tmp_path / "text", "u1-1 a b\nu1-2 a\n")
    for kind in ("acscore", "lmscore"):
        path = write(tmp_path / kind, scores)
        kwargs = {kind: path}
        expect_error(lambda kw=kwargs: read_kaldi_nbest(text, **kw), path, where, what)


def test_kaldi_reference_malformed(tmp_path: Path) -> None:
    text = write(tmp_path / "text", "u1-1 a\nu2-1 b\n")
    dup = write(tmp_path / "ref_dup", "u1 a\nu2 b\nu1 c\n")
    expect_error(lambda: read_kaldi_nbest(text, ref=dup), dup, "line 3", "duplicate reference id 'u1'")
    missing = write(tmp_path / "ref_missing", "u1 a\n")
    expect_error(lambda: read_kaldi_nbest(text, ref=missing), missing, "end of file",
                 "no reference for utterance 'u2' (text line 2)")


def test_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    raw = b"u1-1 a\nu1-2 caf\xe9\n"
    text = tmp_path / "text"
    text.write_bytes(raw)
    expect_error(lambda: read_kaldi_nbest(text), text, "line 2", "not valid UTF-8")
    jsonl = tmp_path / "n.jsonl"
    jsonl.write_bytes(b'{"id": "u1", "hyps": ["a"]}\n{"id": "\xff"}\n')
    expect_error(lambda: read_jsonl(jsonl), jsonl, "line 2", "not valid UTF-8")
    js = tmp_path / "h.json"
    js.write_bytes(b'[{"input": ["\xff"], "output": "a"}]')
    expect_error(lambda: read_hyporadise(js), js, "line 1", "not valid UTF-8")


def test_crlf_line_endings(tmp_path: Path) -> None:
    text = tmp_path / "text"
    text.write_bytes(b"u1-1 a b\r\nu1-2 a\r\n")
    ac = tmp_path / "acscore"
    ac.write_bytes(b"u1-1 1.5\r\nu1-2 2\r\n")
    (only,) = read_kaldi_nbest(text, acscore=ac)
    assert only.hypotheses == ["a b", "a"] and only.am_scores == [1.5, 2.0]


# ---------------------------------------------------------------- records and split

def test_record_checks_score_length() -> None:
    with pytest.raises(ValueError, match="2 lm_scores for 1 hypotheses"):
        NBestList("u", ["a"], lm_scores=[1.0, 2.0])


def test_dev_test_split() -> None:
    lists = [NBestList(f"u{k}", ["a"]) for k in range(7)]
    dev, test = dev_test_split(lists)
    assert [x.utt_id for x in dev] == ["u0", "u1", "u2"]
    assert [x.utt_id for x in test] == ["u3", "u4", "u5", "u6"]
    assert dev_test_split(lists, dev_fraction=1.0) == (lists, [])
    dev, test = dev_test_split(lists, dev_count=5)
    assert len(dev) == 5 and len(test) == 2 and dev + test == lists
    with pytest.raises(ValueError, match="dev_fraction"):
        dev_test_split(lists, dev_fraction=1.5)
    with pytest.raises(ValueError, match="dev_count"):
        dev_test_split(lists, dev_count=8)


# ---------------------------------------------------------------- real data

@pytest.fixture(scope="module")
def wsj() -> list[NBestList]:
    path = HYPORADISE / "test_wsj_score.json"
    if not path.is_file():
        pytest.skip(f"HyPoradise data not found at {HYPORADISE}")
    return read_hyporadise(path)


def test_real_wsj_file(wsj: list[NBestList]) -> None:
    assert len(wsj) == 836
    assert wsj[0].utt_id == "utt00000" and wsj[-1].utt_id == "utt00835"
    assert all(len(x.hypotheses) == 5 for x in wsj)
    assert all(x.scores is not None and len(x.scores) == 5 for x in wsj)
    assert all(x.reference for x in wsj)
    # documented in shared/data/README.md: scores sorted best first, in [-0.88, -0.08]
    assert all(x.scores == sorted(x.scores, reverse=True) for x in wsj if x.scores)
    assert all(-1.0 < s < 0.0 for x in wsj if x.scores for s in x.scores)
    dev, test = dev_test_split(wsj, dev_count=WSJ_DEV93_COUNT)
    assert (len(dev), len(test)) == (503, 333)
    assert wsj[0].reference is not None and wsj[0].reference.startswith("saatchi officials said")


def test_real_wsj_one_best_wer(wsj: list[NBestList]) -> None:
    # README section 2: 14,157 reference words, unnormalized 1-best WER 6.03 %
    total, per_utt = corpus_wer((x.reference or "", x.hypotheses[0]) for x in wsj)
    assert len(per_utt) == 836
    assert total.ref_words == 14157
    assert total.wer == pytest.approx(0.0603, abs=5e-4)
    # normalizing ("thousand," "$one" "eighty-six") can only help here
    normalized, _ = corpus_wer(((x.reference or "", x.hypotheses[0]) for x in wsj),
                               normalizer=Normalizer(split_hyphens=True))
    assert normalized.ref_words == 14157 and normalized.wer < total.wer


def test_real_swbd_file_has_no_scores() -> None:
    path = HYPORADISE / "test_swbd.json"
    if not path.is_file():
        pytest.skip(f"HyPoradise data not found at {HYPORADISE}")
    lists = read_hyporadise(path)
    assert len(lists) == 2000
    assert all(len(x.hypotheses) == 5 and x.scores is None for x in lists)
