"""The schema machinery of experiment files (:mod:`nas.config.sections` defines the sections with it).

A section is a dataclass with a ``SECTION`` name; each field may carry a :class:`Check` in its
metadata (:func:`bounded`, :func:`one_of`), which :func:`check_fields` applies from the
section's ``__post_init__``. :func:`build_section` turns a YAML mapping into a section: unknown
keys and wrong types are a :class:`ConfigError`, out-of-range values a :class:`FieldError`
naming the file, ``section.key``, the value and the range.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from nas.core.errors import MpnasError


class ConfigError(MpnasError):
    """An experiment file is malformed; the message names the file and key."""


class FieldError(ConfigError):
    """A field out of its range: ``'section.key' = value must be <expected>`` (the file is added
    by :func:`parse_config`; a section built in Python raises it as it is)."""

    def __init__(self, key: str, value: Any, expected: str) -> None:
        self.key, self.value, self.expected = key, value, expected
        super().__init__(f"'{key}' = {value!r} must be {expected}")


def number_text(x: float) -> str:
    """A bound as messages show it: an int as it is, a float in ``%g``."""
    return str(x) if isinstance(x, int) else f"{x:g}"


@dataclass(frozen=True)
class Check:
    """The range of one field: bounds for a number (always finite), or the allowed strings."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] | None = None
    note: str = ""  # appended to the expectation, e.g. "(0 disables clipping)"

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` is in range (None is the caller's business: optional fields allow it)."""
        if self.choices is not None:
            return isinstance(value, str) and value in self.choices
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            return False
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    @property
    def expected(self) -> str:
        """The range in words: ``one of (...)``, ``in [0, 1)``, ``>= 1``, ``> 0``."""
        if self.choices is not None:
            text = f"one of {self.choices}"
        else:
            low = (f"[{number_text(self.ge)}" if self.ge is not None else
                   f"({number_text(self.gt)}" if self.gt is not None else None)
            high = (f"{number_text(self.le)}]" if self.le is not None else
                    f"{number_text(self.lt)})" if self.lt is not None else None)
            if low and high:
                text = f"in {low}, {high}"
            elif low:
                text = f">= {number_text(self.ge)}" if self.ge is not None else f"> {number_text(self.gt)}"
            elif high:
                text = f"<= {number_text(self.le)}" if self.le is not None else f"< {number_text(self.lt)}"
            else:
                text = "a finite number"
        return f"{text} {self.note}" if self.note else text


def bounded(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None, note: str = "") -> Any:
    """A dataclass field whose value must lie in the given bounds (and be finite)."""
    return field(default=default, metadata={"check": Check(ge=ge, gt=gt, le=le, lt=lt, note=note)})


def one_of(default: str | None, *choices: str, note: str = "") -> Any:
    """A dataclass field whose value must be one of ``choices``."""
    return field(default=default, metadata={"check": Check(choices=choices, note=note)})


def field_check(cls: type, name: str) -> Check | None:
    """The :class:`Check` of field ``name`` of section class ``cls`` (None: no range)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata.get("check")
    raise KeyError(name)


def _allows_none(annotation: Any) -> bool:
    return "None" in str(annotation)


def check_fields(section: Any) -> None:
    """Every field of ``section`` against its :class:`Check`; FieldError names ``SECTION.key``."""
    for f in dataclasses.fields(section):
        check = f.metadata.get("check")
        value = getattr(section, f.name)
        if check is None or (value is None and _allows_none(f.type)):
            continue
        if not check.accepts(value):
            raise FieldError(f"{section.SECTION}.{f.name}", value, check.expected)


def type_ok(value: Any, annotation: Any) -> bool:
    """Whether ``value`` fits a simple annotation (int, float, bool, str, X | None)."""
    if isinstance(annotation, str):
        annotation = eval(annotation, {"Any": Any}, {})  # noqa: S307 - our own dataclass annotations
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is Any:
        return True
    if origin is list:
        (item,) = typing.get_args(annotation) or (Any,)
        return isinstance(value, list) and all(type_ok(v, item) for v in value)
    return isinstance(value, annotation)


def build_section(cls: type, raw: Any, source: str, section: str) -> Any:
    """Instantiate section ``cls`` from ``raw`` (a YAML mapping), checking keys, types and ranges."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: section '{section}' must be a mapping, got {type(raw).__name__}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in raw.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown key '{section}.{key}' (expected one of "
                              f"{', '.join(sorted(known))})")
        if not type_ok(value, known[key].type):
            raise ConfigError(f"{source}: '{section}.{key}' = {value!r} has the wrong type "
                              f"(expected {known[key].type})")
        if isinstance(value, int) and not isinstance(value, bool) and known[key].type == "float":
            raw = {**raw, key: float(value)}
    try:
        return cls(**raw)
    except FieldError as exc:
        raise ConfigError(f"{source}: {exc}") from exc
    except ValueError as exc:
        raise ConfigError(f"{source}: section '{section}': {exc}") from exc
