"""N-best rescoring with a language model, weights tuned on a dev part, WER per part.

LM scores (:func:`lm_logprobs`, :func:`score_sentences`)
    ``log P(w_1 .. w_n <eos> | <eos>)`` in nats: the sentence is preceded by ``<eos>``
    as its start context and the final ``<eos>`` is scored, as in
    :mod:`evaluators.perplexity`. Words outside the vocabulary become ``<unk>`` (counted).
    Identical word sequences are scored once (the WSJ 5-best lists hold about 2 distinct
    strings per 5), the rest are sorted by length and batched across hypotheses and
    utterances with right padding; padded positions are masked out of the sums. An LSTM
    starts every sentence from the zero state. A Transformer scores sentences longer than
    its context with sliding windows exactly as the perplexity evaluator does (each
    window after the first scores only its last ``stride`` tokens).

Combined score of hypothesis ``k`` (:func:`rescore`)::

    total = asr + lm_weight * logP_LM(hyp) + ins_penalty * n_words

``n_words`` is the number of words the LM scored (the tokenizer's output, no
``<eos>``). ``asr`` comes from the list, first that applies:

- ``scores`` (HyPoradise WSJ, JSONL ``scores``): used as is, higher is better;
- ``am_scores`` / ``lm_scores`` (Kaldi costs, lower is better):
  ``asr = -(am + old_lm_weight * lm_old)``, a missing one counting 0;
- nothing (swbd, chime4, LibriSpeech): the rank prior ``asr = -rank_weight * k`` with
  ``k = 0`` for the first hypothesis. ``rank_weight`` is fixed (default 1) rather than
  tuned: the arg max is unchanged when all three weights are scaled together, so tuning
  ``lm_weight`` and ``ins_penalty`` over a wide grid already covers every ratio.

The best total wins; equal totals go to the earlier (higher-ranked) hypothesis.
:func:`tune_weights` tries every grid point on the dev lists and keeps the one with the
fewest dev errors (the reference word count is fixed, so this is the lowest WER); ties
go to the smallest ``lm_weight``, then the smallest ``|ins_penalty|``, then the more
negative penalty. WER is counted by :mod:`evaluators.wer` after ``normalizer``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from evaluators.mapsswe import MapssweResult, mapsswe
from evaluators.nbest import NBestList, dev_test_split
from evaluators.wer import ErrorCounts, score_utterance
from nas.core.data import UNK, DataError, Vocabulary
from nas.core.errors import UsageError

Tokenizer = Callable[[str], list[str]]

# 1-2-5 steps from 1e-4 to 10: the WSJ scores are length-normalised (hypotheses differ by
# ~0.01) while LM log-probabilities differ by nats, and rank-prior lists sit at the other
# end; 17 x 33 points take well under a second to search.
_STEPS = tuple(round(m * 10.0**e, 6) for e in range(-4, 1) for m in (1, 2, 5)) + (10.0,)
DEFAULT_LM_WEIGHTS: tuple[float, ...] = (0.0, *_STEPS)
DEFAULT_INS_PENALTIES: tuple[float, ...] = (0.0, *_STEPS, *(-s for s in _STEPS))
DEFAULT_RANK_WEIGHT = 1.0
DEFAULT_OLD_LM_WEIGHT = 1.0
DEFAULT_STRIDE = 32  # the perplexity evaluator's default window stride


@dataclass(frozen=True)
class SentenceScores:
    """What :func:`score_sentences` returns; word counts include repeated sentences."""

    logprobs: list[float]  # one natural-log probability per input sentence
    sentences: int
    unique: int  # distinct word sequences actually run through the model
    words: int  # words scored, without the <eos> tokens
    unk_words: int  # of which mapped to <unk>
    seconds: float  # wall time of the whole call

    @property
    def unk_rate(self) -> float:
        """Fraction of scored words that were not in the vocabulary."""
        return self.unk_words / self.words if self.words else 0.0


def _as_vocab(vocab: Vocabulary | Sequence[str]) -> Vocabulary:
    return vocab if isinstance(vocab, Vocabulary) else Vocabulary(tuple(vocab))


def _encode(words: Sequence[str], index: dict[str, int], unk: int | None) -> tuple[list[int], int]:
    ids, n_unk = [], 0
    for word in words:
        i = index.get(word)
        if i is None:
            if unk is None:
                raise DataError(f"word {word!r} is not in the vocabulary, which has no {UNK}")
            i, n_unk = unk, n_unk + 1
        ids.append(i)
    return ids, n_unk


def _rows(encoded: list[list[int]], eos: int, context: int | None, stride: int
          ) -> list[tuple[int, list[int], list[int], int]]:
    """``(sentence, inputs, targets, first scored position)`` per model row."""
    rows = []
    for k, ids in enumerate(encoded):
        full = [eos, *ids, eos]
        n = len(full) - 1  # predictions
        if context is None or n <= context:
            rows.append((k, full[:-1], full[1:], 0))
            continue
        # the window layout of evaluators.perplexity._window_nll, on this sentence alone
        ends = list(range(context, n, stride))
        if ends[-1] != n:
            ends.append(n)
        previous = 0
        for end in ends:
            rows.append((k, full[end - context : end], full[end - context + 1 : end + 1], context - (end - previous)))
            previous = end
    return rows


def _run_rows(model: nn.Module, rows: list[tuple[int, list[int], list[int], int]], n_sentences: int, eos: int,
              batch_size: int, device: torch.device) -> list[float]:
    totals = [0.0] * n_sentences
    # sorting by length keeps the padding (and the LSTM's wasted time steps) small
    rows = sorted(rows, key=lambda row: len(row[1]))
    for begin in range(0, len(rows), batch_size):
        chunk = rows[begin : begin + batch_size]
        width = max(len(row[1]) for row in chunk)
        inputs = torch.full((len(chunk), width), eos, dtype=torch.long)
        targets = torch.full((len(chunk), width), eos, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.bool)
        for j, (_, inp, tgt, first) in enumerate(chunk):
            inputs[j, : len(inp)] = torch.tensor(inp)
            targets[j, : len(tgt)] = torch.tensor(tgt)
            mask[j, first : len(inp)] = True
        # causal models: right padding cannot change the scores of the real positions
        logits = model(inputs.to(device)).logits.float()
        nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.to(device).reshape(-1),
                              reduction="none").view(len(chunk), width).cpu()
        sums = nll.masked_fill(~mask, 0.0).double().sum(dim=1)
        for j, row in enumerate(chunk):
            totals[row[0]] -= float(sums[j])
    return totals


@torch.no_grad()
def score_sentences(model: nn.Module, sentences: Sequence[Sequence[str]], vocab: Vocabulary | Sequence[str], *,
                    batch_size: int = 64, device: torch.device | str | None = None,
                    stride: int = DEFAULT_STRIDE) -> SentenceScores:
    """LM log-probabilities of word sequences with dedup/unk/timing statistics (see module docstring)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    start = time.perf_counter()
    vocab = _as_vocab(vocab)
    index, unk, eos = vocab.index, vocab.unk_id, vocab.eos_id
    slots: dict[tuple[str, ...], int] = {}
    which = [slots.setdefault(tuple(words), len(slots)) for words in sentences]
    encoded, unk_counts = [], []
    for words in slots:
        ids, n_unk = _encode(words, index, unk)
        encoded.append(ids)
        unk_counts.append(n_unk)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    context = None if hasattr(model, "init_state") else int(model.config.context)
    stride = max(1, min(stride, context)) if context is not None else stride
    was_training = model.training
    model.eval()
    try:
        unique_scores = _run_rows(model, _rows(encoded, eos, context, stride), len(encoded), eos, batch_size, device)
    finally:
        model.train(was_training)
    return SentenceScores(
        logprobs=[unique_scores[k] for k in which], sentences=len(which), unique=len(encoded),
        words=sum(len(encoded[k]) for k in which), unk_words=sum(unk_counts[k] for k in which),
        seconds=time.perf_counter() - start)


def lm_logprobs(model: nn.Module, sentences: Sequence[Sequence[str]], vocab: Vocabulary | Sequence[str], *,
                batch_size: int = 64, device: torch.device | str | None = None,
                stride: int = DEFAULT_STRIDE) -> list[float]:
    """Natural-log ``P(words + <eos> | <eos>)`` of each sentence (a word list); OOV words score as ``<unk>``.

    ``stride`` only matters for Transformer sentences longer than the context.
    """
    return score_sentences(model, sentences, vocab, batch_size=batch_size, device=device, stride=stride).logprobs


def asr_scores(nbest: NBestList, *, rank_weight: float = DEFAULT_RANK_WEIGHT,
               old_lm_weight: float = DEFAULT_OLD_LM_WEIGHT) -> list[float]:
    """The first-pass score of each hypothesis (higher is better), as the module docstring defines it."""
    if nbest.scores is not None:
        return list(nbest.scores)
    if nbest.am_scores is not None or nbest.lm_scores is not None:
        zeros = [0.0] * len(nbest.hypotheses)
        am, lm = nbest.am_scores or zeros, nbest.lm_scores or zeros
        return [-(a + old_lm_weight * m) for a, m in zip(am, lm, strict=True)]
    return [-rank_weight * k for k in range(len(nbest.hypotheses))]


@dataclass(frozen=True)
class _Table:
    """Per-list features padded to the longest list; padding has ``base = -inf``."""

    base: np.ndarray
    lm: np.ndarray
    words: np.ndarray


def _table(lists: Sequence[NBestList], lm_scores: Sequence[Sequence[float]], tokenizer: Tokenizer,
           rank_weight: float, old_lm_weight: float) -> _Table:
    if len(lists) != len(lm_scores):
        raise ValueError(f"{len(lm_scores)} LM score lists for {len(lists)} n-best lists")
    width = max((len(nb.hypotheses) for nb in lists), default=1)
    base = np.full((len(lists), width), -np.inf)
    lm, words = np.zeros_like(base), np.zeros_like(base)
    for u, (nb, scores) in enumerate(zip(lists, lm_scores, strict=True)):
        n = len(nb.hypotheses)
        if len(scores) != n or not all(np.isfinite(scores)):
            raise ValueError(f"{nb.utt_id}: expected {n} finite LM scores, got {list(scores)}")
        base[u, :n] = asr_scores(nb, rank_weight=rank_weight, old_lm_weight=old_lm_weight)
        lm[u, :n] = scores
        words[u, :n] = [len(tokenizer(hyp)) for hyp in nb.hypotheses]
    return _Table(base, lm, words)


def _choose(table: _Table, lm_weight: float, ins_penalty: float) -> np.ndarray:
    # np.argmax returns the first maximum: ties go to the higher-ranked hypothesis
    return (table.base + lm_weight * table.lm + ins_penalty * table.words).argmax(axis=1)


def hypothesis_errors(lists: Sequence[NBestList], normalizer: Tokenizer | None = None) -> list[list[ErrorCounts]]:
    """sclite error counts of every hypothesis against its list's reference (``ValueError`` if none)."""
    out = []
    for nb in lists:
        if nb.reference is None:
            raise ValueError(f"{nb.utt_id}: no reference transcript, which WER needs")
        cache: dict[str, ErrorCounts] = {}  # repeated strings are aligned once
        for hyp in nb.hypotheses:
            if hyp not in cache:
                cache[hyp] = score_utterance(nb.reference, hyp, normalizer)
        out.append([cache[hyp] for hyp in nb.hypotheses])
    return out


def rescore(lists: Sequence[NBestList], lm_scores: Sequence[Sequence[float]], lm_weight: float,
            ins_penalty: float, *, normalizer: Tokenizer | None = None, rank_weight: float = DEFAULT_RANK_WEIGHT,
            old_lm_weight: float = DEFAULT_OLD_LM_WEIGHT) -> list[int]:
    """Index of the chosen hypothesis of each list (``normalizer`` gives ``n_words``; default: split)."""
    table = _table(lists, lm_scores, normalizer or str.split, rank_weight, old_lm_weight)
    return [int(k) for k in _choose(table, lm_weight, ins_penalty)]


def tune_weights(lists: Sequence[NBestList], lm_scores: Sequence[Sequence[float]],
                 lm_weights: Sequence[float] = DEFAULT_LM_WEIGHTS,
                 ins_penalties: Sequence[float] = DEFAULT_INS_PENALTIES, *, normalizer: Tokenizer | None = None,
                 rank_weight: float = DEFAULT_RANK_WEIGHT, old_lm_weight: float = DEFAULT_OLD_LM_WEIGHT,
                 errors: Sequence[Sequence[ErrorCounts]] | None = None) -> tuple[float, float]:
    """Grid search of ``(lm_weight, ins_penalty)`` minimising the corpus WER of ``lists`` (the dev part).

    Deterministic; ties as in the module docstring. ``errors`` may pass precomputed
    :func:`hypothesis_errors` of ``lists``.
    """
    weights = sorted(set(lm_weights))
    penalties = sorted(set(ins_penalties), key=lambda p: (abs(p), p))
    if not weights or not penalties:
        raise ValueError("the lm_weight and ins_penalty grids must not be empty")
    if not lists:
        if len(weights) == 1 and len(penalties) == 1:
            return weights[0], penalties[0]
        raise UsageError("no dev lists to tune on: give a dev part or a single lm weight and insertion penalty")
    table = _table(lists, lm_scores, normalizer or str.split, rank_weight, old_lm_weight)
    counts = errors if errors is not None else hypothesis_errors(lists, normalizer)
    err = np.zeros(table.base.shape, dtype=np.int64)
    for u, row in enumerate(counts):
        err[u, : len(row)] = [c.errors for c in row]
    rows = np.arange(len(lists))
    best: tuple[int, float, float] | None = None
    for lm_weight in weights:
        for ins_penalty in penalties:
            total = int(err[rows, _choose(table, lm_weight, ins_penalty)].sum())
            if best is None or total < best[0]:  # strict: the earlier grid point keeps a tie
                best = (total, lm_weight, ins_penalty)
    assert best is not None
    return best[1], best[2]


def summarize(counts: Sequence[ErrorCounts]) -> dict[str, float]:
    """WER (in percent, as sclite prints it) with S/D/I, reference words and utterances of one part."""
    total = sum(counts, ErrorCounts())
    return {"wer": 100.0 * total.wer, "sub": total.substitutions, "del": total.deletions,
            "ins": total.insertions, "errors": total.errors, "ref_words": total.ref_words,
            "utterances": len(counts)}


def _system(chosen: Sequence[int], errors: Sequence[Sequence[ErrorCounts]], n_dev: int,
            lm_weight: float | None, ins_penalty: float | None) -> dict[str, object]:
    per_utt = [errors[u][k] for u, k in enumerate(chosen)]
    return {"lm_weight": lm_weight, "ins_penalty": ins_penalty, "dev": summarize(per_utt[:n_dev]),
            "test": summarize(per_utt[n_dev:]), "chosen": list(chosen), "per_utt": per_utt}


def evaluate_nbest(model: nn.Module, vocab: Vocabulary | Sequence[str], lists: Sequence[NBestList], *,
                   dev_count: int | None = None, dev_fraction: float = 0.5, normalizer: Tokenizer | None = None,
                   lm_weights: Sequence[float] = DEFAULT_LM_WEIGHTS,
                   ins_penalties: Sequence[float] = DEFAULT_INS_PENALTIES, rank_weight: float = DEFAULT_RANK_WEIGHT,
                   old_lm_weight: float = DEFAULT_OLD_LM_WEIGHT, batch_size: int = 64,
                   device: torch.device | str | None = None) -> dict[str, object]:
    """Score every hypothesis with ``model``, tune on the dev part, report dev and test WER.

    The first ``dev_count`` lists (else ``floor(len * dev_fraction)``) are dev, the rest
    test. ``normalizer`` turns hypotheses into the words the LM scores and that WER
    counts (default: whitespace split). Returns a dict with systems ``lm`` (tuned),
    ``no_lm`` (lm_weight fixed 0, ins_penalty tuned), ``one_best`` (first hypothesis)
    and ``oracle`` (fewest errors), each holding ``lm_weight``, ``ins_penalty``, ``dev``
    and ``test`` summaries (:func:`summarize`), ``chosen`` indices and ``per_utt``
    :class:`ErrorCounts` over all lists; plus ``dev_count``, ``test_count``, ``hyps``,
    ``unique_hyps``, ``lm_seconds``, ``hyps_per_s``, ``lm_words``, ``unk_words``, ``unk_rate``.
    """
    if not lists:
        raise ValueError("no n-best lists to evaluate")
    tokenize = normalizer or str.split
    errors = hypothesis_errors(lists, normalizer)  # first: a missing reference fails before LM time
    n_dev = len(dev_test_split(lists, dev_fraction, dev_count)[0])
    scored = score_sentences(model, [tokenize(h) for nb in lists for h in nb.hypotheses], vocab,
                             batch_size=batch_size, device=device)
    lm_scores, offset = [], 0
    for nb in lists:
        lm_scores.append(scored.logprobs[offset : offset + len(nb.hypotheses)])
        offset += len(nb.hypotheses)
    common = {"normalizer": normalizer, "rank_weight": rank_weight, "old_lm_weight": old_lm_weight}

    def tuned(weights: Sequence[float]) -> dict[str, object]:
        lm_weight, ins_penalty = tune_weights(lists[:n_dev], lm_scores[:n_dev], weights, ins_penalties,
                                              errors=errors[:n_dev], **common)
        chosen = rescore(lists, lm_scores, lm_weight, ins_penalty, **common)
        return _system(chosen, errors, n_dev, lm_weight, ins_penalty)

    oracle = [min(range(len(row)), key=lambda k, row=row: row[k].errors) for row in errors]
    return {
        "lm": tuned(lm_weights), "no_lm": tuned([0.0]),
        "one_best": _system([0] * len(lists), errors, n_dev, None, None),
        "oracle": _system(oracle, errors, n_dev, None, None),
        "dev_count": n_dev, "test_count": len(lists) - n_dev, "hyps": scored.sentences,
        "unique_hyps": scored.unique, "lm_seconds": scored.seconds,
        "hyps_per_s": scored.sentences / scored.seconds if scored.seconds > 0 else float("inf"),
        "lm_words": scored.words, "unk_words": scored.unk_words, "unk_rate": scored.unk_rate,
    }


def compare_chosen(lists: Sequence[NBestList], chosen_a: Sequence[int], chosen_b: Sequence[int], *,
                   normalizer: Tokenizer | None = None, alpha: float = 0.05) -> MapssweResult:
    """MAPSSWE test (system A vs B) between two choices of hypotheses over the same ``lists``."""
    tokenize = normalizer or str.split
    refs = [tokenize(nb.reference or "") for nb in lists]
    hyps_a = [tokenize(nb.hypotheses[k]) for nb, k in zip(lists, chosen_a, strict=True)]
    hyps_b = [tokenize(nb.hypotheses[k]) for nb, k in zip(lists, chosen_b, strict=True)]
    return mapsswe(refs, hyps_a, hyps_b, alpha=alpha)


def jsonable(result: dict[str, object]) -> dict[str, object]:
    """``result`` of :func:`evaluate_nbest` without the per-utterance :class:`ErrorCounts` (for JSON)."""
    return {key: ({k: v for k, v in value.items() if k != "per_utt"} if isinstance(value, dict) else value)
            for key, value in result.items()}
