"""What a run folder records: its stages (``state.json``: inputs hash, done, seconds) and result rows."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from nas.core.checkpoint import atomic_write_json
from nas.core.errors import MpnasError


def section_inputs(section: Any) -> dict[str, Any]:
    """A train/retrain section as hashed into a stage's inputs.

    Keys added after runs already existed are left out at their neutral default (``valid_tokens:
    None``, the whole valid split; ``learn_scales: false`` and its ``scale_lr``; ``init: fp``), so that such runs
    keep their hashes and are not redone.
    """
    values = dataclasses.asdict(section)
    if values.get("valid_tokens", 0) is None:
        del values["valid_tokens"]
    if values.get("learn_scales") is False:
        del values["learn_scales"]
        values.pop("scale_lr", None)
    if values.get("ste_clip") is False:
        del values["ste_clip"]
    if values.get("init") == "fp":
        del values["init"]
    return values


class PipelineError(MpnasError):
    """A pipeline cannot go on (e.g. the report module is missing); the message says what to do."""


class RunState:
    """``state.json``: per stage, the inputs hash, whether it finished and how long it took."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.stages: dict[str, dict[str, Any]] = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, stage: str) -> dict[str, Any] | None:
        """The entry of ``stage`` (None if it never started)."""
        return self.stages.get(stage)

    def seconds(self, stage: str) -> float | None:
        """Seconds the call that completed ``stage`` took (None if unknown)."""
        entry = self.stages.get(stage)
        return None if entry is None else entry.get("seconds")

    def set(self, stage: str, inputs_hash: str, done: bool, seconds: float | None) -> None:
        """Record ``stage`` and rewrite state.json atomically."""
        self.stages[stage] = {"inputs_hash": inputs_hash, "done": done, "seconds": seconds}
        atomic_write_json(self.path, self.stages)

    def drop(self, stage: str) -> None:
        """Forget ``stage``."""
        if self.stages.pop(stage, None) is not None:
            atomic_write_json(self.path, self.stages)


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    """The result rows of a run folder (``eval/*.json``), FP first, then by label."""
    rows = sorted((Path(run_dir) / "eval").glob("*.json"), key=lambda p: (p.stem != "fp", p.stem))
    return [json.loads(p.read_text()) for p in rows]
