"""The ``space`` and ``budget`` sections of an experiment file, resolved against a real model.

Example::

    space:
      bits: [1, 2, 3, 4, 8]       # default candidates for every cluster (this is the default);
                                  # any of 1-6, 8, 16 and 32 (full precision) may be listed
      granularity: matrix         # matrix | row: one alpha per cluster or per row; bits are per cluster
      min_bits: 1                 # floor applied to every cluster's candidates, overrides included
      keep_fp: [pos_embedding]    # names or glob patterns kept at 32 bits
      leftover_bits: 32           # 8 | 16 | 32: biases, LayerNorm and every other parameter outside
                                  # the clusters, per-tensor affine; 32 keeps them float32 (default)
      overrides:                  # ordered list
        - {match: "embedding", bits: [2, 4, 8]}
        - {match: "layers.*.forget_gate.*", bits: [4, 8]}
    budget: {avg_bits: 2.0}       # exactly one of avg_bits | size_mb | compression

Resolution rules, per cluster of ``find_clusters(model)``:

1. ``keep_fp`` wins over everything: the cluster's only candidate is 32.
2. Else an override whose ``match`` is the exact cluster name (a string without ``*?[``).
3. Else the first override whose glob pattern matches (``fnmatch``: ``*`` also crosses dots).
4. Else ``space.bits``. Then candidates below ``min_bits`` are dropped.

Mistakes raise :class:`SpaceError` naming the file and dotted key: unknown keys, wrong types,
a name or pattern that matches no cluster, an override that never applies (shadowed), a bit
width the quantizer cannot do, no candidate left after ``min_bits``, a ``leftover_bits`` other
than 8, 16 or 32, a bad or infeasible budget.

``leftover_bits`` is not searched: every map the space builds carries it
(:attr:`PrecisionMap.leftover_bits`), and the accounting below charges the leftovers at it.

Budget accounting (the same as :func:`search_spaces.size.model_size`, which the tests check):

- ``avg_bits``: the average over ALL clusters weighted by numel, clusters kept at 32 bits
  counting 32 (``model_size``'s ``avg_bits``); FP leftovers (biases, norms) are not in it.
- ``size_mb``: theoretical bytes, 1 MB = 10^6 bytes (as the CLI prints sizes).
- ``compression``: FP32 bytes of the whole model / theoretical bytes.

All three become :meth:`Budget.max_weight_bits`, the largest allowed ``sum(bits * numel)`` over
the *searchable* clusters (all but those pinned at 32 bits), which :func:`nas.search.allocate.allocate`
takes. Byte budgets first subtract the fixed costs: the leftovers (4 bytes an element, or
``leftover_bits / 8`` plus 8 bytes a tensor when quantized), pinned clusters (4 bytes an element)
and the scales of searchable clusters (4 bytes each, one per cluster or row). A cluster
that may pick 32 is charged its scales anyway: the bound is then conservative by those bytes.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, NamedTuple

from torch import nn

from search_spaces.clusters import find_clusters
from search_spaces.precision import PrecisionMap
from search_spaces.quant import FULL_PRECISION, GRANULARITIES, SUPPORTED_BITS
from search_spaces.space_parsing import (
    SpaceError,
    as_list,
    as_mapping,
    bits_list,
    check_leftover_bits,
    is_int,
    is_pattern,
    matching_clusters,
    space_error,
)

# 3 is a default candidate: without it a budget of 3 average bits gets a map built from 2 and 4
# bits (or uniform 2 bits), far worse than uniform 3 bits (issue 13, item 6).
DEFAULT_BITS = (1, 2, 3, 4, 8)
BUDGET_KINDS = ("avg_bits", "size_mb", "compression")
BYTES_PER_MB = 1_000_000
_SPACE_KEYS = ("bits", "granularity", "min_bits", "keep_fp", "leftover_bits", "overrides")
_OVERRIDE_KEYS = ("match", "bits")
# Budgets arrive as floats (2.0 * numel, bytes / compression); weight-bit costs are integers, so
# the bound is floored, forgiving float noise of this relative size first.
_REL_TOL = 1e-12
FP32_BYTES = 4  # per FP32 element and per scale, as in search_spaces.size


def _model_size(model: nn.Module, precision_map: PrecisionMap) -> dict[str, float]:
    # Imported here, not at the top: evaluators depend on search_spaces, not the reverse, and a
    # top-level import would become a cycle as soon as search_spaces/__init__ imports this module.
    from search_spaces.size import model_size

    return model_size(model, precision_map)


@dataclass(frozen=True)
class Budget:
    """A size budget: ``kind`` is one of :data:`BUDGET_KINDS`, ``value`` its positive amount."""

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise SpaceError(f"budget.{self.kind}: unknown kind (expected one of {', '.join(BUDGET_KINDS)})")
        value = self.value
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
            raise SpaceError(f"budget.{self.kind}: expected a positive finite number, got {value!r}")
        object.__setattr__(self, "value", float(self.value))

    @classmethod
    def from_config(cls, raw: Any, source: str = "<memory>") -> Budget | None:
        """Parse ``{avg_bits: 2.0}`` (exactly one kind); None stays None."""
        if raw is None:
            return None
        raw = as_mapping(raw, source, "budget", BUDGET_KINDS)
        if len(raw) != 1:
            got = ", ".join(raw) or "none"
            raise space_error(source, "budget", f"give exactly one of {', '.join(BUDGET_KINDS)}; got {got}")
        try:
            return cls(*next(iter(raw.items())))
        except SpaceError as exc:
            raise SpaceError(f"{source}: {exc}") from None

    def max_bytes(self, space: SearchSpace) -> float:
        """The budget as theoretical bytes of the whole model (avg_bits: at the bound)."""
        if self.kind == "size_mb":
            return self.value * BYTES_PER_MB
        if self.kind == "compression":
            return space.fp32_bytes / self.value
        return space.fixed_bytes + self.max_weight_bits(space) / 8

    def max_weight_bits(self, space: SearchSpace) -> float:
        """Largest allowed ``sum(bits * numel)`` over ``space.searchable`` (see module doc)."""
        if self.kind == "avg_bits":
            bound = self.value * space.total_params - FULL_PRECISION * space.pinned_params
        else:
            bound = 8 * (self.max_bytes(space) - space.fixed_bytes)
        return float(math.floor(bound + _REL_TOL * abs(bound)))


@dataclass(frozen=True)
class SearchSpace:
    """Candidate bit widths per cluster, plus what is needed to turn budgets into weight bits.

    ``candidates``: cluster -> ascending candidate bits (``(32,)`` for pinned FP clusters), in
    model order. ``sizes``: cluster -> numel. ``scales``: cluster -> scales it stores when
    quantized (1, or its rows at ``"row"`` granularity). ``leftover_params``: elements outside
    every cluster (parameters and buffers). ``fp32_bytes``: the whole model in FP32.
    ``leftover_bits``: the width every map of this space gives the leftover parameters.
    ``leftover_bytes``: what the leftovers cost at that width, scales included (None: 4 bytes an
    element, right at 32 bits). Build it with :meth:`from_config`; the accounting fields are
    filled from the model there.
    """

    candidates: Mapping[str, tuple[int, ...]]
    sizes: Mapping[str, int]
    granularity: str = "matrix"
    budget: Budget | None = None
    source: str = "<memory>"
    scales: Mapping[str, int] | None = None  # None: one per cluster (matrix granularity only)
    leftover_params: int = 0
    fp32_bytes: float | None = None  # None: 4 bytes per cluster weight and leftover element
    leftover_bits: int = FULL_PRECISION
    leftover_bytes: float | None = None  # None: 4 bytes per leftover element

    def __post_init__(self) -> None:
        object.__setattr__(self, "leftover_bits", check_leftover_bits(self.leftover_bits, self.source))
        bad = [n for n, c in self.candidates.items() if not c or list(c) != sorted(set(c) & set(SUPPORTED_BITS))]
        if bad or set(self.candidates) != set(self.sizes):
            raise space_error(self.source, "space", f"clusters {bad} need ascending unique candidates from "
                       f"{list(SUPPORTED_BITS)}, and sizes must name the same clusters as candidates")
        if self.granularity not in GRANULARITIES or (self.scales is None and self.granularity != "matrix"):
            raise space_error(self.source, "space.granularity", f"{self.granularity!r}: expected one of "
                       f"{list(GRANULARITIES)}; 'row' needs the rows of every cluster (scales)")
        scales = self.scales if self.scales is not None else dict.fromkeys(self.sizes, 1)
        total = sum(self.sizes.values()) + self.leftover_params
        fp32 = float(FP32_BYTES * total) if self.fp32_bytes is None else float(self.fp32_bytes)
        object.__setattr__(self, "candidates", MappingProxyType({k: tuple(v) for k, v in self.candidates.items()}))
        object.__setattr__(self, "sizes", MappingProxyType({k: self.sizes[k] for k in self.candidates}))
        object.__setattr__(self, "scales", MappingProxyType({k: scales[k] for k in self.candidates}))
        object.__setattr__(self, "fp32_bytes", fp32)
        leftover = FP32_BYTES * self.leftover_params if self.leftover_bytes is None else self.leftover_bytes
        object.__setattr__(self, "leftover_bytes", float(leftover))
        if self.budget is not None:
            self._check_feasible(self.budget)

    def _check_feasible(self, budget: Budget) -> None:
        smallest = self.smallest_map()
        if self.weight_bits(smallest) <= budget.max_weight_bits(self):
            return
        nbytes, avg = self.theoretical_bytes(smallest), self.weight_bits(smallest) + FULL_PRECISION * self.pinned_params
        unit = {"avg_bits": " bits", "size_mb": " MB", "compression": "x"}[budget.kind]
        raise space_error(self.source, f"budget.{budget.kind}", f"{budget.value:g}{unit} is infeasible: the smallest "
                   f"reachable map (every cluster at its fewest bits) has {nbytes / BYTES_PER_MB:.6g} MB, average "
                   f"{avg / self.total_params:.4g} bits, compression {self.fp32_bytes / nbytes:.4g}x")

    @classmethod
    def from_config(cls, space: Mapping[str, Any] | None, budget: Mapping[str, Any] | None, model: nn.Module,
                    source: str = "<memory>") -> SearchSpace:
        """Resolve the ``space`` and ``budget`` sections (either may be None) against ``model``."""
        clusters = find_clusters(model)
        names = list(clusters)
        if not names:
            raise space_error(source, "space", f"the model ({type(model).__name__}) has no quantizable clusters")
        raw = as_mapping({} if space is None else space, source, "space", _SPACE_KEYS)
        default = bits_list(raw.get("bits", list(DEFAULT_BITS)), source, "space.bits")
        granularity = raw.get("granularity", "matrix")
        if granularity not in GRANULARITIES:
            raise space_error(source, "space.granularity", f"{granularity!r} is not one of {list(GRANULARITIES)}")
        min_bits = raw.get("min_bits", 1)
        if not is_int(min_bits) or not 1 <= min_bits <= FULL_PRECISION:
            raise space_error(source, "space.min_bits", f"expected an int from 1 to {FULL_PRECISION}, got {min_bits!r}")

        leftover_bits = check_leftover_bits(raw.get("leftover_bits", FULL_PRECISION), source)
        keep_fp = as_list(raw.get("keep_fp", []), source, "space.keep_fp", "names or patterns")
        pinned = {n for i, text in enumerate(keep_fp)
                  for n in matching_clusters(text, names, source, f"space.keep_fp[{i}]")}
        rules = _override_rules(raw, names, pinned, source)
        candidates = _candidates(names, pinned, rules, default, min_bits, source)
        sizes = {n: c.numel for n, c in clusters.items()}
        scales = {n: 1 if granularity == "matrix" else c.shape[0] for n, c in clusters.items()}
        # Leftovers and FP32 size straight from model_size, so the accounting cannot drift from it.
        fp = _model_size(model, PrecisionMap(dict.fromkeys(names, FULL_PRECISION), granularity,
                                             leftover_bits=leftover_bits))
        return cls(candidates, sizes, granularity, Budget.from_config(budget, source), source, scales,
                   int(fp["fp_leftover_params"] + fp["quantized_leftover_params"]), fp["fp32_bytes"],
                   leftover_bits, fp["leftover_bytes"])

    @property
    def searchable(self) -> tuple[str, ...]:
        """Clusters the search assigns (every cluster not pinned at 32 bits), in model order."""
        return tuple(n for n, c in self.candidates.items() if c != (FULL_PRECISION,))

    @property
    def free(self) -> tuple[str, ...]:
        """Clusters with a real choice (more than one candidate)."""
        return tuple(n for n, c in self.candidates.items() if len(c) > 1)

    @property
    def total_params(self) -> int:
        """Weights in all clusters (the denominator of ``avg_bits``)."""
        return sum(self.sizes.values())

    @property
    def pinned_params(self) -> int:
        """Weights in clusters pinned at 32 bits."""
        return sum(n for name, n in self.sizes.items() if self.candidates[name] == (FULL_PRECISION,))

    @property
    def fixed_bytes(self) -> float:
        """Bytes that do not depend on the search: leftovers, pinned clusters, searchable scales."""
        scales = sum(self.scales[n] for n in self.searchable if self.candidates[n][0] < FULL_PRECISION)
        return float(self.leftover_bytes + FP32_BYTES * (self.pinned_params + scales))

    def weight_bits(self, precision_map: PrecisionMap) -> int:
        """``sum(bits * numel)`` over the searchable clusters: what budgets bound."""
        return sum(precision_map.bits[n] * self.sizes[n] for n in self.searchable)

    def theoretical_bytes(self, precision_map: PrecisionMap) -> float:
        """``model_size(...)['theoretical_bytes']`` without the model (same accounting)."""
        total = float(self.leftover_bytes)
        for name, n in self.sizes.items():
            b = precision_map.bits[name]
            total += FP32_BYTES * n if b == FULL_PRECISION else b * n / 8 + FP32_BYTES * self.scales[name]
        return float(total)

    def fits_budget(self, precision_map: PrecisionMap) -> bool:
        """Whether the map meets ``self.budget`` (True without a budget)."""
        return self.budget is None or self.weight_bits(precision_map) <= self.budget.max_weight_bits(self)

    def _map(self, bits: Mapping[str, int], strategy: str) -> PrecisionMap:
        return PrecisionMap(dict(bits), self.granularity, meta={"strategy": strategy},
                            leftover_bits=self.leftover_bits)

    def smallest_map(self) -> PrecisionMap:
        """Every cluster at its fewest candidate bits."""
        return self._map({n: c[0] for n, c in self.candidates.items()}, "smallest")

    def largest_map(self) -> PrecisionMap:
        """Every cluster at its most candidate bits."""
        return self._map({n: c[-1] for n, c in self.candidates.items()}, "largest")

    def uniform_map(self, bits: int) -> PrecisionMap:
        """Each cluster at its largest candidate ``<= bits``, or its smallest if none is."""
        if not is_int(bits):
            raise ValueError(f"bits must be an int, got {bits!r}")
        return self._map({n: max((b for b in c if b <= bits), default=c[0]) for n, c in self.candidates.items()},
                         "uniform")

    def contains(self, precision_map: PrecisionMap) -> bool:
        """Whether the map has exactly these clusters, granularity and leftover width, and only
        candidate bits."""
        return (isinstance(precision_map, PrecisionMap) and precision_map.granularity == self.granularity
                and precision_map.leftover_bits == self.leftover_bits
                and set(precision_map.bits) == set(self.candidates)
                and all(b in self.candidates[n] for n, b in precision_map.bits.items()))

    def size_range(self, model: nn.Module) -> tuple[float, float]:
        """(smallest, largest) theoretical bytes reachable, measured by ``model_size``."""
        return (_model_size(model, self.smallest_map())["theoretical_bytes"],
                _model_size(model, self.largest_map())["theoretical_bytes"])

    def to_nni(self) -> dict[str, dict[str, Any]]:
        """NNI search-space JSON: a ``choice`` per cluster with more than one candidate."""
        return {n: {"_type": "choice", "_value": list(self.candidates[n])} for n in self.free}

    def from_nni_params(self, params: Mapping[str, Any]) -> PrecisionMap:
        """The full map from NNI trial parameters (single-candidate clusters filled in)."""
        free = self.free
        unknown = [k for k in params if k not in free] if isinstance(params, Mapping) else [repr(params)]
        missing = [k for k in free if k not in params] if isinstance(params, Mapping) else []
        if unknown or missing:
            raise SpaceError(f"{self.source}: NNI parameters do not match the space: unknown {unknown}, "
                             f"missing {missing}")
        bits = {n: c[0] for n, c in self.candidates.items()}
        for name in free:
            b = params[name]
            if not is_int(b) or b not in self.candidates[name]:
                raise SpaceError(f"{self.source}: NNI parameter {name!r} = {b!r} is not one of "
                                 f"{list(self.candidates[name])}")
            bits[name] = int(b)
        return self._map(bits, "nni")

    def describe(self, model: nn.Module) -> str:
        """A table of clusters and candidates, and both extremes' size, average bits, compression."""
        width = max(len("cluster"), *(len(n) for n in self.candidates))
        pinned = len(self.candidates) - len(self.searchable)
        lines = [f"{self.source}: {len(self.candidates)} clusters ({len(self.free)} with a choice, {pinned} kept "
                 f"at 32 bits), granularity {self.granularity}",
                 f"leftovers (biases, norms; buffers stay FP32): {self.leftover_params} elements, leftover_bits "
                 f"{self.leftover_bits}, {self.leftover_bytes / BYTES_PER_MB:.6f} MB",
                 f"{'cluster':<{width}}  {'params':>10}  candidates"]
        lines += [f"{n:<{width}}  {self.sizes[n]:>10}  {' '.join(map(str, c))}" for n, c in self.candidates.items()]
        lo = _model_size(model, self.smallest_map())
        hi = _model_size(model, self.largest_map())
        lines += ["", f"{'':<12}{'smallest':>12}{'largest':>12}",
                  f"{'size MB':<12}{lo['theoretical_bytes'] / BYTES_PER_MB:>12.6f}"
                  f"{hi['theoretical_bytes'] / BYTES_PER_MB:>12.6f}",
                  f"{'avg bits':<12}{lo['avg_bits']:>12.3f}{hi['avg_bits']:>12.3f}",
                  f"{'compression':<12}{lo['compression']:>12.2f}{hi['compression']:>12.2f}"]
        if (budget := self.budget) is not None:
            lines.append(f"budget: {budget.kind} {budget.value:g} -> at most {budget.max_weight_bits(self):.0f} weight "
                         f"bits over the searchable clusters, at most {budget.max_bytes(self) / BYTES_PER_MB:.6f} MB")
        return "\n".join(lines)


class _Rule(NamedTuple):
    """One ``space.overrides`` entry: its match text, its widths, the clusters it matches."""

    match: str
    bits: tuple[int, ...]
    hits: list[str]


def _override_rules(raw: Mapping[str, Any], names: list[str], pinned: set[str], source: str) -> list[_Rule]:
    """The ``space.overrides`` entries, checked: both keys, known clusters, no name set twice."""
    exact: dict[str, int] = {}  # cluster name -> index of its exact-name override
    rules = []
    for i, entry in enumerate(as_list(raw.get("overrides", []), source, "space.overrides", "{match, bits}")):
        key = f"space.overrides[{i}]"
        entry = as_mapping(entry, source, key, _OVERRIDE_KEYS)
        if any(k not in entry for k in _OVERRIDE_KEYS):
            raise space_error(source, key, f"needs both keys {' and '.join(_OVERRIDE_KEYS)}, got {dict(entry)!r}")
        hits = matching_clusters(entry["match"], names, source, f"{key}.match")
        text, bits = entry["match"], bits_list(entry["bits"], source, f"{key}.bits")
        if not is_pattern(text):
            if text in exact or text in pinned:
                by = f"space.overrides[{exact[text]}]" if text in exact else "space.keep_fp (32 bits)"
                raise space_error(source, f"{key}.match", f"{text!r} is already set by {by}")
            exact[text] = i
        rules.append(_Rule(text, bits, hits))
    return rules


def _candidates(names: list[str], pinned: set[str], rules: list[_Rule], default: tuple[int, ...], min_bits: int,
                source: str) -> dict[str, tuple[int, ...]]:
    """Each cluster's widths: 32 if kept FP, else its exact-name override, the first matching pattern or
    ``space.bits``, above ``min_bits``; an override that never applies is an error."""
    exact = {rule.match: i for i, rule in enumerate(rules) if not is_pattern(rule.match)}
    patterns = [i for i, rule in enumerate(rules) if is_pattern(rule.match)]
    candidates: dict[str, tuple[int, ...]] = {}
    used: set[int] = set()
    for name in names:
        if name in pinned:
            candidates[name] = (FULL_PRECISION,)
            continue
        rule = exact.get(name, next((i for i in patterns if name in rules[i].hits), None))
        key, bits = ("space.bits", default) if rule is None else (f"space.overrides[{rule}].bits", rules[rule].bits)
        if rule is not None:
            used.add(rule)
        kept = tuple(b for b in bits if b >= min_bits)
        if not kept:
            raise space_error(source, "space.min_bits", f"{min_bits} leaves no candidate for cluster {name!r} "
                              f"({key} = {list(bits)})")
        candidates[name] = kept
    for i, rule in enumerate(rules):
        if i not in used:
            raise space_error(source, f"space.overrides[{i}].match", f"{rule.match!r} never applies: every cluster "
                              "it matches is taken by space.keep_fp, an exact-name override or an earlier pattern")
    return candidates
