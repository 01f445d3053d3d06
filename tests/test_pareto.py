"""The Pareto front of (size, perplexity) rows: dominance, ties, duplicates and unusable values."""

from __future__ import annotations

import math

import pytest

from evaluators.pareto import pareto_front, pareto_indices


def _rows(*points: tuple[object, object]) -> list[dict[str, object]]:
    return [{"theoretical_bytes": x, "test_ppl": y, "id": i} for i, (x, y) in enumerate(points)]


def test_dominated_points_are_dropped_and_front_is_ordered_by_size() -> None:
    rows = _rows((400, 100.0), (100, 150.0), (200, 120.0), (300, 130.0), (250, 125.0), (50, 300.0))
    assert pareto_indices(rows) == [5, 1, 2, 0]
    assert [r["id"] for r in pareto_front(rows)] == [5, 1, 2, 0]
    assert pareto_front(rows)[0] is rows[5]  # the row objects themselves


def test_equal_points_keep_the_first() -> None:
    rows = _rows((100, 150.0), (200, 120.0), (100, 150.0), (200, 120.0))
    assert pareto_indices(rows) == [0, 1]


def test_equal_x_worse_y_and_equal_y_worse_x_are_dominated() -> None:
    rows = _rows((100, 160.0), (100, 150.0), (300, 150.0), (300, 110.0))
    assert pareto_indices(rows) == [1, 3]


def test_single_point_and_empty() -> None:
    assert pareto_indices(_rows((10, 5.0))) == [0]
    assert pareto_front([]) == []


@pytest.mark.parametrize("bad", [None, math.nan, math.inf, "12", True])
def test_unusable_values_are_excluded(bad: object) -> None:
    rows = _rows((bad, 10.0), (100, bad), (200, 150.0), (300, 140.0))
    assert pareto_indices(rows) == [2, 3]
    assert pareto_indices([{"test_ppl": 1.0}, {"theoretical_bytes": 1}]) == []  # missing keys


def test_other_columns_and_dataframes() -> None:
    rows = [{"packed_bytes": 10, "wer": 12.0}, {"packed_bytes": 5, "wer": 12.5}, {"packed_bytes": 20, "wer": 12.5}]
    assert pareto_indices(rows, x="packed_bytes", y="wer") == [1, 0]
    pandas = pytest.importorskip("pandas")
    frame = pandas.DataFrame(_rows((100, 150.0), (200, math.nan), (300, 140.0), (400, 145.0)))
    assert [r["id"] for r in pareto_front(frame)] == [0, 2]
