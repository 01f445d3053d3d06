"""Shared fixtures: the real PTB location and a tiny learnable synthetic corpus."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.nni_fixtures import nni_fp  # noqa: F401 (a fixture: the NNI test files' FP checkpoint)
from tests.synthetic import write_synthetic_corpus

REPO = Path(__file__).resolve().parents[1]


def ptb_location() -> Path | None:
    """``$MPNAS_DATA`` if it holds PTB, else ``../shared/data/ptb`` beside the repo."""
    for candidate in (os.environ.get("MPNAS_DATA"), REPO.parent / "shared" / "data" / "ptb"):
        if candidate and (Path(candidate) / "train.txt").is_file():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def ptb_dir() -> Path:
    path = ptb_location()
    if path is None:
        pytest.skip("real PTB not found (set MPNAS_DATA or place it at ../shared/data/ptb)")
    return path


@pytest.fixture()
def tiny_corpus_dir(tmp_path: Path) -> Path:
    return write_synthetic_corpus(tmp_path / "corpus")


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> None:
    """Tiny test models gain nothing from threads, and CI shares 2 cores with subprocesses."""
    import torch

    torch.set_num_threads(1)
