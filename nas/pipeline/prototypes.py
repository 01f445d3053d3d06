"""Uniform-precision prototypes: one retrained model per candidate bit width (issue 13).

The papers measure sensitivities and build their supernet on four uniform-precision models
retrained with ADMM at 1, 2, 4 and 8 bits (the "prototypes"), then fine-tune the chosen map from
the inherited prototype weights. :func:`build_prototypes` makes them: for every width it retrains
the FP checkpoint at uniform precision with the experiment's ``retrain`` section (resumable: an
interrupted width continues from its ``checkpoint.pt``), and stores the result as a packed file
(codes and scales, no pickle: small enough to commit, e.g. 1.2 MB at 2 bits for the PTB LSTM).

Folder layout (``out_dir``):

- ``<b>bit.mpq``: the b-bit prototype, packed (what later stages and other sessions read);
- ``<b>bit/``: its retraining run (``checkpoint.pt``, ``best.pt``, ``metrics.json``, and
  ``inputs.json``: a run made from other inputs is started again, not resumed); may be deleted
  once the ``.mpq`` exists (git ignores it);
- ``prototypes.json``: the index: per width the file, its sha256, valid/test perplexity, method,
  epochs, and what every prototype was made from (FP checkpoint sha256, retrain section).

A width whose ``.mpq`` is listed in the index with the same inputs is not retrained again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from nas.config.sections import ExperimentConfig
from nas.core.checkpoint import atomic_write_text
from nas.core.data import Corpus
from nas.core.hashing import canonical_hash, file_sha256
from nas.pipeline.stages import load_model
from nas.retrain.prototype_store import (
    INDEX,
    INDEX_VERSION,
    PrototypeError,
    prototype_file,
    read_index,
)
from nas.retrain.run import load_fp_checkpoint, retrain
from search_spaces.packed import export_packed
from search_spaces.precision import PrecisionMap
from search_spaces.quant import FULL_PRECISION, SUPPORTED_BITS

log = logging.getLogger(__name__)

def _inputs(exp: ExperimentConfig, fp_checkpoint: Path, method: str) -> dict[str, Any]:
    """What a prototype is made from; a change retrains it."""
    section = dataclasses.asdict(dataclasses.replace(exp.retrain, method=method))
    return {"fp_sha256": file_sha256(fp_checkpoint), "retrain": canonical_hash(section),
            "model": canonical_hash(exp.model), "data": canonical_hash(
                {k: v for k, v in dataclasses.asdict(exp.data).items() if k != "path"})}


def _check_bits(bits: list[int]) -> list[int]:
    bad = [b for b in bits if b not in SUPPORTED_BITS or b == FULL_PRECISION]
    if bad or not bits:
        raise PrototypeError(f"prototype widths {bits}: expected one or more of "
                             f"{[b for b in SUPPORTED_BITS if b != FULL_PRECISION]}")
    return sorted(set(bits))


def build_prototypes(exp: ExperimentConfig, corpus: Corpus, fp_checkpoint: str | Path, bits: list[int],
                     out_dir: str | Path, *, method: str | None = None, device: str = "cpu",
                     checkpoint_every: int = 200, progress: bool = False) -> dict[str, Any]:
    """Retrain ``fp_checkpoint`` at uniform ``bits`` for every width; returns the index.

    Widths already in the index with the same inputs are kept; the others are retrained (resuming
    an interrupted run) and exported. The index is rewritten after every width, atomically, so an
    interruption loses at most the width in progress (and not even that: its run resumes).
    """
    bits = _check_bits(list(bits))
    out_dir, fp_checkpoint = Path(out_dir), Path(fp_checkpoint)
    # prototypes start from the FP weights, whatever the recipe says for the maps built on them
    exp = dataclasses.replace(exp, retrain=dataclasses.replace(exp.retrain, init="fp"))
    method = method or exp.retrain.method
    load_fp_checkpoint(fp_checkpoint, corpus)  # vocabulary and format errors before any training
    inputs = _inputs(exp, fp_checkpoint, method)
    out_dir.mkdir(parents=True, exist_ok=True)
    index = read_index(out_dir)
    for b in bits:
        packed = prototype_file(out_dir, b)
        entry = index["prototypes"].get(str(b))
        if entry and entry["inputs"] == inputs and packed.is_file() and file_sha256(packed) == entry["sha256"]:
            log.info("%d-bit prototype: cached (%s)", b, packed)
            continue
        run = out_dir / f"{b}bit"
        stamp = run / "inputs.json"
        if run.exists() and (not stamp.is_file() or json.loads(stamp.read_text(encoding="utf-8")) != inputs):
            log.info("%d-bit prototype: %s was made from other inputs; starting it again", b, run)
            shutil.rmtree(run)  # never resume a run of another recipe or FP checkpoint
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_text(stamp, json.dumps(inputs, sort_keys=True) + "\n")
        model = load_model(fp_checkpoint)
        precision = PrecisionMap.uniform(model, b).with_meta({"prototype_bits": b, "method": method})
        log.info("%d-bit prototype: retraining with %s into %s", b, method, run)
        metrics = retrain(exp, corpus, fp_checkpoint, precision, run, method=method, device=device,
                          resume=(run / "checkpoint.pt").is_file(), progress=progress,
                          checkpoint_every=checkpoint_every)
        export_packed(load_model(run / "best.pt"), precision, packed)
        index["prototypes"][str(b)] = {
            "file": packed.name, "sha256": file_sha256(packed), "bytes": packed.stat().st_size,
            "valid_ppl": metrics["valid_ppl"], "test_ppl": metrics["test_ppl"], "method": method,
            "epochs_run": metrics.get("epochs_run", metrics.get("epochs")), "inputs": inputs}
        atomic_write_text(out_dir / INDEX, json.dumps(index, indent=1, sort_keys=True) + "\n")
    return index


def verify_prototypes(out_dir: str | Path, bits: list[int], fp_checkpoint: str | Path) -> dict[str, Any]:
    """The index of a given prototype folder, checked to serve ``fp_checkpoint`` at every width in ``bits``.

    Raises :class:`PrototypeError` naming the folder when the index is missing, a width has no
    prototype, a file differs from its index entry, or a prototype was made from another FP checkpoint.
    """
    out_dir = Path(out_dir)
    if not (out_dir / INDEX).is_file():
        raise PrototypeError(f"{out_dir}: no {INDEX}; expected a folder made by `mpnas prototypes`")
    entries = read_index(out_dir)["prototypes"]
    missing = [b for b in bits if str(b) not in entries]
    if missing:
        raise PrototypeError(f"{out_dir}: no prototype for width(s) {missing}; it has "
                             f"{sorted(int(b) for b in entries)} (build them with `mpnas prototypes --bits ...`)")
    fp_sha = file_sha256(Path(fp_checkpoint))
    for b in bits:
        entry = entries[str(b)]
        path = out_dir / entry["file"]
        if not path.is_file() or file_sha256(path) != entry["sha256"]:
            raise PrototypeError(f"{path}: missing or not the file {INDEX} lists (sha256 differs)")
        if entry["inputs"]["fp_sha256"] != fp_sha:
            raise PrototypeError(f"{path}: made from another FP checkpoint than {fp_checkpoint}; "
                                 "build the prototypes from it with `mpnas prototypes`")
    return {"version": INDEX_VERSION, "prototypes": entries}
