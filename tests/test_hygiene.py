"""Library conventions: no printing outside the CLI entry points, one base class for user errors,
and runtime dependencies that the library really imports."""

from __future__ import annotations

import ast
import logging
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LIBRARY = ("nas", "evaluators", "search_spaces")
# The command line's own package (its job is output), and the CLI entry functions of other modules.
CLI_PACKAGE = "nas/cli/"
CLI_FUNCTIONS = {("nas/nni/trial.py", "main")}


def _library_files() -> list[Path]:
    return sorted(p for package in LIBRARY for p in (REPO / package).rglob("*.py"))


def _prints(path: Path) -> list[tuple[str, int]]:
    """(enclosing top-level function or '<module>', line) of every ``print(...)`` call in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for top in tree.body:
        name = top.name if isinstance(top, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) else "<module>"
        for node in ast.walk(top):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                found.append((name, node.lineno))
    return found


def test_library_code_logs_instead_of_printing() -> None:
    offenders = []
    for path in _library_files():
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith(CLI_PACKAGE):
            continue
        offenders += [f"{rel}:{line} ({where})" for where, line in _prints(path) if (rel, where) not in CLI_FUNCTIONS]
    assert not offenders, "print() in library code; use log = logging.getLogger(__name__):\n" + "\n".join(offenders)


def test_training_reports_epochs_through_logging(tiny_corpus_dir: Path, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    from nas.config.sections import parse_config
    from nas.core.data import load_corpus
    from nas.retrain.loop import train

    exp = parse_config({"model": {"type": "lstm", "embed_dim": 8, "hidden_dim": 8, "num_layers": 1},
                        "data": {"batch_size": 4, "bptt": 8}, "train": {"epochs": 1, "max_steps_per_epoch": 3}})
    with caplog.at_level(logging.INFO, logger="nas.retrain.loop"):
        train(exp, load_corpus(tiny_corpus_dir), tmp_path / "run", progress=False)
    lines = [r.getMessage() for r in caplog.records if r.name == "nas.retrain.loop" and r.levelno == logging.INFO]
    assert any(line.startswith("epoch 1: train ppl ") for line in lines), lines


def test_user_errors_share_one_base_class() -> None:
    from evaluators.nbest import NBestError
    from evaluators.report import ReportError
    from nas.core.data import DataError
    from nas.core.errors import CheckpointError, MpnasError, UsageError
    from nas.pipeline.state import PipelineError
    from nas.retrain.hooks import TrainingDivergedError
    from nas.retrain.prototype_store import PrototypeError
    from search_spaces.packed_format import PackedFileError
    from search_spaces.precision import PrecisionMapError

    for kind in (UsageError, CheckpointError, DataError, PackedFileError, PrecisionMapError, PrototypeError,
                 PipelineError, NBestError, ReportError, TrainingDivergedError):
        assert issubclass(kind, MpnasError) and issubclass(kind, ValueError), kind
    assert issubclass(TrainingDivergedError, RuntimeError)  # as before


def test_pandas_is_not_a_runtime_dependency() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    runtime = [req.split(">")[0].split("=")[0].strip().lower() for req in project["dependencies"]]
    assert "pandas" not in runtime
    assert any(req.startswith("pandas") for req in project["optional-dependencies"]["dev"])
    for path in _library_files():  # nor imported by the library
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n.split(".")[0] == "pandas" for n in names), path


MAX_FILE_LINES, MAX_FUNCTION_LINES = 400, 60
SIZED = ("nas", "evaluators", "search_spaces", "benchmarks", "tests")


def _sized_files() -> list[Path]:
    return sorted(p for folder in SIZED for p in (REPO / folder).rglob("*.py") if "runs" not in p.parts)


def test_files_and_functions_stay_small() -> None:
    """No file over 400 lines, no function (docstring included) over 60: small files with one job."""
    too_long = []
    for path in _sized_files():
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(REPO).as_posix()
        if len(text.splitlines()) > MAX_FILE_LINES:
            too_long.append(f"{rel}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{rel}:{node.lineno} {node.name}: {length} lines")
    assert not too_long, "split these:\n" + "\n".join(too_long)


def test_one_way_from_a_checkpoint_to_its_model() -> None:
    """Building a model from a stored config is written once (search_spaces.models.model_from_config)."""
    home = REPO / "search_spaces" / "models" / "__init__.py"
    repeats = [path.relative_to(REPO).as_posix() for path in _library_files()
               if path != home and 'config.pop("type")' in path.read_text(encoding="utf-8")]
    assert repeats == [], "use search_spaces.models.restore_model / model_from_config"
