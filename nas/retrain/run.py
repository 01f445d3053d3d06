"""``mpnas retrain``: quantization-aware retraining of an FP checkpoint towards a precision map.

Writes into its run folder what :func:`nas.retrain.loop.train` writes (``checkpoint.pt``, ``best.pt``
with the quantized weights, ``metrics.json``) plus ``precision.yaml`` (the map it trained
towards); ``metrics.json`` adds the size numbers of :func:`search_spaces.size.model_size`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from nas.config.sections import RETRAIN_METHODS, ExperimentConfig, RetrainSection
from nas.core.checkpoint import atomic_write_bytes, atomic_write_json, load_checkpoint, save_checkpoint
from nas.core.corpus_report import describe_vocab_mismatch
from nas.core.data import Corpus, DataError
from nas.core.errors import CheckpointError, UsageError
from nas.core.hashing import file_sha256
from nas.retrain.admm import AdmmHooks
from nas.retrain.distill import Distiller
from nas.retrain.distributed import dist_info_from_env, resolve_device
from nas.retrain.hooks import TrainingHooks
from nas.retrain.loop import _evaluate, train
from nas.retrain.prototype_store import PrototypeError, load_prototypes, prototype_weights, read_index
from nas.retrain.ste import QuantizedClusters, SteHooks
from search_spaces.clusters import cluster_weight, find_clusters
from search_spaces.models import build_model, restore_model
from search_spaces.precision import PrecisionMap
from search_spaces.quant import FULL_PRECISION
from search_spaces.size import model_size


def load_fp_checkpoint(path: str | Path, corpus: Corpus | None = None) -> dict[str, Any]:
    """Read a ``best.pt`` of ``mpnas train``; checks its vocabulary against ``corpus``."""
    ckpt = load_checkpoint(Path(path))
    for key in ("model", "config"):
        if key not in ckpt:
            raise CheckpointError(f"{path}: not an mpnas model checkpoint (missing '{key}')")
    if corpus is not None and "vocab" in ckpt and tuple(ckpt["vocab"]) != corpus.vocab.words:
        raise DataError(f"{path}: its vocabulary differs from the corpus in {corpus.folder}: "
                        f"{describe_vocab_mismatch(ckpt['vocab'], corpus.vocab.words)}")
    return ckpt


def resolve_precision(spec: str, model: nn.Module) -> PrecisionMap:
    """A precision map from a file, or ``uniform:B`` for every cluster at B bits."""
    if spec.startswith("uniform:"):
        value = spec.split(":", 1)[1]
        if not value.isdigit():
            raise UsageError(f"--precision {spec!r}: expected uniform:BITS with an integer, e.g. uniform:4")
        return PrecisionMap.uniform(model, int(value))
    return PrecisionMap.load(Path(spec))


def make_hooks(cfg: RetrainSection, precision: PrecisionMap, method: str) -> Any:
    """The hooks factory :func:`nas.retrain.loop.train` calls once the FP weights are loaded."""

    def build(model: nn.Module) -> TrainingHooks:
        if method == "admm":
            return AdmmHooks(model, precision, rho=cfg.rho, rho_growth=cfg.rho_growth, rho_max=cfg.rho_max,
                             project_every=cfg.project_every, project_every_epochs=cfg.project_every_epochs,
                             forward=cfg.admm_forward, learn_scales=cfg.learn_scales, scale_lr=cfg.scale_lr,
                             ste_clip=cfg.ste_clip)
        return SteHooks(model, precision, rescale_every=cfg.project_every,
                        rescale_every_epochs=cfg.project_every_epochs, learn_scales=cfg.learn_scales,
                        scale_lr=cfg.scale_lr, ste_clip=cfg.ste_clip)

    return build


def make_distiller(cfg: RetrainSection, ckpt: dict[str, Any], device: str | None) -> Distiller | None:
    """The FP checkpoint as a frozen teacher when ``retrain.distill`` > 0, else None."""
    if cfg.distill <= 0:
        return None
    teacher = restore_model(ckpt)
    teacher.to(resolve_device(device, dist_info_from_env()))
    return Distiller(teacher, cfg.distill, cfg.distill_temperature)


def _copy_file(src: Path, dst: Path) -> None:
    atomic_write_bytes(dst, src.read_bytes())


def _selection_ppl(metrics: dict[str, Any], corpus: Corpus) -> float:
    """The perplexity that chooses between two runs' best checkpoints: the one per-epoch validation
    measured (``selection_valid_ppl``, on the first ``valid_tokens`` valid tokens) when that was a
    slice, else the whole-split ``valid_ppl`` (as before ``valid_tokens`` existed)."""
    full = corpus.split("valid").numel()
    if metrics.get("selection_valid_tokens", full) < full and "selection_valid_ppl" in metrics:
        return float(metrics["selection_valid_ppl"])
    return float(metrics["valid_ppl"])


def _add_seconds(metrics: dict[str, Any], train_s: float = 0.0, valid_s: float = 0.0) -> None:
    for key, value in (("train_seconds", train_s), ("valid_seconds", valid_s)):
        metrics[key] = float(metrics.get(key, 0.0)) + value


def _ste_tail(exp: ExperimentConfig, corpus: Corpus, cfg: RetrainSection, precision: PrecisionMap,
              ckpt: dict[str, Any], out_dir: Path, metrics: dict[str, Any], device: str | None, resume: bool,
              progress: bool) -> dict[str, Any]:
    """A short STE fine-tune from ADMM's best weights; keeps whichever of the two validates better.

    ADMM's result is kept apart first (``admm_best.pt``, ``admm_metrics.json``), so a killed or
    resumed run never mistakes the tail's weights for ADMM's. The tail draws its batches with
    another seed, ``retrain.seed + 1`` (a Transformer would otherwise replay the first batches of
    ADMM's first epoch),
    is distilled like ADMM was, and runs in ``out_dir/ste_finetune``; ``best.pt`` becomes a copy
    of the winner. ADMM's metrics (residuals included) stay, with the tail's valid perplexity and
    the choice recorded.
    """
    main = dist_info_from_env().is_main
    admm_best = out_dir / "admm_best.pt"
    tuned = load_checkpoint(admm_best if admm_best.is_file() else out_dir / "best.pt")
    if main and not admm_best.is_file():
        _copy_file(out_dir / "best.pt", admm_best)
        atomic_write_json(out_dir / "admm_metrics.json", metrics)
    short = dataclasses.replace(cfg, epochs=1, max_steps_per_epoch=cfg.ste_finetune_steps, seed=cfg.seed + 1)
    tail = train(exp, corpus, out_dir / "ste_finetune", device=device, resume=resume, progress=progress,
                 train_cfg=short, initial_state=tuned["model"], make_hooks=make_hooks(cfg, precision, "ste"),
                 distiller=make_distiller(cfg, ckpt, device))
    kept = _selection_ppl(tail, corpus) < _selection_ppl(metrics, corpus)
    merged = {**metrics, "ste_finetune_valid_ppl": tail["valid_ppl"], "ste_finetune_kept": kept}
    _add_seconds(merged, tail.get("train_seconds", 0.0), tail.get("valid_seconds", 0.0))
    if kept:
        merged.update({k: tail[k] for k in ("valid_ppl", "test_ppl", "selection_valid_ppl") if k in tail})
    if main:
        _copy_file(out_dir / "ste_finetune" / "best.pt" if kept else admm_best, out_dir / "best.pt")
    return merged


def _finished(out_dir: Path, method: str, precision: PrecisionMap) -> dict[str, Any] | None:
    """metrics.json of a run that completed with this method and map (a resumed finished run is a no-op)."""
    path = out_dir / "metrics.json"
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    if metrics.get("method") == method and metrics.get("precision") == dict(precision.bits):
        return metrics
    return None


def _keep_projected_start_if_better(exp: ExperimentConfig, corpus: Corpus, ckpt: dict[str, Any],
                                    precision: PrecisionMap, out_dir: Path, metrics: dict[str, Any],
                                    device: str | None) -> dict[str, Any]:
    """Best-on-valid includes the starting point: the FP weights projected onto the map.

    At 8 bits the projection alone is almost lossless, and a short retraining at a large
    learning rate can only move the weights away from the FP optimum; the best checkpoint
    must then be the projected start, as it would be had the loop validated at step 0: on the
    same first ``retrain.valid_tokens`` valid tokens (``start_selection_valid_ppl``).
    ``start_valid_ppl`` is the start's whole-split perplexity, None when that was not measured
    (a slice chose the retrained weights).
    """
    dev = resolve_device(device, dist_info_from_env())
    start = restore_model(ckpt)
    start.to(dev)
    QuantizedClusters(start, precision).hard_project_(start)
    full = corpus.split("valid").numel()
    tokens = full if exp.retrain.valid_tokens is None else min(exp.retrain.valid_tokens, full)
    tick = time.perf_counter()
    selection = _evaluate(start, exp, corpus, "valid", dev, None if tokens == full else tokens)
    metrics = {**metrics, "start_selection_valid_ppl": selection,
               "start_valid_ppl": selection if tokens == full else None, "kept_start": False}
    if selection < _selection_ppl(metrics, corpus):
        valid = selection if tokens == full else _evaluate(start, exp, corpus, "valid", dev)
        metrics.update(valid_ppl=valid, test_ppl=_evaluate(start, exp, corpus, "test", dev), kept_start=True,
                       start_valid_ppl=valid, selection_valid_ppl=selection)
        if "ste_finetune_kept" in metrics:
            metrics["ste_finetune_kept"] = False
        save_checkpoint(out_dir / "best.pt", {"model": start.state_dict(), "config": ckpt["config"],
                                              "vocab": list(corpus.vocab.words), "valid_ppl": selection,
                                              "valid_tokens": tokens, "epoch": 0})
    _add_seconds(metrics, valid_s=time.perf_counter() - tick)
    return metrics


def inherited_state(fp_checkpoint: str | Path, ckpt: dict[str, Any], precision: PrecisionMap,
                    prototypes: str | Path) -> dict[str, torch.Tensor]:
    """The FP weights with every quantized cluster replaced by its prototype's (issue 13, item 5).

    A b-bit cluster starts from its weights in the b-bit prototype, which lie on a b-bit table,
    so the least-squares projection (and the first scales) of retraining keep them exactly; full
    precision clusters, biases and norms keep the FP values. The prototypes must have been made
    from this FP checkpoint (their index records its sha256).
    """
    index = read_index(Path(prototypes))["prototypes"]
    made_from = {entry["inputs"]["fp_sha256"] for entry in index.values()}
    if made_from and made_from != {file_sha256(Path(fp_checkpoint))}:
        raise PrototypeError(f"{prototypes}: its prototypes were made from another FP checkpoint than "
                             f"{fp_checkpoint}; build them from it with `mpnas prototypes`")
    model = restore_model(ckpt)
    widths = sorted({b for b in precision.bits.values() if b < FULL_PRECISION})
    weights = prototype_weights(load_prototypes(prototypes, widths), model)
    clusters = find_clusters(model)
    with torch.no_grad():
        for name, bits in precision.bits.items():
            if bits < FULL_PRECISION:
                cluster_weight(model, clusters[name]).copy_(weights[bits][name])
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def retrain(exp: ExperimentConfig, corpus: Corpus, fp_checkpoint: str | Path, precision: PrecisionMap,
            out_dir: str | Path, *, method: str | None = None, device: str | None = "cpu", resume: bool = False,
            progress: bool = True, checkpoint_every: int = 0, stop_after_steps: int | None = None,
            prototypes: str | Path | None = None) -> dict[str, Any]:
    """Retrain ``fp_checkpoint`` at ``precision`` with ADMM or STE; returns metrics.json's content.

    With ``retrain.init: inherited`` every quantized cluster starts from its weights in the
    prototype of its width, read from the ``prototypes`` folder (:func:`inherited_state`); the
    distillation teacher stays the FP model.
    """
    out_dir = Path(out_dir)
    ckpt = load_fp_checkpoint(fp_checkpoint, corpus)
    teacher_ckpt = ckpt
    model_config = dict(ckpt["config"])
    cfg = exp.retrain
    if cfg.dropout is not None:
        model_config["dropout"] = cfg.dropout  # regularisation only: the weights' shapes are unchanged
    exp = dataclasses.replace(exp, model=model_config)  # the checkpoint's architecture wins
    probe = build_model(model_config["type"], **{k: v for k, v in model_config.items() if k != "type"})
    probe.load_state_dict(ckpt["model"])
    precision.validate(probe)  # the map against the model, before prototypes are read or anything trains
    method = method or cfg.method
    if method not in RETRAIN_METHODS:
        raise UsageError(f"unknown retraining method {method!r}; expected one of {list(RETRAIN_METHODS)}")
    if cfg.init == "inherited":
        if prototypes is None:
            raise UsageError("retrain.init is 'inherited' but no prototype folder was given (--prototypes DIR, "
                             "made by `mpnas prototypes`)")
        ckpt = {**ckpt, "model": inherited_state(fp_checkpoint, ckpt, precision, prototypes)}
        probe.load_state_dict(ckpt["model"])
    out_dir.mkdir(parents=True, exist_ok=True)
    precision.save(out_dir / "precision.yaml")
    if resume and (done := _finished(out_dir, method, precision)) is not None:
        return done
    tail = method == "admm" and cfg.ste_finetune_steps > 0
    if resume and tail and (out_dir / "admm_metrics.json").is_file():
        metrics = json.loads((out_dir / "admm_metrics.json").read_text())  # ADMM finished before the tail
    else:
        metrics = train(exp, corpus, out_dir, device=device, resume=resume, progress=progress,
                        checkpoint_every=checkpoint_every, stop_after_steps=stop_after_steps, train_cfg=cfg,
                        initial_state=ckpt["model"], make_hooks=make_hooks(cfg, precision, method),
                        distiller=make_distiller(cfg, teacher_ckpt, device))
        if metrics.get("stopped_early"):
            return metrics
    if tail:
        metrics = _ste_tail(exp, corpus, cfg, precision, teacher_ckpt, out_dir, metrics, device, resume, progress)
    if not dist_info_from_env().is_main:
        # rank 0 alone finishes the run folder (the process group is gone); sizes need only shapes
        return {**metrics, "method": method, "precision": dict(precision.bits), **model_size(probe, precision)}
    metrics = _keep_projected_start_if_better(exp, corpus, ckpt, precision, out_dir, metrics, device)
    final = load_checkpoint(out_dir / "best.pt")
    probe.load_state_dict(final["model"])
    metrics.update({"method": method, "precision": dict(precision.bits), **model_size(probe, precision)})
    atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics


