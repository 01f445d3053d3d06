"""The stages of ``mpnas pipeline``, one function each, and the hashes that decide what reruns.

Each stage reads its upstream artifacts from disk and writes its own artifact atomically, so
the runner in :mod:`nas.pipeline.runner` can skip, resume or redo any of them:

- :func:`train_fp` / :func:`record_fp_source`: the FP model (``fp/best.pt`` or a given checkpoint);
- :func:`search_point`: one strategy at one budget -> ``search/<label>/precision.yaml``;
- :func:`retrain_point`: ADMM/STE retraining -> ``retrain/<label>/best.pt``, ``metrics.json``,
  ``model.mpq`` (the packed export);
- :func:`fp_row` / :func:`quantized_row`: one result row (perplexity and sizes) per model;
  byte counts are whole bytes (``theoretical_bytes`` rounded up), as evaluators.report expects.

Hashes are of content, not of file bytes where bytes carry noise: a checkpoint hashes its
tensors and config, a precision map its bits and granularity (its ``meta`` holds wall times).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evaluators.perplexity import perplexity
from nas.config.sections import ExperimentConfig, PipelineSection
from nas.core.checkpoint import atomic_write_json, load_checkpoint
from nas.core.data import Corpus
from nas.core.hashing import canonical_hash, file_sha256
from nas.retrain.loop import evaluation_settings, train
from nas.retrain.prototype_store import load_prototypes, prototype_weights
from nas.retrain.run import load_fp_checkpoint, retrain
from nas.search.base import SearchData
from nas.search.strategies import get_strategy
from search_spaces.models import restore_model
from search_spaces.packed import export_packed, load_packed
from search_spaces.precision import PrecisionMap
from search_spaces.quant import FULL_PRECISION
from search_spaces.size import model_size
from search_spaces.space import SearchSpace

ROW_KEYS = ("model", "strategy", "budget", "avg_bits", "theoretical_bytes", "packed_bytes", "compression",
            "valid_ppl", "test_ppl", "wer", "search_s", "retrain_s", "precision")
PACKED_META = ("strategy", "seed", "budget", "label")  # precision-map meta copied into model.mpq


@dataclass(frozen=True)
class Point:
    """One searched model: a strategy at a budget (average bits per weight)."""

    strategy: str
    budget: float

    @property
    def label(self) -> str:
        """Folder and file name of the point, e.g. ``kl_b2`` or ``uniform_b4``."""
        return f"{self.strategy}_b{self.budget:g}"


def plan_points(section: PipelineSection) -> list[Point]:
    """Every strategy at every budget, then the uniform baseline at the integer budgets."""
    points = [Point(s, float(b)) for s in section.strategies for b in section.budgets]
    if section.include_uniform and "uniform" not in section.strategies:
        points += [Point("uniform", float(b)) for b in section.budgets if float(b).is_integer()]
    return points


# --- hashing -----------------------------------------------------------------------------------

def _update_tensors(digest: Any, tensors: dict[str, torch.Tensor]) -> None:
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())


def checkpoint_hash(path: Path) -> str:
    """Hash of a model checkpoint's weights, config and vocabulary (not of its file bytes)."""
    ckpt = load_checkpoint(Path(path))
    digest = hashlib.sha256()
    _update_tensors(digest, ckpt["model"])
    digest.update(json.dumps({"config": ckpt.get("config"), "vocab": ckpt.get("vocab")}, sort_keys=True,
                             default=str).encode())
    return digest.hexdigest()


def precision_hash(precision: PrecisionMap) -> str:
    """Hash of what a map decides (bits, granularity, leftover bits); its ``meta`` is evidence, not input.

    ``leftover_bits`` enters only when it is not 32, so maps from before it keep their hashes.
    """
    decided: dict[str, Any] = {"bits": dict(precision.bits), "granularity": precision.granularity}
    if precision.leftover_bits != FULL_PRECISION:
        decided["leftover_bits"] = precision.leftover_bits
    return canonical_hash(decided)


def corpus_hash(corpus: Corpus) -> str:
    """Hash of the vocabulary and the three token streams."""
    digest = hashlib.sha256("\n".join(corpus.vocab.words).encode())
    _update_tensors(digest, {"train": corpus.train, "valid": corpus.valid, "test": corpus.test})
    return digest.hexdigest()


# --- stages ------------------------------------------------------------------------------------

def load_model(checkpoint: Path, corpus: Corpus | None = None) -> nn.Module:
    """The model stored in an mpnas checkpoint (vocabulary checked against ``corpus``)."""
    ckpt = load_fp_checkpoint(checkpoint, corpus)
    model = restore_model(ckpt)
    return model


def train_fp(exp: ExperimentConfig, corpus: Corpus, fp_dir: Path, *, device: str, checkpoint_every: int
             ) -> dict[str, Any]:
    """FP training into ``fp_dir`` (``best.pt``, ``metrics.json``), resuming its ``checkpoint.pt``."""
    return train(exp, corpus, fp_dir, device=device, resume=(fp_dir / "checkpoint.pt").is_file(), progress=False,
                 checkpoint_every=checkpoint_every)


def record_fp_source(checkpoint: Path, fp_dir: Path, corpus: Corpus) -> None:
    """Check a given FP checkpoint against the corpus and write ``fp_dir/source.json``."""
    load_fp_checkpoint(checkpoint, corpus)
    atomic_write_json(fp_dir / "source.json", {"path": str(Path(checkpoint).resolve()),
                                               "sha256": file_sha256(checkpoint)})


def search_point(exp: ExperimentConfig, corpus: Corpus, fp_checkpoint: Path, point: Point, out: Path, *,
                 cache_dir: Path, device: str, prototypes: Path | None = None) -> PrecisionMap:
    """Search one precision map (``point.strategy`` at ``point.budget`` average bits) into ``out``.

    ``prototypes``: a prototype folder (nas/pipeline/prototypes.py) that kl and hessian score on.
    """
    model = load_model(fp_checkpoint, corpus)
    weights = None
    if prototypes is not None:
        weights = prototype_weights(load_prototypes(prototypes), model)
    budget = {"avg_bits": point.budget}
    space = SearchSpace.from_config(exp.space, budget, model, exp.source)
    settings = dataclasses.replace(exp.search, strategy=point.strategy)
    recurrent = hasattr(model, "init_state")
    data = SearchData(train=corpus.train, valid=corpus.valid, batch_size=exp.data.batch_size,
                      length=exp.data.bptt if recurrent else exp.data.context, device=device, cache_dir=cache_dir,
                      prototypes=weights)
    torch.manual_seed(settings.seed)  # dropout in a supernet draws from the global generator
    found = get_strategy(point.strategy).search(model, space, data, settings)
    precision = found.with_meta({**found.meta, "budget": budget, "label": point.label})
    precision.save(out)
    return precision


def retrain_point(exp: ExperimentConfig, corpus: Corpus, fp_checkpoint: Path, precision_file: Path, out_dir: Path,
                  *, method: str, device: str, checkpoint_every: int, prototypes: Path | None = None
                  ) -> dict[str, Any]:
    """Retrain at a map (resuming ``out_dir/checkpoint.pt``), then export ``out_dir/model.mpq``."""
    precision = PrecisionMap.load(precision_file)
    metrics = retrain(exp, corpus, fp_checkpoint, precision, out_dir, method=method, device=device,
                      resume=(out_dir / "checkpoint.pt").is_file(), progress=False, checkpoint_every=checkpoint_every,
                      prototypes=prototypes)
    model = load_model(out_dir / "best.pt")
    # The packed header keeps the map's identity, not its evidence: score tables and gumbel
    # histories would inflate packed_bytes, and wall times would make the file differ per run.
    kept = {k: precision.meta[k] for k in PACKED_META if k in precision.meta}
    export_packed(model, precision.with_meta(kept), out_dir / "model.mpq")
    return metrics


def _perplexities(model: nn.Module, exp: ExperimentConfig, corpus: Corpus, device: str) -> dict[str, float]:
    """Valid and test perplexity, batched as FP training validates."""
    model.to(device)
    return {f"{split}_ppl": perplexity(model, corpus.split(split), corpus.vocab.eos_id,
                                       batch_size=exp.data.eval_batch_size, bptt=exp.data.bptt,
                                       stride=exp.data.eval_stride, device=device)["ppl"]
            for split in ("valid", "test")}


def _measured(model: nn.Module, checkpoint: Path | None, evaluation: dict[str, Any], *, vouched: bool = False
              ) -> dict[str, float] | None:
    """valid/test perplexity from the ``metrics.json`` beside ``checkpoint``, if ``model`` holds its weights.

    :func:`nas.retrain.loop.train` measures them at the end of (re)training, on the final weights, the
    way :func:`_perplexities` does; when ``model``'s tensors equal the checkpoint's bit for bit,
    measuring again would give the same numbers and cost two passes over the data. The numbers
    are reused when metrics.json's ``evaluation`` (:func:`nas.retrain.loop.evaluation_settings`: batching
    and the valid/test streams) equals ``evaluation``, or, for a metrics.json written before that
    record existed, when the caller ``vouched`` that this run measured it with these settings.
    """
    if checkpoint is None or not (checkpoint.parent / "metrics.json").is_file():
        return None
    metrics = json.loads((checkpoint.parent / "metrics.json").read_text())
    recorded = metrics.get("evaluation")
    if not (recorded == evaluation if recorded is not None else vouched):
        return None
    reference, state = load_checkpoint(checkpoint)["model"], model.state_dict()
    if state.keys() != reference.keys() or not all(torch.equal(state[k].cpu(), reference[k]) for k in state):
        return None
    if not all(isinstance(metrics.get(k), float) for k in ("valid_ppl", "test_ppl")):
        return None
    return {"valid_ppl": metrics["valid_ppl"], "test_ppl": metrics["test_ppl"]}


def fp_row(exp: ExperimentConfig, corpus: Corpus, fp_checkpoint: Path, model_name: str, *, device: str,
           trained_here: bool = False) -> dict[str, Any]:
    """The result row of the FP model (32 bits, not packed).

    The perplexities of the ``metrics.json`` beside the checkpoint are reused when it recorded
    the same evaluation settings (any ``mpnas train`` run), or, for an older metrics.json without
    that record, when ``trained_here`` (this run's FP stage wrote it, with this config).
    """
    model = load_model(fp_checkpoint, corpus)
    size = model_size(model, PrecisionMap.uniform(model, 32))
    ppl = (_measured(model, fp_checkpoint, evaluation_settings(exp, corpus), vouched=trained_here)
           or _perplexities(model, exp, corpus, device))
    return {"model": model_name, "strategy": "fp", "budget": None, "avg_bits": size["avg_bits"],
            "theoretical_bytes": math.ceil(size["theoretical_bytes"]), "packed_bytes": None,
            "compression": size["compression"], **ppl, "wer": None, "search_s": None, "retrain_s": None,
            "precision": None}


def quantized_row(exp: ExperimentConfig, corpus: Corpus, packed: Path, point: Point, model_name: str, *,
                  precision_rel: str, search_s: float | None, retrain_s: float | None, device: str
                  ) -> dict[str, Any]:
    """The result row of a retrained model, from its packed file (what ships).

    Perplexities are measured on the packed model, or taken from retraining's ``metrics.json``
    when the packed weights equal ``best.pt`` beside it bit for bit (see :func:`_measured`).
    """
    model, precision = load_packed(packed)
    size = model_size(model, precision)
    ppl = (_measured(model, packed.parent / "best.pt", evaluation_settings(exp, corpus), vouched=True)
           or _perplexities(model, exp, corpus, device))
    return {"model": model_name, "strategy": point.strategy, "budget": point.budget, "avg_bits": size["avg_bits"],
            "theoretical_bytes": math.ceil(size["theoretical_bytes"]), "packed_bytes": packed.stat().st_size,
            "compression": size["compression"], **ppl, "wer": None, "search_s": search_s, "retrain_s": retrain_s,
            "precision": precision_rel}
