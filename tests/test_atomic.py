"""Atomic writes: the file is complete or untouched, never half written."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from nas.core.atomic import atomic_write_csv, atomic_write_text


def test_atomic_csv_writes_header_and_rows(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "rows.csv"
    atomic_write_csv(path, ["a", "b"], [{"a": 1, "b": "x"}, {"a": 2, "b": "y,z"}])
    assert path.read_text() == 'a,b\n1,x\n2,"y,z"\n'
    assert list(csv.DictReader(path.open())) == [{"a": "1", "b": "x"}, {"a": "2", "b": "y,z"}]
    assert [p.name for p in path.parent.iterdir()] == ["rows.csv"]  # no temporary file left


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "rows.csv"
    atomic_write_text(path, "old\n")
    with pytest.raises(ValueError):
        atomic_write_csv(path, ["a"], [{"a": 1, "unexpected": 2}])  # DictWriter refuses unknown keys
    assert path.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["rows.csv"]
