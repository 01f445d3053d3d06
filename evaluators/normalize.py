"""Text normalization applied to references and hypotheses before WER scoring.

The default :class:`Normalizer` lowercases, deletes the characters ``$ , . ! ? ; : "``
wherever they occur in a token (so ``thousand,`` -> ``thousand`` and ``$one`` -> ``one``),
drops tokens made only of hyphens (a standalone ``-``), splits on whitespace and then
applies an optional word mapping. Apostrophes and in-word hyphens are kept
(``don't``, ``eighty-six``); set ``split_hyphens=True`` to score ``eighty-six`` as
``eighty six``, which the HyPoradise hypotheses need against their references.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

DEFAULT_PUNCTUATION: frozenset[str] = frozenset('$,.!?;:"')


@dataclass(frozen=True)
class Normalizer:
    """Callable turning a transcript string into a list of words.

    Attributes:
        lowercase: fold to lower case first (sclite's default is case-insensitive).
        punctuation: characters deleted wherever they appear.
        drop_hyphen_tokens: remove tokens consisting only of ``-`` characters.
        split_hyphens: also split words at hyphens (``a-b`` -> ``a b``).
        mapping: word -> replacement applied last, after lowercasing and punctuation
            removal; the replacement is split on whitespace, so it may be several words
            or empty (which deletes the word).
    """

    lowercase: bool = True
    punctuation: frozenset[str] = DEFAULT_PUNCTUATION
    drop_hyphen_tokens: bool = True
    split_hyphens: bool = False
    mapping: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __call__(self, text: str) -> list[str]:
        """Normalize ``text`` and return its words."""
        if self.lowercase:
            text = text.lower()
        if self.punctuation:
            text = text.translate({ord(ch): None for ch in self.punctuation})
        words = text.split()
        if self.split_hyphens:
            words = [part for word in words for part in word.split("-") if part]
        elif self.drop_hyphen_tokens:
            words = [word for word in words if word.strip("-")]
        if self.mapping:
            words = [out for word in words for out in self.mapping.get(word, word).split()]
        return words
