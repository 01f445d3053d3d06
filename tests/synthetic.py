"""A tiny learnable corpus for tests that train."""

from __future__ import annotations

import random
from pathlib import Path


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


def train_fp_run(root: Path, raw: dict) -> tuple[Path, Path]:
    """A synthetic corpus under ``root`` and the FP ``best.pt`` of experiment ``raw`` trained on it."""
    from nas.config.sections import parse_config
    from nas.core.data import load_corpus
    from nas.retrain.loop import train

    corpus_dir = write_synthetic_corpus(root / "corpus")
    train(parse_config(raw), load_corpus(corpus_dir), root / "fp", progress=False)
    return corpus_dir, root / "fp" / "best.pt"
