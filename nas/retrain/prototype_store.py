"""Reading a prototype folder: its index, its packed models, their cluster weights.

The folder is written by :func:`nas.pipeline.prototypes.build_prototypes`; retraining reads it
to start a map's clusters from the prototype weights of their width (inherited init), so the
reading side lives here, below both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from nas.core.errors import MpnasError
from nas.core.hashing import file_sha256
from search_spaces.clusters import cluster_weight, find_clusters
from search_spaces.packed import load_packed

INDEX = "prototypes.json"
INDEX_VERSION = 1


class PrototypeError(MpnasError):
    """A prototype folder that cannot serve: missing, stale or for another model."""


def prototype_file(out_dir: Path, bits: int) -> Path:
    """Where the packed ``bits``-bit prototype lives."""
    return Path(out_dir) / f"{bits}bit.mpq"


def read_index(out_dir: Path) -> dict[str, Any]:
    """``prototypes.json`` of ``out_dir`` (an empty index when there is none)."""
    path = Path(out_dir) / INDEX
    if not path.is_file():
        return {"version": INDEX_VERSION, "prototypes": {}}
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PrototypeError(f"{path}: not valid JSON ({exc})") from exc
    if index.get("version") != INDEX_VERSION or not isinstance(index.get("prototypes"), dict):
        raise PrototypeError(f"{path}: expected a prototype index of version {INDEX_VERSION} with a "
                             f"'prototypes' mapping, got version {index.get('version')!r}")
    return index


def load_prototypes(out_dir: str | Path, bits: list[int] | None = None) -> dict[int, nn.Module]:
    """The packed prototypes of ``out_dir`` as models (all widths in the index, or ``bits``).

    Every file is checked against the index's sha256, so a stale or swapped file is refused.
    """
    out_dir = Path(out_dir)
    entries = read_index(out_dir)["prototypes"]
    wanted = sorted(int(b) for b in entries) if bits is None else list(bits)
    missing = [b for b in wanted if str(b) not in entries]
    if missing or not wanted:
        raise PrototypeError(f"{out_dir}: no prototype for {missing or 'any width'}; it has "
                             f"{sorted(int(b) for b in entries)} (build them with `mpnas prototypes`)")
    models = {}
    for b in wanted:
        path = out_dir / entries[str(b)]["file"]
        if not path.is_file() or file_sha256(path) != entries[str(b)]["sha256"]:
            raise PrototypeError(f"{path}: missing or not the file {INDEX} lists (sha256 differs)")
        models[b], _ = load_packed(path)
    return models


def prototype_weights(models: dict[int, nn.Module], reference: nn.Module) -> dict[int, dict[str, Any]]:
    """Per width, every cluster's prototype weights (detached), checked against ``reference``'s clusters."""
    clusters = find_clusters(reference)
    out: dict[int, dict[str, Any]] = {}
    for b, model in models.items():
        theirs = find_clusters(model)
        if set(theirs) != set(clusters) or any(theirs[n].shape != clusters[n].shape for n in clusters):
            raise PrototypeError(f"the {b}-bit prototype has other clusters than the model "
                                 "(another architecture or vocabulary?)")
        out[b] = {name: cluster_weight(model, c).detach().clone() for name, c in theirs.items()}
    return out
