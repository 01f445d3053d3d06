"""What the ``mpnas`` subcommands share: loading any model file, reporting user errors."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

from nas.config.sections import ConfigError
from nas.core.errors import MpnasError
from search_spaces.models import restore_model
from search_spaces.space_parsing import SpaceError


def is_packed(path: Path) -> bool:
    from search_spaces.packed_format import MAGIC

    with path.open("rb") as handle:
        return handle.read(len(MAGIC)) == MAGIC


def precision_beside(checkpoint: Path) -> Path:
    """The precision map of a checkpoint: ``precision.yaml`` in its folder (as ``mpnas retrain`` writes it)."""
    return checkpoint.parent / "precision.yaml"


def load_any_model(path: Path, keep_packed: bool = False
                   ) -> tuple[torch.nn.Module, dict[str, float], tuple[str, ...] | None]:
    """A model from a packed file (its weights kept packed with ``keep_packed``) or a checkpoint, with its
    size numbers and vocabulary."""
    from nas.retrain.run import load_fp_checkpoint
    from search_spaces.packed import load_packed
    from search_spaces.precision import PrecisionMap
    from search_spaces.size import model_size

    if is_packed(path):
        model, precision = load_packed(path, keep_packed=keep_packed)
        if keep_packed:
            from search_spaces.packed_runtime import packed_model_size

            size = {**packed_model_size(path), "packed_bytes": float(path.stat().st_size)}
        else:
            size = {**model_size(model, precision), "packed_bytes": float(path.stat().st_size)}
        return model, size, None
    ckpt = load_fp_checkpoint(path)
    model = restore_model(ckpt)
    precision_file = precision_beside(path)
    precision = PrecisionMap.load(precision_file) if precision_file.is_file() else PrecisionMap.uniform(model, 32)
    vocab = tuple(ckpt["vocab"]) if "vocab" in ckpt else None
    return model, model_size(model, precision), vocab


# What ``mpnas`` reports as ``mpnas: error: <message>`` with exit status 2: the user's own mistakes
# (nas.core.errors.MpnasError and its subclasses: DataError, CheckpointError, UsageError, PackedFileError,
# PrecisionMapError, PrototypeError, NBestError, TrainingDivergedError, ...), a missing file, a
# file that is not UTF-8 text (mpnas decodes only the files it is given), a config or a search
# space that does not validate. Any other exception is a bug: it propagates with its traceback.
USER_ERRORS: tuple[type[Exception], ...] = (MpnasError, FileNotFoundError, UnicodeDecodeError, ConfigError,
                                           SpaceError)


def run_reporting_user_errors(func: Callable[[], int]) -> int:
    """``func()``; a user error (:data:`USER_ERRORS`) prints ``mpnas: error: ...`` and returns 2."""
    try:
        return func()
    except USER_ERRORS as exc:
        print(f"mpnas: error: {exc}", file=sys.stderr)
        return 2
