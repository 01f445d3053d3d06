"""MAPSSWE: segmentation traced by hand through sc_stats' state machine, and the statistic."""

from __future__ import annotations

import math
import random
from pathlib import Path

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
    # sc_stats' loop ends with A's alignment, but B's slots left over close a last segment
    # running to the end of both alignments (SCTK mtchprs.c since 2007), in both modes
    for strict in (False, True):
        assert mapsswe(["a b"], ["a b"], ["a b z"], strict_sctk=strict).segments == (Segment(0, 2, 0, 1),)
        assert mapsswe(["a b"], ["a b z"], ["a b"], strict_sctk=strict).segments == (Segment(0, 2, 1, 0),)
        # an open error region of A at the end takes B's trailing insertion along
        assert mapsswe(["a b c"], ["a b x"], ["a b c z"], strict_sctk=strict).segments == (Segment(0, 3, 1, 1),)
        # empty reference: insertions only
        assert mapsswe([""], [""], ["x y"], strict_sctk=strict).segments == (Segment(0, 0, 0, 2),)


# Reference, system A, system B; scored by sclite and sc_stats built from usnistgov/SCTK
# (src/sclite, mtchprs.c as in 2.4.10-2.4.12) with the "Segment size Report" block of
# evaluate_SEG switched on:
#   sclite -r ref.trn trn -h A.trn trn A -i spu_id -o sgml; (same for B)
#   cat A.trn.sgml B.trn.sgml | sc_stats -p -t mapsswe -v -n out
SC_STATS_CASES = [
    ("e e", "e e", "e e"),
    ("f g b b", "y f g b b", "x f z b b y"),
    ("b c f d", "b c f d", "c f d"),
    ("b f g e c c", "z b f g x c", "b y y x e x y c y"),
    ("d d d g e d f", "z d d g e d", "y d g e d z"),
    ("f d c", "f d c", "f z d c y"),
    ("f f a a", "f f x a", "f x f a a z"),
    ("d c", "d c z", "x c"),
    ("f b a f d", "z z a f x z", "y a f d"),
    ("b c g", "b g", "b x"),
    ("g", "g", "g x"),
    ("a", "z", ""),
    ("a c d", "a c d", "a c d"),
    ("d a c f d", "d y c f d", "d a c z d y"),
    ("g", "x g x y", "g"),
    ("g g a", "a y", "g a"),
    ("e", "e", "e"),
    ("c c e d", "z e d z", "c c e d"),
    ("e f g b", "e f z b", "e y y x b"),
    ("d f e b d e", "z f y x d e", "d f e y e"),
    ("g c a", "g c y a z", "y c"),
    ("c a e f c", "c a e x z", "c y a e f z z"),
    ("f f f", "f f f z", "f f f x z"),
    ("g e c c d d", "g e c d x", "g x c c d d y"),
]
# sc_stats' segments (#ref, errors A, errors B) in order, and its
# "MTCH_PR_RESULTS ... (# segs: 28) (mean: -0.214) (std dev: 1.315) (Z Stat: -0.862) (Stat Diff: No)"
SC_STATS_SEGMENTS = [
    (4, 1, 2), (2, 0, 1), (3, 0, 1), (6, 3, 6), (4, 1, 2), (3, 1, 1), (3, 0, 1), (2, 0, 1), (4, 1, 2),
    (2, 1, 1), (4, 2, 2), (3, 2, 0), (3, 1, 2), (1, 0, 1), (1, 1, 1), (5, 1, 2), (1, 3, 0), (3, 3, 1),
    (4, 2, 0), (2, 1, 0), (4, 1, 3), (6, 3, 2), (3, 2, 2), (3, 0, 1), (4, 2, 2), (2, 1, 2), (5, 1, 1),
    (3, 1, 1),
]


@pytest.mark.parametrize("strict", [False, True])
def test_segments_match_sc_stats(strict: bool) -> None:
    refs, hyps_a, hyps_b = (list(col) for col in zip(*SC_STATS_CASES, strict=True))
    result = mapsswe(refs, hyps_a, hyps_b, strict_sctk=strict)
    assert [(s.ref_words, s.errors_a, s.errors_b) for s in result.segments] == SC_STATS_SEGMENTS
    assert sum(s.ref_words for s in result.segments) == 90  # sc_stats' "Totals 90 35 41"
    assert result.mean_diff == pytest.approx(-0.214, abs=5e-4)
    assert result.std == pytest.approx(1.315, abs=5e-4)
    assert result.statistic == pytest.approx(-0.862, abs=5e-4)
    assert not result.significant


@pytest.mark.parametrize("strict", [False, True])
def test_segmentation_is_antisymmetric(strict: bool) -> None:
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
    ab, ba = mapsswe(refs, hyps_a, hyps_b, strict_sctk=strict), mapsswe(refs, hyps_b, hyps_a, strict_sctk=strict)
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


SWBD = Path(__file__).resolve().parents[1].parent / "shared/data/nbest/hyporadise/test_swbd.json"


@pytest.mark.skipif(not SWBD.is_file(), reason="HyPoradise SWBD lists not found at ../shared/data/nbest/hyporadise")
@pytest.mark.parametrize("strict", [False, True])
def test_swbd_matches_sc_stats(strict: bool) -> None:
    """SWBD 5-best lists, top-1 (A) vs second hypothesis (B), default Normalizer. sc_stats (SCTK source, as
    above) on the same transcripts: "(# segs: 3401) (mean: -0.067) (std dev: 0.975) (Z Stat: -4.029)"; the
    same with the systems swapped, Z = 4.029. (The old strict mode dropped B's trailing insertions: 3391, 3388.)"""
    from evaluators.nbest import read_hyporadise
    from evaluators.normalize import Normalizer

    norm = Normalizer()
    lists = read_hyporadise(SWBD)
    refs = [norm(nb.reference) for nb in lists]
    top = [norm(nb.hypotheses[0]) for nb in lists]
    second = [norm(nb.hypotheses[min(1, len(nb.hypotheses) - 1)]) for nb in lists]
    for a, b, sign in ((top, second, -1), (second, top, 1)):
        result = mapsswe(refs, a, b, strict_sctk=strict)
        assert result.n_segments == 3401
        assert result.mean_diff == pytest.approx(sign * 0.067, abs=5e-4)
        assert result.std == pytest.approx(0.975, abs=5e-4)
        assert result.statistic == pytest.approx(sign * 4.029, abs=5e-4)
