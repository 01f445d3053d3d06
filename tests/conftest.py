"""Shared fixtures: the real PTB location and a tiny learnable synthetic corpus."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

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


def write_synthetic_corpus(folder: Path, seed: int = 0, sentences: tuple[int, int, int] = (400, 40, 40)) -> Path:
    """A small corpus with learnable structure: templated sentences over a 30-word vocabulary."""
    rng = random.Random(seed)
    subjects = ["the cat", "a dog", "the bird", "my friend", "the teacher", "<unk>"]
    verbs = ["sees", "likes", "chases", "finds", "helps"]
    objects = ["the ball", "a tree", "the house", "some food", "the car", "N apples"]
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in zip(("train", "valid", "test"), sentences, strict=True):
        lines = []
        for _ in range(count):
            words = [rng.choice(subjects), rng.choice(verbs), rng.choice(objects)]
            if rng.random() < 0.3:
                words += ["and", rng.choice(verbs), rng.choice(objects)]
            lines.append(" " + " ".join(words) + " ")
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture()
def tiny_corpus_dir(tmp_path: Path) -> Path:
    return write_synthetic_corpus(tmp_path / "corpus")


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> None:
    """Tiny test models gain nothing from threads, and CI shares 2 cores with subprocesses."""
    import torch

    torch.set_num_threads(1)
