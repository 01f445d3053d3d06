"""The Pareto front of evaluated models: smallest size and lowest perplexity at once.

A row is a mapping (one evaluated model, as :func:`evaluators.report.collect_rows` reads it).
Both objectives are minimised. Row ``a`` dominates row ``b`` when ``a`` is no worse in both and
strictly better in one; of several rows at exactly the same point only the first (in input
order) is kept. Rows whose ``x`` or ``y`` is missing, None, NaN, infinite, a bool or not a number
are left out.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any


def _objective(row: Mapping[str, Any], key: str) -> float | None:
    """The finite float value of ``row[key]``, or None when it cannot take part in the front."""
    value = row.get(key)
    if value is None or isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _as_rows(rows: Any) -> list[Mapping[str, Any]]:
    # A pandas DataFrame is accepted too (as its records), without importing pandas here.
    if hasattr(rows, "to_dict") and not isinstance(rows, Mapping):
        return list(rows.to_dict("records"))
    return list(rows)


def pareto_indices(rows: Iterable[Mapping[str, Any]], x: str = "theoretical_bytes", y: str = "test_ppl") -> list[int]:
    """Input positions of the non-dominated rows, minimising ``x`` and ``y``, ordered by ``x`` then ``y``.

    Deterministic: ties are broken by input order, so of equal points the first one is kept;
    a row equal in ``x`` but worse in ``y`` (or equal in ``y`` but worse in ``x``) is dominated.
    """
    points = []
    for index, row in enumerate(_as_rows(rows)):
        px, py = _objective(row, x), _objective(row, y)
        if px is not None and py is not None:
            points.append((px, py, index))
    points.sort()
    front: list[int] = []
    best_y = math.inf
    for _, py, index in points:
        if py < best_y:  # strictly better than every smaller-or-equal-x point kept so far
            front.append(index)
            best_y = py
    return front


def pareto_front(rows: Iterable[Mapping[str, Any]], x: str = "theoretical_bytes",
                 y: str = "test_ppl") -> list[Mapping[str, Any]]:
    """The non-dominated rows (the row objects themselves), minimising ``x`` and ``y``.

    ``rows`` is a sequence of mappings or a pandas DataFrame (then dicts of its records are
    returned). The result is ordered by increasing ``x`` (so decreasing ``y``): ready to draw as
    a step line. See :func:`pareto_indices` for ties and excluded rows.
    """
    items = _as_rows(rows)
    return [items[i] for i in pareto_indices(items, x, y)]
