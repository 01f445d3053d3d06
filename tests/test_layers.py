"""The roles import one way only: the import-linter contracts of pyproject.toml hold."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _lint_imports() -> str:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("import-linter is not installed (pip install -r requirements-dev.txt)")
    return exe


def test_import_contracts_hold() -> None:
    done = subprocess.run([_lint_imports(), "--no-cache"], cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]


def test_contracts_catch_an_upward_import(tmp_path: Path) -> None:
    """A core module importing the CLI breaks the layers contract (the check can fail)."""
    copy = tmp_path / "repo"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".venv*", ".git", "benchmarks", "tests", "docs"))
    bad = copy / "nas" / "core" / "errors.py"
    bad.write_text(bad.read_text() + "\nimport nas.cli.main  # noqa: E402,F401\n")
    done = subprocess.run([_lint_imports(), "--no-cache"], cwd=copy, capture_output=True, text=True, check=False,
                          env={"PYTHONPATH": str(copy), "PATH": str(Path(sys.executable).parent)})
    assert done.returncode != 0
    assert "nas.core is not allowed to import nas.cli" in done.stdout


def test_no_module_imports_itself_through_others() -> None:
    """No import cycle between modules, also inside one role (the layers contract sees only across roles)."""
    grimp = pytest.importorskip("grimp")  # import-linter's graph builder
    graph = grimp.build_graph("nas", "search_spaces", "evaluators")
    cycles = sorted({tuple(sorted((a, b))) for a in graph.modules for b in graph.find_modules_directly_imported_by(a)
                     if graph.find_shortest_chain(importer=b, imported=a)})
    assert cycles == []
