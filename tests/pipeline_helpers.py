"""What the pipeline test files share: a tiny experiment, writing it, reading which stages ran."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

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
