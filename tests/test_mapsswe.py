"""MAPSSWE: segmentation traced by hand through sc_stats' state machine, and the statistic."""

from __future__ import annotations

import math
import random

import pytest

from evaluators.mapsswe import Segment, mapsswe, mapsswe_alignments, segment_alignments
from evaluators.wer import align

# Four utterances whose segments were traced by hand (min_good = 2):
#  0: A misses word 2 (b -> x), B misses word 6 (f -> y). Words 3,4 are good for both,
#     closing segment [a b c d] (A 1 error, B 0); word 5 is good again (state b), then
#     B errs and g h close segment [d e f g h] that starts min_good-1 = 1 word before
#     the last good word e (B 1 error). The shared word d is correct in both.
#  1: B deletes b; the utterance ends after 1 good word, so the end closes [a b c].
#  2: both make the same substitution: one segment with Z = 0.
#  3: A inserts x after b: [a b x c d] for A, [a b c d] for B; ref = (4 + 4) // 2.
REFS = ["a b c d e f g h", "a b c", "a b c d", "a b c d e"]
HYPS_A = ["a x c d e f g h", "a b c", "a z c d", "a b x c d e"]
HYPS_B = ["a b c d e y g h", "a c", "a z c d", "a b c d e"]
EXPECTED = (
    Segment(0, 4, 1, 0),
    Segment(0, 5, 0, 1),
    Segment(1, 3, 0, 1),
    Segment(2, 4, 1, 1),
    Segment(3, 4, 1, 0),
)


def test_hand_traced_segments() -> None:
    result = mapsswe(REFS, HYPS_A, HYPS_B)
    assert result.segments == EXPECTED
    assert [s.diff for s in result.segments] == [1, -1, -1, 0, 1]


def test_hand_computed_statistic() -> None:
    # Z = [1, -1, -1, 0, 1]: mu = 0 -> W = 0, p = 1
    result = mapsswe(REFS, HYPS_A, HYPS_B)
    assert result.mean_diff == 0.0
    assert result.std == pytest.approx(1.0)  # sum of squares 4, / (5 - 1)
    assert result.statistic == 0.0
    assert result.p_value == pytest.approx(1.0)
    assert not result.significant and result.winner is None
    # drop utterance 3: Z = [1, -1, -1, 0], mu = -0.25,
    # sum (Z - mu)^2 = 1.5625 + 0.5625 + 0.5625 + 0.0625 = 2.75, sigma^2 = 2.75 / 3,
    # W = -0.25 / (sqrt(11/12) / 2) = -0.5222329678670935,
    # p = 2 (1 - Phi(0.52223)) = 0.601509...
    result = mapsswe(REFS[:3], HYPS_A[:3], HYPS_B[:3])
    assert result.n_segments == 4
    assert result.mean_diff == pytest.approx(-0.25)
    assert result.std == pytest.approx(math.sqrt(11 / 12))
    assert result.statistic == pytest.approx(-0.5222329678670935)
    assert result.p_value == pytest.approx(0.6015, abs=1e-4)
    assert not result.significant and result.winner is None


def test_min_good_one_splits_more() -> None:
    # with 1 good word as boundary, "a x c y e" vs perfect gives two segments
    segs = segment_alignments(list("CSCSC"), list("CCCCC"), min_good=1)
    assert segs == [(3, 1, 0), (3, 1, 0)]  # [a x c] and [c y e]
    assert segment_alignments(list("CSCSC"), list("CCCCC"), min_good=2) == [(5, 2, 0)]
    with pytest.raises(ValueError, match="min_good"):
        segment_alignments(["C"], ["C"], min_good=0)


def test_identical_systems_are_not_different() -> None:
    refs = ["a b c d e", "f g h", "i j k l"]
    hyps = ["a x c d", "f g h i", "i j k l"]
    result = mapsswe(refs, hyps, hyps)
    assert all(s.diff == 0 for s in result.segments)
    # [a x c d] closes after c d; the final deletion of e opens [c d e]; then [g h +i]
    assert [s.ref_words for s in result.segments] == [4, 3, 2]
    assert result.statistic == 0.0 and result.p_value == 1.0
    assert not result.significant and result.winner is None
    # no errors at all: no segments, nothing to test
    empty = mapsswe(refs, refs, refs)
    assert empty.segments == () and empty.p_value == 1.0 and not empty.significant


def clearly_better_data() -> tuple[list[str], list[str], list[str]]:
    refs, hyps_a, hyps_b = [], [], []
    for k in range(23):
        words = [f"w{k}_{i}" for i in range(8)]
        refs.append(" ".join(words))
        a, b = list(words), list(words)
        if k < 20:
            b[4] = "oops"  # B errs in 20 utterances
        else:
            a[4] = "oops"  # A errs in 3
        hyps_a.append(" ".join(a))
        hyps_b.append(" ".join(b))
    return refs, hyps_a, hyps_b


def test_clearly_better_system_is_significant() -> None:
    refs, hyps_a, hyps_b = clearly_better_data()
    result = mapsswe(refs, hyps_a, hyps_b)
    diffs = [-1] * 20 + [1] * 3
    mu = sum(diffs) / 23
    sigma = math.sqrt(sum((d - mu) ** 2 for d in diffs) / 22)
    w = mu / (sigma / math.sqrt(23))  # about -5.147
    assert [s.diff for s in result.segments] == diffs
    assert result.statistic == pytest.approx(w)
    assert result.statistic < -5
    assert result.p_value == pytest.approx(math.erfc(abs(w) / math.sqrt(2)))
    assert result.p_value < 1e-6
    assert result.significant and result.winner == "A"
    # swapping the systems flips the sign and the winner
    swapped = mapsswe(refs, hyps_b, hyps_a)
    assert swapped.statistic == pytest.approx(-w) and swapped.winner == "B"


def test_zero_variance() -> None:
    refs = [f"a{k} b{k} c{k} d{k}" for k in range(10)]
    worse = [f"a{k} x c{k} d{k}" for k in range(10)]
    result = mapsswe(refs, refs, worse)  # A always one error better
    assert result.std == 0.0 and result.mean_diff == -1.0
    assert result.statistic == -math.inf and result.p_value == 0.0
    assert result.significant and result.winner == "A"
    strict = mapsswe(refs, refs, worse, strict_sctk=True)  # sc_stats sets Z = 0
    assert strict.statistic == 0.0 and strict.p_value == 1.0 and not strict.significant
    # a single segment cannot be tested
    one = mapsswe(refs[:1], refs[:1], worse[:1])
    assert one.n_segments == 1 and one.p_value == 1.0 and not one.significant


def test_trailing_insertions_of_b() -> None:
    # sc_stats' loop ends with A's alignment, so B's trailing insertion is lost there
    assert mapsswe(["a b"], ["a b"], ["a b z"]).segments == (Segment(0, 2, 0, 1),)
    assert mapsswe(["a b"], ["a b"], ["a b z"], strict_sctk=True).segments == ()
    # A's trailing insertion counts in both modes
    for strict in (False, True):
        assert mapsswe(["a b"], ["a b z"], ["a b"], strict_sctk=strict).segments == (Segment(0, 2, 1, 0),)
    # empty reference: insertions only
    assert mapsswe([""], [""], ["x y"]).segments == (Segment(0, 0, 0, 2),)


def test_default_mode_is_antisymmetric() -> None:
    rng = random.Random(7)
    refs, hyps_a, hyps_b = [], [], []
    for _ in range(60):
        ref = [rng.choice("abcdefgh") for _ in range(rng.randint(0, 10))]
        refs.append(ref)
        for hyps in (hyps_a, hyps_b):
            hyp = [w if rng.random() < 0.8 else rng.choice("abcdefghxy") for w in ref]
            if rng.random() < 0.3:
                hyp.append("z")
            hyps.append(hyp)
    ab, ba = mapsswe(refs, hyps_a, hyps_b), mapsswe(refs, hyps_b, hyps_a)
    assert [(s.utterance, s.errors_a, s.errors_b) for s in ab.segments] == [
        (s.utterance, s.errors_b, s.errors_a) for s in ba.segments]
    assert ab.statistic == pytest.approx(-ba.statistic)
    assert ab.p_value == pytest.approx(ba.p_value)
    # every error of both systems lands in exactly one segment
    assert sum(s.errors_a for s in ab.segments) == sum(
        sum(op != "C" for _, _, op in align(r, h)) for r, h in zip(refs, hyps_a, strict=True))


def test_input_checks() -> None:
    with pytest.raises(ValueError, match="one hypothesis per reference"):
        mapsswe(["a"], ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="alpha"):
        mapsswe(["a"], ["a"], ["a"], alpha=1.5)
    with pytest.raises(ValueError, match="different reference words"):
        mapsswe_alignments([align("a b", "a b")], [align("a c", "a c")])
