"""What the NNI test files share: the tiny experiment, its FP checkpoint (a module fixture), a skip mark."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import yaml

from nas.config.sections import parse_config
from tests.synthetic import write_synthetic_corpus

HAS_NNI = importlib.util.find_spec("nni") is not None
needs_nni = pytest.mark.skipif(not HAS_NNI, reason="NNI is not installed here; run in .venv-nni "
                               "(python3 -m venv .venv-nni && .venv-nni/bin/pip install -r requirements-nni.txt -e .)")

TINY = {"model": {"type": "lstm", "embed_dim": 8, "hidden_dim": 8, "num_layers": 1},
        "data": {"batch_size": 4, "bptt": 8, "eval_batch_size": 2},
        "train": {"optimizer": "adam", "lr": 0.02, "schedule": "constant", "epochs": 1, "max_steps_per_epoch": 10},
        "retrain": {"optimizer": "adam", "lr": 0.005, "schedule": "constant", "epochs": 1, "max_steps_per_epoch": 3,
                    "project_every": 2},
        "space": {"bits": [1, 2, 4]},
        "budget": {"avg_bits": 2.0},
        "search": {"epochs": 0.05}}


@pytest.fixture(scope="session")
def nni_fp(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny corpus, its experiment file and an FP checkpoint trained on it (a few seconds)."""
    from nas.core.data import load_corpus
    from nas.retrain.loop import train

    root = tmp_path_factory.mktemp("nni_fp")
    corpus = write_synthetic_corpus(root / "corpus")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY, sort_keys=False))
    train(parse_config(TINY, str(config)), load_corpus(corpus), root / "fp", progress=False)
    return {"root": root, "corpus": corpus, "config": config, "checkpoint": root / "fp" / "best.pt"}


def _config(tmp_path: Path, **sections: Any) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({**TINY, **sections}, sort_keys=False))
    return path
