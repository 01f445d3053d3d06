"""Word error rate counted the way NIST ``sclite`` (SCTK) counts it.

Alignment
---------
A reference word list is aligned to a hypothesis word list by a weighted Levenshtein
dynamic program with sclite's default word costs, taken from ``wwd_WORD`` in
``usnistgov/SCTK:src/sclite/word.c``::

    0 -> correct          3 -> deletion or insertion          4 -> substitution

(The same function also gives 0.001 to inserting/deleting the null word ``@`` and 2 to
optionally deletable ``(words)``; neither notation is supported here, words are plain
strings compared exactly.)

Ties between equally cheap alignments are broken as in ``calculate_internal_cells`` of
``usnistgov/SCTK:src/sclite/net_dp.c``, where the reference is network A and the
hypothesis network B (``Network_dpalign(refnet, hypnet, wwd_WORD, ...)`` in
``src/sclite/align.c``). At every cell (i ref words, j hyp words)::

    if sub <= del and sub <= ins:  take the diagonal (correct or substitution)
    elif del < ins:                take the deletion
    else:                          take the insertion   (a del/ins tie goes to insertion)

The first row is all insertions, the first column all deletions, and the back-trace
starts from the cell that has consumed both word lists. Because the costs are 4/3/3
rather than 1/1/1, the cheapest alignment can hold *more* errors than the unit-cost edit
distance (``p q r a b`` vs ``a b s t u``: 3 deletions + 3 insertions cost 18 < 5
substitutions at 20), and sclite reports those 6 errors, so this module does too.

Differences from a full sclite run: no case folding (sclite lowercases unless ``-i``
case-sensitive scoring is asked for; use :class:`evaluators.normalize.Normalizer`), no
alternations ``{a / b}``, no optionally deletable words, no fragment matching.

WER is ``(S + D + I) / N_ref``. For an empty reference sclite still reports the errors
against 0 reference words; :attr:`ErrorCounts.wer` returns ``inf`` when there are errors
and ``0.0`` when there are none.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

CORRECT_COST = 0
SUBSTITUTION_COST = 4
INSERTION_COST = 3
DELETION_COST = 3

Words = str | Sequence[str]
AlignedPair = tuple[str | None, str | None, str]

# back-pointer codes for the DP table
_DIAG, _DEL, _INS = 0, 1, 2


@dataclass(frozen=True)
class ErrorCounts:
    """Word counts of one or more aligned utterances (sclite's Corr/Sub/Del/Ins)."""

    ref_words: int = 0
    correct: int = 0
    substitutions: int = 0
    deletions: int = 0
    insertions: int = 0

    @property
    def errors(self) -> int:
        """S + D + I."""
        return self.substitutions + self.deletions + self.insertions

    @property
    def hyp_words(self) -> int:
        """Number of hypothesis words: C + S + I."""
        return self.correct + self.substitutions + self.insertions

    @property
    def wer(self) -> float:
        """(S + D + I) / N_ref; ``inf`` for errors against an empty reference, 0 if neither."""
        if self.ref_words == 0:
            return 0.0 if self.errors == 0 else math.inf
        return self.errors / self.ref_words

    def __add__(self, other: object) -> ErrorCounts:
        if not isinstance(other, ErrorCounts):
            return NotImplemented
        return ErrorCounts(
            self.ref_words + other.ref_words,
            self.correct + other.correct,
            self.substitutions + other.substitutions,
            self.deletions + other.deletions,
            self.insertions + other.insertions,
        )

    def __radd__(self, other: object) -> ErrorCounts:
        # lets the builtin sum() start from its default 0
        if other == 0:
            return self
        return NotImplemented

    @classmethod
    def from_alignment(cls, alignment: Iterable[AlignedPair]) -> ErrorCounts:
        """Count the ops of an alignment made by :func:`align`."""
        tally = {"C": 0, "S": 0, "D": 0, "I": 0}
        for _, _, op in alignment:
            tally[op] += 1
        return cls(
            ref_words=tally["C"] + tally["S"] + tally["D"],
            correct=tally["C"],
            substitutions=tally["S"],
            deletions=tally["D"],
            insertions=tally["I"],
        )


def _words(text: Words, normalizer: Callable[[str], list[str]] | None = None) -> list[str]:
    if isinstance(text, str):
        return normalizer(text) if normalizer is not None else text.split()
    return list(text)


def align(ref: Words, hyp: Words) -> list[AlignedPair]:
    """Align ``ref`` to ``hyp`` with sclite's 0/4/3/3 costs and tie-breaking.

    ``ref`` and ``hyp`` are strings (split on whitespace) or word sequences. Returns one
    ``(ref_word, hyp_word, op)`` per alignment slot in order, ``op`` being ``'C'``
    (correct), ``'S'`` (substitution), ``'D'`` (deletion: hyp_word is None) or ``'I'``
    (insertion: ref_word is None).
    """
    r, h = _words(ref), _words(hyp)
    n, m = len(r), len(h)
    # Only the previous row of costs is needed; back-pointers are kept for the whole
    # table (one byte per cell) to trace the chosen path.
    prev = [INSERTION_COST * j for j in range(m + 1)]
    back = [bytearray([_INS]) * (m + 1)]
    for i in range(1, n + 1):
        cur = [prev[0] + DELETION_COST] + [0] * m
        row = bytearray(m + 1)
        row[0] = _DEL
        ref_word = r[i - 1]
        for j in range(1, m + 1):
            sub = prev[j - 1] + (CORRECT_COST if ref_word == h[j - 1] else SUBSTITUTION_COST)
            dele = prev[j] + DELETION_COST
            ins = cur[j - 1] + INSERTION_COST
            # the order of these tests is sclite's tie-breaking (net_dp.c)
            if sub <= dele and sub <= ins:
                cur[j], row[j] = sub, _DIAG
            elif dele < ins:
                cur[j], row[j] = dele, _DEL
            else:
                cur[j], row[j] = ins, _INS
        back.append(row)
        prev = cur

    out: list[AlignedPair] = []
    i, j = n, m
    while i > 0 or j > 0:
        step = back[i][j]
        if step == _INS:
            out.append((None, h[j - 1], "I"))
            j -= 1
        elif step == _DEL:
            out.append((r[i - 1], None, "D"))
            i -= 1
        else:
            out.append((r[i - 1], h[j - 1], "C" if r[i - 1] == h[j - 1] else "S"))
            i -= 1
            j -= 1
    out.reverse()
    return out


def alignment_cost(alignment: Iterable[AlignedPair]) -> int:
    """Total sclite cost (0/4/3/3) of an alignment."""
    cost = {"C": CORRECT_COST, "S": SUBSTITUTION_COST, "D": DELETION_COST, "I": INSERTION_COST}
    return sum(cost[op] for _, _, op in alignment)


def score_utterance(ref: Words, hyp: Words, normalizer: Callable[[str], list[str]] | None = None) -> ErrorCounts:
    """Error counts of one hypothesis against its reference.

    ``normalizer`` (e.g. a :class:`~evaluators.normalize.Normalizer`) is applied to string
    inputs; without it strings are split on whitespace and compared exactly.
    """
    return ErrorCounts.from_alignment(align(_words(ref, normalizer), _words(hyp, normalizer)))


def corpus_wer(
    pairs: Iterable[tuple[Words, Words]], normalizer: Callable[[str], list[str]] | None = None
) -> tuple[ErrorCounts, list[ErrorCounts]]:
    """Score ``(reference, hypothesis)`` pairs; return the summed counts and the per-utterance counts.

    The corpus WER is ``total.wer``: errors and reference words are summed first, as
    sclite does, rather than averaging per-utterance rates.
    """
    per_utt = [score_utterance(ref, hyp, normalizer) for ref, hyp in pairs]
    return sum(per_utt, ErrorCounts()), per_utt
