"""Human-readable accounts of a corpus: per-split counts, and how two vocabularies differ."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from nas.core.data import BOM, EOS, SPLITS, UNK, Corpus, count_noun


def corpus_summary(corpus: Corpus, max_words: int = 20) -> dict[str, Any]:
    """Per-split counts as a plain, JSON-ready dict.

    ``splits[name]`` holds ``tokens`` (``<eos>`` included), ``lines``, ``blank_lines``,
    ``types`` (distinct words of the text, ``<eos>`` included), ``unk`` (``<unk>`` tokens
    after mapping) and ``unk_rate``, ``oov_tokens`` / ``oov_types`` (words not in the
    training vocabulary, mapped to ``<unk>``) and ``oov_words``: the ``max_words`` most
    frequent of them with counts (ties in order of first appearance). Counts that a
    corpus built without :func:`load_corpus` does not know are ``None``.
    """
    splits: dict[str, dict[str, Any]] = {}
    unk_id = corpus.vocab.unk_id
    for name in SPLITS:
        stream = corpus.split(name)
        stat = corpus.stats.get(name)
        tokens = stream.numel()
        unk = int((stream == unk_id).sum()) if unk_id is not None else 0
        entry: dict[str, Any] = {
            "file": stat.file if stat else None,
            "tokens": tokens,
            "lines": stat.lines if stat else None,
            "blank_lines": stat.blank_lines if stat else None,
            "types": stat.types if stat else None,
            "unk": unk,
            "unk_rate": unk / tokens if tokens else 0.0,
            "oov_tokens": stat.oov_tokens if stat else None,
            "oov_types": len(stat.oov_words) if stat else None,
            "oov_words": dict(stat.oov_words[:max_words]) if stat else None,
        }
        splits[name] = entry
    return {"folder": str(corpus.folder), "vocab_size": len(corpus.vocab), "has_unk": unk_id is not None,
            "blank_lines": corpus.options.blank_lines, "splits": splits}


def format_corpus_summary(summary: Mapping[str, Any]) -> str:
    """A few human-readable lines for a :func:`corpus_summary` dict (the CLI prints them)."""
    out = [f"corpus {summary['folder']}: vocabulary {summary['vocab_size']:,} words ({EOS} included"
           f"{'' if summary['has_unk'] else f', no {UNK}'}), blank lines: {summary['blank_lines']}"]
    for name, s in summary["splits"].items():
        lines = "" if s["lines"] is None else f", {count_noun(s['lines'], 'line')} ({s['blank_lines']:,} blank)"
        types = "" if s["types"] is None else f", {count_noun(s['types'], 'type')}"
        unk = f"{UNK} {s['unk']:,} ({100 * s['unk_rate']:.2f}%)"
        text = f"  {name + ':':<6} {count_noun(s['tokens'], 'token')}{lines}{types}, {unk}"
        if s["oov_tokens"]:
            shown = ", ".join(f"{word!r} x{count}" for word, count in s["oov_words"].items())
            more = "" if len(s["oov_words"]) >= s["oov_types"] else f", ... ({count_noun(s['oov_types'], 'word')})"
            text += f"; {count_noun(s['oov_tokens'], 'token')} not in the training vocabulary -> {UNK}: {shown}{more}"
        out.append(text)
    return "\n".join(out)


def describe_vocab_mismatch(expected_words: Sequence[str], actual_words: Sequence[str], *,
                            expected_name: str = "checkpoint", actual_name: str = "corpus",
                            limit: int = 3) -> str:
    """One line saying how two vocabularies differ: sizes, first differing ids, a hint.

    For error messages such as a checkpoint whose vocabulary is not the corpus'.
    """
    expected, actual = tuple(expected_words), tuple(actual_words)
    if expected == actual:
        return f"the vocabularies are identical ({len(expected):,} words)"
    parts = [f"{expected_name} has {len(expected):,} words, {actual_name} has {len(actual):,}"]
    differing = []
    for i, (a, b) in enumerate(zip(expected, actual, strict=False)):
        if a != b:
            differing.append(f"#{i}: {expected_name} {a!r} vs {actual_name} {b!r}")
            if len(differing) == limit:
                break
    if differing:
        parts.append("first differing ids " + ", ".join(differing))
    else:
        shorter = min(len(expected), len(actual))
        longer_name, longer = (expected_name, expected) if len(expected) > len(actual) else (actual_name, actual)
        extra = ", ".join(repr(w) for w in longer[shorter:shorter + limit])
        parts.append(f"the first {shorter:,} agree; {longer_name} goes on with {extra}")
    expected_set, actual_set = set(expected), set(actual)
    only_expected = [w for w in expected if w not in actual_set]
    only_actual = [w for w in actual if w not in expected_set]
    if not only_expected and not only_actual:
        parts.append("same words in a different order (ids follow first appearance in train.txt: "
                     "was it edited, or read with other blank-line/BOM conventions?)")
    else:
        for name, words in ((expected_name, only_expected), (actual_name, only_actual)):
            if words:
                more = f" (+{len(words) - limit:,} more)" if len(words) > limit else ""
                parts.append(f"only in {name}: " + ", ".join(repr(w) for w in words[:limit]) + more)
    if any(BOM in w for w in only_expected + only_actual):
        parts.append("a word holds a byte-order mark (U+FEFF); mpnas now drops one at the start of a file")
    return "; ".join(parts)
