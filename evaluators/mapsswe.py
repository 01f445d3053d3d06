"""Matched-Pair Sentence-Segment Word Error (MAPSSWE) test, as NIST ``sc_stats -t mapsswe`` runs it.

Gillick & Cox (1989), "Some statistical issues in the comparison of speech recognition
algorithms"; Pallett et al. (1990), "Tools for the analysis of benchmark speech
recognition tests". Ported from ``usnistgov/SCTK``: ``src/sclite/mtchprs.c``
(``do_mtch_pairs_on_sys``, ``test_comp_sents``, ``count_seg``, ``seg_count``,
``analyze_Z_score``) and ``src/sclite/statdist.c`` (``calc_mean_var_std_dev_Zstat``,
``Z_pass``); ``src/sclite/sc_stats.c`` calls it with a minimum of 2 good words.

Segmentation (per utterance, both systems aligned to the same reference with
:func:`evaluators.wer.align`)
    The two alignments are walked in step over the reference words; insertions in
    either are skipped over and mark an error region. A word is *good* when both systems
    have it correct. A segment is closed once ``min_good`` consecutive good words follow
    an error region (an insertion in between restarts the count). The segment runs from
    ``min_good - 1`` words before the last good word preceding the errors (clipped to
    the utterance start) through the closing good run, so neighbouring segments share
    their boundary words; those are correct and add no errors. The walk ends with
    system A's alignment; an error region still open there, or slots of system B left
    over (B's trailing insertions), form a last segment that runs to the end of both
    alignments (sc_stats' test since SCTK's 2007 fix "insertions at the end of sys2's
    segments were skipped", in every release since, 2.4.10 included). So every error
    of both systems lands in exactly one segment and the segmentation does not depend
    on which system is A. Per segment, each system's error count is its number of
    non-correct alignment slots (S + D + I) in the span, the reference size is
    ``(ref_a + ref_b) // 2`` and segments where neither system errs are dropped, all as
    in ``count_seg``. Checked segment by segment against sc_stats built from SCTK's
    source (``tests/test_mapsswe.py``), and on the HyPoradise n-best lists (SWBD
    top-1 vs second hypothesis: 3401 segments, Z = -4.029 in both).

Statistic
    ``Z_i = errors_A,i - errors_B,i``; ``mu`` = mean, ``sigma^2`` = variance with
    divisor ``n - 1`` (SCTK's divisor since 1992), ``W = mu / (sigma / sqrt(n))``,
    two-sided p-value ``2 * (1 - Phi(|W|))`` from the standard normal (sc_stats'
    ``conf``). Significant when ``p < alpha``; the winner is the system with fewer
    errors (``mu < 0`` -> ``'A'``), only reported when significant.

Where this differs from sc_stats (``strict_sctk=False``, the default)
    1. Zero variance with ``n >= 2`` segments: sc_stats sets ``Z = 0`` (no
       difference). Here ``W = +-inf`` and ``p = 0`` when every segment has the same
       non-zero difference, and ``W = 0``, ``p = 1`` when all differences are 0.
    2. Significance: sc_stats tests ``|Z| > 1.960`` (its 95% table entry), here
       ``p < alpha``; these disagree only for ``1.95996 < |Z| <= 1.960`` at alpha 0.05.
    ``strict_sctk=True`` reproduces 1 as sc_stats does (the segmentation is the same in
    both modes). Not ported: sc_stats' re-synchronisation of references with
    alternations ``{a / b}`` (references here are plain word lists and must be identical
    for both systems), and matching of utterances by speaker and id (inputs here are
    parallel lists). Fewer than 2 segments give ``W = 0``, ``p = 1`` in both modes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from evaluators.wer import AlignedPair, Words, align

DEFAULT_MIN_GOOD = 2  # sc_stats: do_mtch_pairs(scor, nscor, "2", ...)


@dataclass(frozen=True)
class Segment:
    """One matched-pair segment: where it is, its size and each system's errors."""

    utterance: int
    ref_words: int
    errors_a: int
    errors_b: int

    @property
    def diff(self) -> int:
        """Z_i = errors of A minus errors of B."""
        return self.errors_a - self.errors_b


@dataclass(frozen=True)
class MapssweResult:
    """Outcome of :func:`mapsswe`. ``statistic`` is W; ``winner`` is ``'A'``, ``'B'`` or None."""

    segments: tuple[Segment, ...]
    mean_diff: float
    std: float
    statistic: float
    p_value: float
    significant: bool
    winner: str | None

    @property
    def n_segments(self) -> int:
        """Number of segments that entered the test."""
        return len(self.segments)


def _span_counts(ops: Sequence[str], begin: int, end: int) -> tuple[int, int]:
    """(errors, reference words) of ``ops[begin..end]`` inclusive, as ``seg_count``."""
    span = ops[max(begin, 0) : end + 1]
    return sum(op != "C" for op in span), sum(op != "I" for op in span)


def segment_alignments(
    ops_a: Sequence[str], ops_b: Sequence[str], min_good: int = DEFAULT_MIN_GOOD
) -> list[tuple[int, int, int]]:
    """Split one utterance's pair of alignments into segments (port of ``test_comp_sents``).

    ``ops_a`` / ``ops_b`` are the op strings (``'C'``, ``'S'``, ``'D'``, ``'I'``) of the
    two systems' alignments against the same reference. Returns ``(ref_words, errors_a,
    errors_b)`` per kept segment. See the module docstring for the rules.
    """
    if min_good < 1:
        raise ValueError(f"min_good must be >= 1, got {min_good}")
    n1, n2 = len(ops_a), len(ops_b)
    i1 = i2 = 0
    eog1 = eog2 = 0  # last good position (end of good) of each alignment
    num_good = 0
    state = "b"  # b: between segments, e: in an error region, g: counting good words
    raw: list[tuple[int, int, int, int]] = []

    while i1 < n1:  # as sc_stats: the walk ends with A's alignment
        while i1 < n1 and ops_a[i1] == "I":
            i1, state = i1 + 1, "e"
        while i2 < n2 and ops_b[i2] == "I":
            i2, state = i2 + 1, "e"
        good = i1 < n1 and ops_a[i1] == "C" and i2 < n2 and ops_b[i2] == "C"
        if state == "b":
            if good:
                eog1, eog2 = i1, i2
            else:
                state = "e"
        elif good:  # state 'e' or 'g'
            num_good = 1 if state == "e" else num_good + 1
            if num_good == min_good:
                raw.append((eog1 - (min_good - 1), eog2 - (min_good - 1), i1, i2))
                eog1, eog2, state = i1, i2, "b"
            else:
                state = "g"
        else:
            state = "e"
        if i1 < n1:
            i1 += 1
        if i2 < n2:
            i2 += 1
    if state != "b" or i2 < n2:  # an open segment, or B's trailing insertions, run to the end
        raw.append((eog1 - (min_good - 1), eog2 - (min_good - 1), n1 - 1, n2 - 1))

    segments = []
    for beg1, beg2, end1, end2 in raw:
        err1, ref1 = _span_counts(ops_a, beg1, end1)
        err2, ref2 = _span_counts(ops_b, beg2, end2)
        if err1 or err2:  # count_seg drops error-free segments
            segments.append(((ref1 + ref2) // 2, err1, err2))
    return segments


def _ref_words(alignment: Sequence[AlignedPair]) -> list[str | None]:
    return [ref for ref, _, op in alignment if op != "I"]


def mapsswe_alignments(
    alignments_a: Sequence[Sequence[AlignedPair]],
    alignments_b: Sequence[Sequence[AlignedPair]],
    min_good: int = DEFAULT_MIN_GOOD,
    alpha: float = 0.05,
    strict_sctk: bool = False,
) -> MapssweResult:
    """MAPSSWE on precomputed per-utterance alignments (from :func:`evaluators.wer.align`).

    Utterance ``k`` of both systems must be aligned against the same reference words.
    """
    if len(alignments_a) != len(alignments_b):
        raise ValueError(f"{len(alignments_a)} utterances for A but {len(alignments_b)} for B")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    segments: list[Segment] = []
    for utt, (ali_a, ali_b) in enumerate(zip(alignments_a, alignments_b, strict=True)):
        if _ref_words(ali_a) != _ref_words(ali_b):
            raise ValueError(f"utterance {utt}: the two alignments have different reference words")
        ops_a = [op for _, _, op in ali_a]
        ops_b = [op for _, _, op in ali_b]
        segments.extend(Segment(utt, *counts) for counts in segment_alignments(ops_a, ops_b, min_good))

    diffs = [seg.diff for seg in segments]
    n = len(diffs)
    mean = sum(diffs) / n if n else 0.0
    sq = sum((d - mean) ** 2 for d in diffs)
    if n < 2:  # the n-1 variance is undefined: nothing to test
        std, statistic = 0.0, 0.0
    elif sq == 0.0:
        std = 0.0
        # every segment differs by the same amount: sc_stats gives up (Z = 0); a
        # constant non-zero difference is the strongest possible evidence otherwise
        statistic = 0.0 if strict_sctk or mean == 0.0 else math.copysign(math.inf, mean)
    else:
        std = math.sqrt(sq / (n - 1))
        statistic = mean / (std / math.sqrt(n))
    p_value = math.erfc(abs(statistic) / math.sqrt(2.0))  # 2 * (1 - Phi(|W|))
    significant = p_value < alpha
    winner = ("A" if mean < 0 else "B") if significant else None
    return MapssweResult(tuple(segments), mean, std, statistic, p_value, significant, winner)


def mapsswe(
    refs: Sequence[Words],
    hyps_a: Sequence[Words],
    hyps_b: Sequence[Words],
    min_good: int = DEFAULT_MIN_GOOD,
    alpha: float = 0.05,
    strict_sctk: bool = False,
) -> MapssweResult:
    """Run the MAPSSWE test of system A against system B on parallel utterance lists.

    Each of ``refs``, ``hyps_a``, ``hyps_b`` holds one transcript per utterance (a string
    split on whitespace, or a word list); normalize them beforehand. Both systems are
    aligned to the references with sclite's costs, then :func:`mapsswe_alignments` runs.
    ``min_good`` is the number of words both systems get right that bounds a segment
    (sc_stats uses 2); ``strict_sctk`` is explained in the module docstring.
    """
    if not len(refs) == len(hyps_a) == len(hyps_b):
        raise ValueError(f"need one hypothesis per reference: {len(refs)} refs, "
                         f"{len(hyps_a)} A hyps, {len(hyps_b)} B hyps")
    alignments_a = [align(ref, hyp) for ref, hyp in zip(refs, hyps_a, strict=True)]
    alignments_b = [align(ref, hyp) for ref, hyp in zip(refs, hyps_b, strict=True)]
    return mapsswe_alignments(alignments_a, alignments_b, min_good, alpha, strict_sctk)
