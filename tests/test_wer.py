"""WER with sclite's 0/4/3/3 alignment, and the text normalizer."""

from __future__ import annotations

import functools
import math
import random

import pytest

from evaluators.normalize import Normalizer
from evaluators.wer import ErrorCounts, align, alignment_cost, corpus_wer, score_utterance


def counts(ref: str, hyp: str) -> tuple[int, int, int, int]:
    c = score_utterance(ref, hyp)
    return c.correct, c.substitutions, c.deletions, c.insertions


# ---------------------------------------------------------------- hand-made alignments

@pytest.mark.parametrize(
    ("ref", "hyp", "expected"),
    [
        ("the cat sat", "the cat sat", (3, 0, 0, 0)),
        ("the cat sat", "the dog sat", (2, 1, 0, 0)),
        ("the cat sat", "the sat", (2, 0, 1, 0)),
        ("the cat sat", "the cat sat down", (3, 0, 0, 1)),
        ("a b c d e", "x b c e y z", (3, 1, 1, 2)),  # S(a,x) C C D(d) C I I
        ("", "", (0, 0, 0, 0)),
        ("", "a b", (0, 0, 0, 2)),
        ("a b", "", (0, 0, 2, 0)),
    ],
)
def test_hand_made_counts(ref: str, hyp: str, expected: tuple[int, int, int, int]) -> None:
    assert counts(ref, hyp) == expected


def test_alignment_pairs() -> None:
    assert align("a b c d e", "x b c e y z") == [
        ("a", "x", "S"), ("b", "b", "C"), ("c", "c", "C"), ("d", None, "D"),
        ("e", "e", "C"), (None, "y", "I"), (None, "z", "I"),
    ]
    assert align("", "") == []
    assert align(["a"], ["a"]) == [("a", "a", "C")]


def test_empty_reference_and_hypothesis_rates() -> None:
    assert score_utterance("", "").wer == 0.0
    assert score_utterance("", "a b").wer == math.inf
    assert score_utterance("", "a b").errors == 2
    assert score_utterance("a b", "").wer == 1.0
    assert score_utterance("a b c d", "a x c d e").wer == pytest.approx(2 / 4)


def test_tie_substitution_preferred_at_the_later_cell() -> None:
    # "a" vs "b c": S+I and I+S both cost 7. At cell (1,2) sclite compares
    # sub = D(0,1)+4 = 7, del = D(0,2)+3 = 9, ins = D(1,1)+3 = 7 and takes sub on the
    # tie, so the insertion comes first and the substitution last.
    assert align("a", "b c") == [(None, "b", "I"), ("a", "c", "S")]
    # mirror case: at (2,1) sub = 3+4 = 7 ties del = 4+3 = 7 -> sub, so the deletion is first
    assert align("b c", "a") == [("b", None, "D"), ("c", "a", "S")]


def test_tie_between_deletion_and_insertion_goes_to_insertion() -> None:
    # "a b" vs "b a": D C I and I C D both cost 6 (S S costs 8). At (2,2):
    # sub = 4+4 = 8, del = D(1,2)+3 = 6, ins = D(2,1)+3 = 6; del is taken only when
    # strictly cheaper, so the last step is the insertion and the deletion comes first.
    assert align("a b", "b a") == [("a", None, "D"), ("b", "b", "C"), (None, "a", "I")]


def test_tie_changes_the_error_count() -> None:
    # "a a b" vs "b c c": 3 substitutions (cost 12, 3 errors) tie with D D C I I
    # (cost 12, 4 errors). At (3,3) sub = D(2,2)+4 = 8+4 = 12 <= ins = D(3,2)+3 = 9+3 = 12,
    # so sclite keeps the substitutions and reports 3 errors.
    assert counts("a a b", "b c c") == (0, 3, 0, 0)


def test_weighted_alignment_can_have_more_errors_than_edit_distance() -> None:
    # unit-cost edit distance is 5 (five substitutions, weighted 20); sclite's weights
    # prefer 3 deletions + 3 insertions (weighted 18) and so count 6 errors.
    ali = align("p q r a b", "a b s t u")
    assert [op for _, _, op in ali] == ["D", "D", "D", "C", "C", "I", "I", "I"]
    assert alignment_cost(ali) == 18
    assert score_utterance("p q r a b", "a b s t u").errors == 6
    assert levenshtein("p q r a b".split(), "a b s t u".split()) == 5


# ---------------------------------------------------------------- independent checks

def levenshtein(ref: list[str], hyp: list[str]) -> int:
    """Plain unit-cost edit distance (two-row DP)."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i]
        for j, h in enumerate(hyp, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h)))
        prev = cur
    return prev[-1]


def optimal_count_sets(ref: list[str], hyp: list[str]) -> tuple[int, frozenset[tuple[int, int, int]]]:
    """Minimum 4/3/3 cost by memoised recursion from the front, with every (S, D, I) reaching it."""

    @functools.cache
    def best(i: int, j: int) -> tuple[int, frozenset[tuple[int, int, int]]]:
        if i == len(ref) and j == len(hyp):
            return 0, frozenset({(0, 0, 0)})
        options = []
        if i < len(ref) and j < len(hyp):
            sub = int(ref[i] != hyp[j])
            cost, sets = best(i + 1, j + 1)
            options.append((cost + 4 * sub, {(s + sub, d, n) for s, d, n in sets}))
        if i < len(ref):
            cost, sets = best(i + 1, j)
            options.append((cost + 3, {(s, d + 1, n) for s, d, n in sets}))
        if j < len(hyp):
            cost, sets = best(i, j + 1)
            options.append((cost + 3, {(s, d, n + 1) for s, d, n in sets}))
        low = min(cost for cost, _ in options)
        return low, frozenset().union(*(sets for cost, sets in options if cost == low))

    return best(0, 0)


def test_randomized_against_independent_programs() -> None:
    rng = random.Random(1234)
    more_errors_seen = 0
    for _ in range(600):
        ref = [rng.choice("abcd") for _ in range(rng.randint(0, 8))]
        hyp = [rng.choice("abcde") for _ in range(rng.randint(0, 8))]
        ali = align(ref, hyp)
        c = ErrorCounts.from_alignment(ali)
        # the alignment spells out both word lists, in order
        assert [r for r, _, op in ali if op != "I"] == ref
        assert [h for _, h, op in ali if op != "D"] == hyp
        assert all((op == "C") == (r == h) for r, h, op in ali if op in "CS")
        assert c.correct + c.substitutions + c.deletions == len(ref) == c.ref_words
        assert c.correct + c.substitutions + c.insertions == len(hyp) == c.hyp_words
        # minimum weighted cost, and one of the count triples that reach it
        min_cost, triples = optimal_count_sets(ref, hyp)
        assert alignment_cost(ali) == min_cost
        assert (c.substitutions, c.deletions, c.insertions) in triples
        # weighted optimum never beats the unit edit distance on error count, and is
        # no costlier than the unit-optimal alignment (whose weighted cost <= 4 * edits)
        edits = levenshtein(ref, hyp)
        assert edits <= c.errors
        assert min_cost <= 4 * edits
        more_errors_seen += c.errors > edits
    assert more_errors_seen > 0  # the 4/3/3 effect shows up in random data too


# ---------------------------------------------------------------- counts and corpus

def test_error_counts_arithmetic() -> None:
    a = ErrorCounts(4, 3, 1, 0, 1)
    b = ErrorCounts(2, 1, 0, 1, 0)
    assert a + b == ErrorCounts(6, 4, 1, 1, 1)
    assert sum([a, b]) == a + b
    assert (a + b).errors == 3
    assert (a + b).wer == pytest.approx(0.5)
    with pytest.raises(TypeError):
        _ = a + 1
    with pytest.raises(AttributeError):
        a.correct = 0  # type: ignore[misc]


def test_corpus_wer_sums_before_dividing() -> None:
    total, per_utt = corpus_wer([("a b c d", "a b c d"), ("a", "b"), ("", "x")])
    assert [u.errors for u in per_utt] == [0, 1, 1]
    assert total == ErrorCounts(5, 4, 1, 0, 1)
    assert total.wer == pytest.approx(2 / 5)


def test_corpus_wer_with_normalizer() -> None:
    total, _ = corpus_wer([("The thousand, dollars", "the thousand dollars .")], normalizer=Normalizer())
    assert total.errors == 0


# ---------------------------------------------------------------- normalizer

def test_normalizer_defaults() -> None:
    norm = Normalizer()
    assert norm('  The "Dow" fell $one thousand, points ; - today!  ') == [
        "the", "dow", "fell", "one", "thousand", "points", "today"]
    assert norm("eighty-six don't -- u.s.") == ["eighty-six", "don't", "us"]
    assert norm("") == []


def test_normalizer_options() -> None:
    assert Normalizer(split_hyphens=True)("eighty-six - x") == ["eighty", "six", "x"]
    assert Normalizer(lowercase=False)("A b") == ["A", "b"]
    assert Normalizer(punctuation=frozenset("!"))("a, b!") == ["a,", "b"]
    assert Normalizer(drop_hyphen_tokens=False)("a - b") == ["a", "-", "b"]
    mapped = Normalizer(mapping={"ok": "okay", "gonna": "going to", "uh": ""})
    assert mapped("OK uh I'm gonna go") == ["okay", "i'm", "going", "to", "go"]
