"""Shared fixtures: the real PTB location, a tiny learnable synthetic corpus, and four tiny pretrained LMs."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType

import pytest
import torch
from torch import nn

from tests.lms import LM_KINDS, pretrained_lm
from tests.nni_fixtures import nni_fp  # noqa: F401 (a fixture: the NNI test files' FP checkpoint)
from tests.pipeline_helpers import corpus_dir  # noqa: F401 (a fixture)
from tests.plain_lms import token_stream
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


# ----------------------------------------------------------------------------- tiny pretrained LMs


@pytest.fixture(scope="session")
def lm_tokens() -> torch.Tensor:
    """1200 tokens of the learnable Markov stream: what the tiny LMs train, search and retrain on."""
    return token_stream(1200)


@pytest.fixture(scope="session")
def lm_test_tokens() -> torch.Tensor:
    """300 held-out tokens of the same chain."""
    return token_stream(300, seed=1)


@pytest.fixture(scope="session")
def pretrained_lms(lm_tokens: torch.Tensor) -> Mapping[str, nn.Module]:
    """The trained originals, ``{kind: model}`` for every kind of ``tests.lms.LM_KINDS``, in eval mode.

    Shared by the whole session: never change them, take a copy with :func:`lm_copy`.
    """
    return MappingProxyType({kind: pretrained_lm(kind, lm_tokens) for kind in LM_KINDS})


@pytest.fixture()
def lm_copy(pretrained_lms: Mapping[str, nn.Module]) -> Callable[[str], nn.Module]:
    """``lm_copy(kind)``: a deep copy of the trained LM of ``kind``, the test's own to change."""
    return lambda kind: copy.deepcopy(pretrained_lms[kind])
