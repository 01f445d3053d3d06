"""Reading the ``space`` section: typed values, name patterns, errors that name the file and key."""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import Any

from nas.core.errors import MpnasError
from search_spaces.precision import LEFTOVER_BITS
from search_spaces.quant import SUPPORTED_BITS


class SpaceError(MpnasError):
    """A ``space`` / ``budget`` section is malformed; the message names the file and key."""


def space_error(source: str, key: str, message: str) -> SpaceError:
    return SpaceError(f"{source}: {key}: {message}")


def is_pattern(text: str) -> bool:
    return any(c in text for c in "*?[")


def matching_clusters(text: Any, names: list[str], source: str, key: str) -> list[str]:
    """Clusters that the name or glob pattern ``text`` selects; SpaceError if none (almost always a typo)."""
    if not isinstance(text, str) or not text:
        raise space_error(source, key, f"expected a cluster name or glob pattern, got {text!r}")
    hits = [n for n in names if fnmatchcase(n, text)] if is_pattern(text) else [n for n in names if n == text]
    if not hits:
        close = difflib.get_close_matches(text, names, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else f"clusters are {', '.join(names[:8])}" + (
            ", ..." if len(names) > 8 else "")
        raise space_error(source, key, f"{text!r} matches no cluster; {hint}")
    return hits


def as_list(value: Any, source: str, key: str, what: str) -> list[Any]:
    if not isinstance(value, list | tuple):
        raise space_error(source, key, f"expected a list of {what}, got {value!r}")
    return list(value)


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def bits_list(value: Any, source: str, key: str) -> tuple[int, ...]:
    """A non-empty list of supported bit widths -> sorted unique tuple."""
    if not isinstance(value, list | tuple) or not value:
        raise space_error(source, key, f"expected a non-empty list of bit widths, got {value!r}")
    for i, b in enumerate(value):
        if not is_int(b) or b not in SUPPORTED_BITS:
            raise space_error(source, f"{key}[{i}]", f"{b!r} is not a bit width the quantizer supports; "
                       f"allowed: {list(SUPPORTED_BITS)}")
    return tuple(sorted({int(b) for b in value}))


def check_leftover_bits(value: Any, source: str) -> int:
    """``space.leftover_bits`` as an int, or SpaceError naming the file, the key and the value."""
    if not is_int(value) or value not in LEFTOVER_BITS:
        raise space_error(source, "space.leftover_bits", f"{value!r} is not supported; allowed: {list(LEFTOVER_BITS)} "
                   "(8 or 16 quantize biases and norms per tensor, 32 keeps them float32)")
    return int(value)


def as_mapping(value: Any, source: str, key: str, allowed: tuple[str, ...]) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise space_error(source, key, f"expected a mapping, got {type(value).__name__}")
    for k in value:
        if k not in allowed:
            raise space_error(source, f"{key}.{k}", f"unknown key (expected one of {', '.join(allowed)})")
    return value
