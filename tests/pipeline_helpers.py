"""What the pipeline test files share: a tiny experiment, writing it, reading which stages ran."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.synthetic import write_synthetic_corpus

TINY: dict[str, Any] = {
    "model": {"type": "lstm", "embed_dim": 8, "hidden_dim": 8, "num_layers": 1},
    "data": {"batch_size": 4, "bptt": 8, "eval_batch_size": 4},
    "train": {"optimizer": "adam", "lr": 0.02, "schedule": "constant", "epochs": 2, "max_steps_per_epoch": 20},
    "retrain": {"optimizer": "adam", "lr": 0.01, "schedule": "constant", "epochs": 2, "max_steps_per_epoch": 10,
                "project_every": 5},
    "space": {"bits": [1, 2, 4, 8]},
    "search": {"epochs": 0.3, "kl_tokens": 200},
    "pipeline": {"strategies": ["kl", "gumbel"], "budgets": [2, 4]},
}


def write_config(folder: Path, raw: dict[str, Any]) -> Path:
    """``raw`` as ``folder/tiny.yaml``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.yaml"  # the model name in every row is the file's stem
    path.write_text(yaml.safe_dump(raw))
    return path


def ran_stages(lines: list[str]) -> set[str]:
    """Stages a run executed, from its progress lines ``[i/n] retrain kl_b2: done in 0.1 s``."""
    done = [line.split("] ", 1)[1].rsplit(": done in", 1)[0] for line in lines if ": done in" in line]
    return {name.replace(" ", "/") for name in done}


def run_tiny(root: Path, raw: dict[str, Any], corpus_dir: Path) -> list[str]:
    """Run the pipeline of ``raw`` into ``root/run``; its progress lines."""
    from nas.pipeline.runner import run_pipeline

    lines: list[str] = []
    run_pipeline(write_config(root, raw), root / "run", data=corpus_dir, command="mpnas pipeline tiny.yaml",
                 log=lines.append)
    return lines


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic corpus the pipeline tests run on (one per session; a test file may define its own)."""
    return write_synthetic_corpus(tmp_path_factory.mktemp("pipeline") / "corpus")
