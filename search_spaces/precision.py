"""Weight clusters of a model, and the precision map that gives each cluster a bit width.

A *cluster* is the unit that shares one bit width (and, at ``"matrix"`` granularity, one scale):
a whole ``nn.Linear`` / ``nn.Embedding`` weight, one gate's rows of a fused ``nn.LSTM`` /
``nn.GRU`` matrix, or one of q/k/v of a packed ``nn.MultiheadAttention`` projection. Everything
else (biases, LayerNorm, buffers, other layer types) is a "leftover": full precision by default.
A map's ``leftover_bits`` (8 or 16; 32 = float32, the default) quantizes every floating-point
*parameter* outside the clusters (:func:`find_leftovers`: biases, LayerNorm gains and biases, any
other parameter) per tensor with the affine quantizer of ``search_spaces.quant``; buffers
(running statistics, masks) always stay as they are.

A :class:`PrecisionMap` is an immutable, hashable value ``{cluster: bits}`` plus a granularity, a
leftover width, a format version and free-form ``meta`` evidence; it round-trips YAML and JSON
exactly. ``leftover_bits`` is written only when it is not 32, so maps without it are the same
files as before the option existed, and files without the key read as 32.
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from nas.core.atomic import atomic_write_text
from nas.core.errors import MpnasError
from search_spaces.clusters import find_clusters
from search_spaces.quant import AFFINE_BITS, FULL_PRECISION, GRANULARITIES, SUPPORTED_BITS

FORMAT_VERSION = 1  # bump when the file layout changes; older files must stay loadable
LEFTOVER_BITS = (*AFFINE_BITS, FULL_PRECISION)  # allowed ``leftover_bits``; 32 keeps leftovers float32
_KEYS = ("version", "granularity", "bits", "leftover_bits", "meta")


class PrecisionMapError(MpnasError):
    """A precision map that is malformed, unsupported or does not fit the model; the message names it."""


class _FrozenMap(Mapping[str, Any]):
    """A read-only, hashable dict (hash ignores order, like Mapping equality)."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = dict(data)

    def __getitem__(self, key: str) -> Any:
        return self._data[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __hash__(self) -> int:
        return hash(frozenset(self._data.items()))

    def __repr__(self) -> str:
        return repr(self._data)


def _freeze(value: Any, key: str) -> Any:
    """A deep read-only copy of YAML/JSON-storable ``value``; ValueError names the bad ``key``."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, numbers.Integral):  # numpy scores and counts become plain Python numbers
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, Mapping):
        for k in value:
            if not isinstance(k, str):  # JSON would turn it into a string: no exact round trip
                raise PrecisionMapError(f"key {key!r}: keys must be strings, got {k!r}")
        return _FrozenMap({k: _freeze(v, f"{key}.{k}") for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(_freeze(v, f"{key}[{i}]") for i, v in enumerate(value))
    raise PrecisionMapError(f"key {key!r}: {type(value).__name__} cannot be stored in YAML/JSON; use str, int, "
                            "float, bool, None, lists or string-keyed dicts")


def _thaw(value: Any) -> Any:
    """Plain dicts and lists again, for YAML/JSON."""
    if isinstance(value, Mapping):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, str | int | float | bool):  # scalars; unhashable keys fail in super()
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise PrecisionMapError(f"duplicate key {key!r}")
        out[key] = value
    return out


@dataclass(frozen=True)
class PrecisionMap:
    """Bit width per cluster; immutable, hashable, versioned; round-trips YAML and JSON.

    ``bits`` is always per cluster (32 = keep full precision). ``granularity`` only chooses the
    scales: ``"matrix"`` gives one alpha per cluster, ``"row"`` one alpha per row of the cluster
    (node level: an output unit of a Linear, a word of an Embedding). ``meta`` is free-form
    evidence (strategy, seed, budget, scores) made of str/int/float/bool/None, lists and
    string-keyed dicts. Bit values are range-checked by :meth:`validate`, not here, so that one
    error can list every problem of a hand-edited file at once. ``leftover_bits`` (one of
    :data:`LEFTOVER_BITS`, checked here) is the width of every parameter outside the clusters
    (:func:`find_leftovers`); 32 keeps them float32. It is the last field so that positional
    construction ``PrecisionMap(bits, granularity, version, meta)`` keeps working.
    """

    bits: Mapping[str, int]
    granularity: str = "matrix"
    version: int = FORMAT_VERSION
    meta: Mapping[str, Any] = field(default_factory=dict)
    leftover_bits: int = FULL_PRECISION

    def __post_init__(self) -> None:
        if not isinstance(self.bits, Mapping):
            raise PrecisionMapError(f"key 'bits' must be a mapping of cluster name to bit width, "
                                    f"got {type(self.bits).__name__}")
        frozen: dict[str, int] = {}
        for name, b in self.bits.items():
            if not isinstance(name, str) or not name:
                raise PrecisionMapError(f"key 'bits': cluster names must be non-empty strings, got {name!r}")
            if isinstance(b, bool) or not isinstance(b, numbers.Integral):
                raise PrecisionMapError(f"key 'bits.{name}' must be an int bit width, got {b!r} ({type(b).__name__})")
            frozen[name] = int(b)
        if self.granularity not in GRANULARITIES:
            raise PrecisionMapError(f"key 'granularity' is {self.granularity!r}; expected one of {GRANULARITIES}")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 1:
            raise PrecisionMapError(f"key 'version' must be an int >= 1, got {self.version!r}")
        if self.version > FORMAT_VERSION:
            raise PrecisionMapError(f"key 'version' is {self.version}, newer than this mpnas reads "
                                    f"({FORMAT_VERSION}); upgrade mpnas")
        if not isinstance(self.meta, Mapping):
            raise PrecisionMapError(f"key 'meta' must be a mapping, got {type(self.meta).__name__}")
        b = self.leftover_bits
        if isinstance(b, bool) or not isinstance(b, numbers.Integral) or b not in LEFTOVER_BITS:
            raise PrecisionMapError(f"key 'leftover_bits' is {b!r}; expected one of {LEFTOVER_BITS} "
                                    f"(32 keeps biases and norms in float32)")
        object.__setattr__(self, "leftover_bits", int(b))
        object.__setattr__(self, "bits", _FrozenMap(frozen))
        object.__setattr__(self, "meta", _freeze(self.meta, "meta"))

    @classmethod
    def uniform(cls, model: nn.Module, bits: int, granularity: str = "matrix",
                keep_fp: str | tuple[str, ...] | list[str] = (), leftover_bits: int = FULL_PRECISION
                ) -> PrecisionMap:
        """Every cluster of ``model`` at ``bits``, except those matching ``keep_fp`` (kept at 32).

        ``keep_fp`` holds exact cluster names or ``fnmatch`` patterns (``*`` also matches dots);
        a pattern that matches no cluster raises ValueError (it is almost always a typo).
        ``leftover_bits`` is the width of the parameters outside the clusters (32 = float32).
        """
        if isinstance(bits, bool) or bits not in SUPPORTED_BITS:
            raise PrecisionMapError(f"bits={bits!r} is not supported; expected one of {SUPPORTED_BITS}")
        patterns = (keep_fp,) if isinstance(keep_fp, str) else tuple(keep_fp)
        names = list(find_clusters(model))
        unmatched = [p for p in patterns if not any(fnmatchcase(n, p) for n in names)]
        if unmatched:
            raise PrecisionMapError(f"keep_fp patterns match no cluster: {unmatched}; clusters are {names}")
        table = {n: FULL_PRECISION if any(fnmatchcase(n, p) for p in patterns) else int(bits) for n in names}
        return cls(table, granularity, meta={"strategy": "uniform"}, leftover_bits=leftover_bits)

    def with_meta(self, meta: Mapping[str, Any]) -> PrecisionMap:
        """The same decisions (bits, granularity, leftover bits, version) with other ``meta``.

        Use it instead of ``PrecisionMap(dict(pm.bits), pm.granularity, meta=...)``, which
        silently drops every field added later (``leftover_bits``).
        """
        return replace(self, meta=meta)

    def validate(self, model: nn.Module) -> None:
        """Raise one ValueError listing every unknown cluster, missing cluster and invalid bit width."""
        clusters = find_clusters(model)
        unknown = [n for n in self.bits if n not in clusters]
        missing = [n for n in clusters if n not in self.bits]
        invalid = [f"{n}={b}" for n, b in self.bits.items() if b not in SUPPORTED_BITS]
        problems = []
        if unknown:
            problems.append(f"  unknown clusters (not in the model): {', '.join(unknown)}")
        if missing:
            problems.append(f"  missing clusters (in the model, not in the map): {', '.join(missing)}")
        if invalid:
            problems.append(f"  invalid bit widths (expected one of {SUPPORTED_BITS}): {', '.join(invalid)}")
        if problems:
            raise PrecisionMapError("precision map does not match the model:\n" + "\n".join(problems))

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (bits in map order) that :meth:`from_dict` reads back to an equal map."""
        data: dict[str, Any] = {"version": self.version, "granularity": self.granularity, "bits": dict(self.bits)}
        if self.leftover_bits != FULL_PRECISION:  # absent = 32: files without the option stay unchanged
            data["leftover_bits"] = self.leftover_bits
        data["meta"] = _thaw(self.meta)
        return data

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> PrecisionMap:
        """Build from :meth:`to_dict` output; ValueError names ``source`` and the offending key."""
        if not isinstance(data, Mapping):
            raise PrecisionMapError(f"{source}: a precision map must be a mapping, got {type(data).__name__}")
        # The version first: a newer file may legitimately have keys this version does not know.
        if "version" not in data:
            raise PrecisionMapError(f"{source}: missing key 'version'")
        version = data["version"]
        if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
            raise PrecisionMapError(f"{source}: key 'version' is {version}, newer than this mpnas reads "
                                    f"({FORMAT_VERSION}); upgrade mpnas")
        unknown = [k for k in data if k not in _KEYS]
        if unknown:
            raise PrecisionMapError(f"{source}: unknown key(s) {unknown}; expected {list(_KEYS)}")
        if "bits" not in data:
            raise PrecisionMapError(f"{source}: missing key 'bits'")
        meta = data.get("meta", {})
        try:
            return cls(data["bits"], data.get("granularity", "matrix"), version, {} if meta is None else meta,
                       data.get("leftover_bits", FULL_PRECISION))
        except ValueError as exc:
            raise PrecisionMapError(f"{source}: {exc}") from exc

    def to_yaml(self) -> str:
        """YAML text (bits in map order, i.e. model order for maps built from a model)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    @classmethod
    def from_yaml(cls, text: str, source: str = "<yaml>") -> PrecisionMap:
        """Parse :meth:`to_yaml` output; duplicate keys are an error."""
        try:
            data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
        except yaml.YAMLError as exc:
            raise PrecisionMapError(f"{source}: not valid YAML ({exc})") from exc
        return cls.from_dict(data, source)

    def to_json(self) -> str:
        """Indented JSON text."""
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, source: str = "<json>") -> PrecisionMap:
        """Parse :meth:`to_json` output; duplicate keys are an error."""
        try:
            data = json.loads(text, object_pairs_hook=_unique_pairs)
        except ValueError as exc:  # JSONDecodeError is a ValueError
            raise PrecisionMapError(f"{source}: not valid JSON ({exc})") from exc
        return cls.from_dict(data, source)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically as YAML (``.yaml``/``.yml``) or JSON (``.json``), chosen by suffix."""
        path = Path(path)
        atomic_write_text(path, self.to_json() if _format_of(path) == "json" else self.to_yaml())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PrecisionMap:
        """Read a file written by :meth:`save`; errors name the file."""
        path = Path(path)
        fmt = _format_of(path)
        text = path.read_text(encoding="utf-8")
        return cls.from_json(text, str(path)) if fmt == "json" else cls.from_yaml(text, str(path))


def _format_of(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return "yaml"
    if suffix == ".json":
        return "json"
    raise PrecisionMapError(f"{path}: unknown precision map format {suffix!r}; expected .yaml, .yml or .json")
