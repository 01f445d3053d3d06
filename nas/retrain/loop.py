"""Full-precision LM training: SGD (Zaremba recipe) or Adam, checkpoint/resume, DDP.

Run folder layout (``out_dir``):
- ``checkpoint.pt``: latest state (model, optimizer, RNG, position), rewritten atomically
  at the end of every epoch and every ``checkpoint_every`` steps.
- ``best.pt``: model weights with the best validation perplexity, plus its config and
  vocabulary (the starting point of quantization); ``valid_ppl`` there is the per-epoch
  measurement that chose it, on its first ``valid_tokens`` valid tokens.
- ``metrics.json``: per-epoch history (train loss, valid ppl, lr, tokens/s) and the best
  checkpoint's ``valid_ppl`` / ``test_ppl`` on the whole splits.

Validation after every epoch scores the first ``train.valid_tokens`` tokens of the valid split
(all of them by default); it only chooses ``best.pt``. When it scored the whole split and the
final weights are those it scored, its number is the final ``valid_ppl`` (not measured twice).
``metrics.json`` also records ``epochs`` (configured), ``epochs_run`` (optimizer steps run /
steps of a full epoch: 0.25 when ``max_steps_per_epoch`` cut epochs to a quarter) and ``steps``,
``train_seconds`` (training steps) and ``valid_seconds`` (validation and the final evaluation),
both summed over resumed calls, ``selection_valid_tokens`` / ``selection_valid_ppl`` (the
per-epoch measurement of ``best.pt``) and ``evaluation`` (:func:`evaluation_settings`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from evaluators.perplexity import perplexity
from nas.config.sections import ConfigError, ExperimentConfig, TrainSection
from nas.core.batches import iter_stream_chunks, stream_batches, window_batches
from nas.core.checkpoint import atomic_write_json, load_checkpoint, save_checkpoint
from nas.core.corpus_report import corpus_summary
from nas.core.data import Corpus
from nas.core.errors import CheckpointError, MpnasError
from nas.retrain.distill import Distiller
from nas.retrain.distributed import DistInfo, barrier, dist_info_from_env, init_distributed, resolve_device, shutdown
from search_spaces.models import build_model, model_config_dict

log = logging.getLogger(__name__)


class TrainingDivergedError(MpnasError, RuntimeError):
    """The loss or gradient norm became NaN or infinite (the message says which setting to lower)."""


class TrainingHooks:
    """Extension points of the training loop; the defaults do nothing (plain FP training).

    Quantization-aware retraining (ADMM, STE) subclasses this instead of copying the loop.
    """

    def begin(self, steps_per_epoch: int) -> None:
        """Called once before the first step of this call (fresh or resumed), with the epoch length."""

    def before_forward(self, model: nn.Module) -> None:
        """Called before each training forward pass."""

    def penalty(self, model: nn.Module) -> torch.Tensor | None:
        """An extra loss term added to the cross-entropy (before ``loss_reduction`` scaling)."""
        return None

    def before_step(self, model: nn.Module) -> None:
        """Called after backward, before gradient clipping and the optimizer step."""

    def after_step(self, model: nn.Module, global_step: int, *, lr: float, loss_scale: float) -> None:
        """Called after each optimizer step, with the step's learning rate and loss scale.

        ADMM applies its proximal pull here, outside the optimizer, so Adam cannot normalise it away.
        """

    @contextlib.contextmanager
    def evaluation(self, model: nn.Module) -> Iterator[None]:
        """Context in which validation runs and the best checkpoint is taken."""
        yield

    def finish(self, model: nn.Module) -> None:
        """Called once after the last epoch, with the best weights loaded."""

    def postfix(self) -> dict[str, str]:
        """Extra fields for the progress bar."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """State saved in checkpoints so that a resumed run continues exactly."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def metrics(self) -> dict[str, Any]:
        """Extra entries for metrics.json."""
        return {}


@dataclass(frozen=True)
class Position:
    """Where training stands: the next epoch and the next step inside it."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0


def learning_rate(cfg: TrainSection, epoch: int, global_step: int, total_steps: int) -> float:
    """Learning rate for a step: Zaremba step decay, warmup + cosine, or constant."""
    if cfg.schedule == "step":
        return cfg.lr * cfg.lr_decay ** max(0, epoch + 1 - cfg.decay_start_epoch)
    if cfg.schedule == "cosine":
        if global_step < cfg.warmup_steps:
            return cfg.lr * (global_step + 1) / cfg.warmup_steps
        progress = (global_step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr


def make_optimizer(cfg: TrainSection, params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimiser named in the ``train`` section."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def epoch_batches(exp: ExperimentConfig, corpus: Corpus, epoch: int, info: DistInfo,
                  recurrent: bool, seed: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's ``(inputs, targets)`` batches for one epoch.

    The global batch is the configured ``batch_size``; each rank takes an equal slice of
    it, so DDP's gradient average equals the single-process gradient. Context windows (a
    Transformer's) are shuffled by ``seed`` and ``epoch``: ``seed`` is the seed of the section
    being run (``train.seed``, or ``retrain.seed`` when retraining; default ``exp.train.seed``).
    A recurrent model's BPTT chunks keep the corpus order whatever the seed.
    """
    batch = exp.data.batch_size
    if batch % info.world_size:
        raise ConfigError(f"{exp.source}: data.batch_size = {batch} is not divisible by the "
                          f"{info.world_size} processes")
    local = batch // info.world_size
    lo, hi = info.rank * local, (info.rank + 1) * local
    if recurrent:
        rows = stream_batches(corpus.train, batch, exp.data.bptt)
        return [(x[lo:hi], y[lo:hi]) for _, x, y in iter_stream_chunks(rows, exp.data.bptt)]
    seed = exp.train.seed if seed is None else seed
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    batches = window_batches(corpus.train, exp.data.context, batch, generator)
    # Drop a short last batch: every rank needs an equal, non-empty slice.
    return [(x[lo:hi], y[lo:hi]) for x, y in batches if x.size(0) == batch]


def _evaluate(model: nn.Module, exp: ExperimentConfig, corpus: Corpus, split: str,
              device: torch.device, tokens: int | None = None) -> float:
    """Perplexity on ``split`` (only its first ``tokens`` tokens when given)."""
    stream = corpus.split(split)
    if tokens is not None:
        stream = stream[:tokens]
    return perplexity(model, stream, corpus.vocab.eos_id, batch_size=exp.data.eval_batch_size,
                      bptt=exp.data.bptt, stride=exp.data.eval_stride, device=device)["ppl"]


def evaluation_settings(exp: ExperimentConfig, corpus: Corpus) -> dict[str, Any]:
    """What a valid/test perplexity depends on besides the weights: batching and the token streams.

    Stored in metrics.json, so that a later stage can reuse the numbers of the same checkpoint
    (nas/pipeline/stages.py) only when it would measure them exactly this way.
    """
    hashes = {f"{split}_sha256": hashlib.sha256(corpus.split(split).cpu().contiguous().numpy().tobytes()).hexdigest()
              for split in ("valid", "test")}
    return {"eval_batch_size": exp.data.eval_batch_size, "bptt": exp.data.bptt,
            "eval_stride": exp.data.eval_stride, **hashes}


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def _clone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A detached copy of a state_dict that keeps tied tensors tied (saved once by torch.save)."""
    copies: dict[tuple[int, int], torch.Tensor] = {}
    out = {}
    for key, value in state.items():
        tag = (value.untyped_storage().data_ptr(), value.storage_offset())
        if tag not in copies or copies[tag].shape != value.shape:
            copies[tag] = value.detach().clone()
        out[key] = copies[tag]
    return out


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


@dataclass(frozen=True)
class RunOptions:
    """How one call of :func:`train` runs (not what it trains)."""

    resume: bool = False
    progress: bool = True
    checkpoint_every: int = 0
    stop_after_steps: int | None = None


def train(exp: ExperimentConfig, corpus: Corpus, out_dir: str | Path, *, device: str | None = "cpu",
          resume: bool = False, progress: bool = True, checkpoint_every: int = 0,
          stop_after_steps: int | None = None, train_cfg: TrainSection | None = None,
          initial_state: dict[str, torch.Tensor] | None = None,
          make_hooks: Callable[[nn.Module], TrainingHooks] | None = None,
          distiller: Distiller | None = None) -> dict[str, Any]:
    """Train the experiment's model on ``corpus``; returns the metrics written to metrics.json.

    ``resume`` continues from ``out_dir/checkpoint.pt`` and ends with the same weights as an
    uninterrupted run. ``stop_after_steps`` saves a checkpoint and returns early after that
    many optimizer steps in this call (what a killed job leaves behind; used by tests).
    ``train_cfg`` replaces ``exp.train`` (retraining has its own section), ``initial_state``
    is the starting weights (an FP checkpoint) and ``make_hooks(model)`` builds the hooks that
    customise the loop (called once the starting weights are loaded). ``distiller`` mixes a
    teacher's soft targets into the loss (nas/retrain/distill.py); the logged train loss stays the
    cross-entropy.
    """
    out_dir = Path(out_dir)
    info = dist_info_from_env()
    dev = resolve_device(device, info)
    init_distributed(info, dev)
    options = RunOptions(resume, progress, checkpoint_every, stop_after_steps)
    try:
        return _train(exp, train_cfg or exp.train, corpus, out_dir, dev, info, options, initial_state,
                      make_hooks or (lambda _model: TrainingHooks()), distiller)
    finally:
        shutdown(info)


def _train(exp: ExperimentConfig, cfg: TrainSection, corpus: Corpus, out_dir: Path, dev: torch.device,
           info: DistInfo, options: RunOptions, initial_state: dict[str, torch.Tensor] | None,
           make_hooks: Callable[[nn.Module], TrainingHooks], distiller: Distiller | None = None
           ) -> dict[str, Any]:
    resume, progress = options.resume, options.progress
    checkpoint_every, stop_after_steps = options.checkpoint_every, options.stop_after_steps
    torch.manual_seed(cfg.seed)
    model_kwargs = {**exp.model_kwargs(), "vocab_size": len(corpus.vocab)}
    model = build_model(exp.model_type, **model_kwargs).to(dev)
    if initial_state is not None:
        model.load_state_dict(initial_state)
    hooks = make_hooks(model)
    recurrent = hasattr(model, "init_state")
    optimizer = make_optimizer(cfg, model.parameters())
    position, best_valid, history = Position(), math.inf, []
    lstm_state = None
    ckpt_path, best_path = out_dir / "checkpoint.pt", out_dir / "best.pt"
    valid_total = corpus.split("valid").numel()
    # tokens the per-epoch validation scores; None in _evaluate = the whole split
    select_tokens = valid_total if cfg.valid_tokens is None else min(cfg.valid_tokens, valid_total)
    select_slice = None if select_tokens == valid_total else select_tokens
    clock = {"train": 0.0, "valid": 0.0}  # seconds, summed over resumed calls (saved in checkpoints)
    if resume and ckpt_path.is_file():
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.get("valid_tokens", valid_total) != select_tokens:
            raise CheckpointError(f"{ckpt_path}: this run validated on {ckpt.get('valid_tokens', valid_total)} valid "
                                  f"tokens per epoch, the config now asks for {select_tokens} (valid_tokens = "
                                  f"{cfg.valid_tokens}); resume with the same valid_tokens or start a fresh run")
        clock.update(ckpt.get("seconds") or {})
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        position = Position(**ckpt["position"])
        best_valid, history = ckpt["best_valid"], ckpt["history"]
        hooks.load_state_dict(ckpt.get("hooks", {}))
        if ckpt.get("lstm_state") is not None:
            lstm_state = [(h.to(dev), c.to(dev)) for h, c in ckpt["lstm_state"]]
        if distiller is not None:
            distiller.load_state_dict(ckpt.get("distiller", {}), dev)
    elif resume and info.is_main:
        log.info("no checkpoint at %s; starting from scratch", ckpt_path)
    net: nn.Module = DistributedDataParallel(model) if info.enabled else model

    def save(pos: Position, state: Any) -> None:
        if info.is_main:
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "rng": torch.get_rng_state(), "position": pos.__dict__, "best_valid": best_valid,
                "history": history, "config": exp.to_dict(), "hooks": hooks.state_dict(),
                "valid_tokens": select_tokens, "seconds": dict(clock),
                "distiller": distiller.state_dict() if distiller is not None else None,
                "lstm_state": None if state is None else [(h.cpu(), c.cpu()) for h, c in state]})

    full_epoch_steps = len(epoch_batches(exp, corpus, 0, info, recurrent, cfg.seed))
    steps_per_epoch = full_epoch_steps
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    total_steps = steps_per_epoch * cfg.epochs
    hooks.begin(steps_per_epoch)
    steps_this_call, train_seconds, train_tokens = 0, 0.0, 0
    steps_done = position.global_step
    for epoch in range(position.epoch, cfg.epochs):
        tick = time.perf_counter()
        batches = epoch_batches(exp, corpus, epoch, info, recurrent, cfg.seed)[:steps_per_epoch]
        clock["train"] += time.perf_counter() - tick
        start_step = position.step if epoch == position.epoch else 0
        if start_step == 0:
            lstm_state = None  # Zaremba: the hidden state starts from zero every epoch
            if distiller is not None:
                distiller.reset()
        net.train()
        epoch_loss, epoch_count, t0, epoch_tokens = 0.0, 0, time.perf_counter(), 0
        bar = tqdm(total=steps_per_epoch, initial=start_step, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not (progress and info.is_main), mininterval=1.0, dynamic_ncols=True)
        global_step = position.global_step if epoch == position.epoch else epoch * steps_per_epoch
        for step in range(start_step, steps_per_epoch):
            tick = time.perf_counter()
            inputs, targets = (t.to(dev) for t in batches[step])
            lr = learning_rate(cfg, epoch, global_step, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            hooks.before_forward(model)
            out = net(inputs, lstm_state, targets)
            optimizer.zero_grad(set_to_none=True)
            scale = inputs.size(1) if cfg.loss_reduction == "sum_time" else 1
            extra = hooks.penalty(model)
            objective = out.loss if distiller is None else distiller.mix(inputs, out.logits, out.loss)
            total = objective if extra is None else objective + extra
            (total * scale).backward()
            hooks.before_step(model)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip if cfg.clip > 0 else math.inf)
            loss = float(out.loss.detach())
            if not (math.isfinite(loss) and math.isfinite(float(norm))):
                raise TrainingDivergedError(
                    f"{exp.source}: training diverged at epoch {epoch + 1}, step {step + 1}: loss={loss}, "
                    f"gradient norm={float(norm)}, lr={lr:g}. Lower train.lr or set train.clip; the last "
                    f"good checkpoint is {ckpt_path}")
            optimizer.step()
            hooks.after_step(model, global_step, lr=lr, loss_scale=float(scale))
            if recurrent:
                lstm_state = model.detach_state(out.state)
            global_step += 1
            steps_done = global_step
            steps_this_call += 1
            clock["train"] += time.perf_counter() - tick
            epoch_loss += loss
            epoch_count += 1
            epoch_tokens += inputs.numel() * info.world_size
            elapsed = time.perf_counter() - t0
            if step % cfg.log_interval == 0 or step + 1 == steps_per_epoch:
                bar.set_postfix(loss=f"{loss:.3f}", ppl=f"{math.exp(min(loss, 50)):.1f}", lr=f"{lr:.3g}",
                                tok_s=f"{epoch_tokens / max(elapsed, 1e-9):.0f}", **hooks.postfix())
            bar.update(1)
            at_end = step + 1 == steps_per_epoch
            if not at_end and checkpoint_every and global_step % checkpoint_every == 0:
                save(Position(epoch, step + 1, global_step), lstm_state)
            if stop_after_steps is not None and steps_this_call >= stop_after_steps and not at_end:
                save(Position(epoch, step + 1, global_step), lstm_state)
                bar.close()
                return {"stopped_early": True, "position": Position(epoch, step + 1, global_step).__dict__}
        bar.close()
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        train_tokens += epoch_tokens
        with hooks.evaluation(model):
            tick = time.perf_counter()
            valid_ppl = _evaluate(model, exp, corpus, "valid", dev, select_slice)
            clock["valid"] += time.perf_counter() - tick
            state_for_best = _clone_state(model.state_dict())
        if not math.isfinite(valid_ppl):
            raise TrainingDivergedError(
                f"{exp.source}: training diverged at epoch {epoch + 1}: validation perplexity is {valid_ppl} "
                f"(lr={lr:g}). "
                f"Lower train.lr or set train.clip; the latest checkpoint is {ckpt_path}")
        history.append({"epoch": epoch + 1, "train_loss": epoch_loss / max(1, epoch_count),
                        "valid_ppl": valid_ppl, "lr": lr, "tokens_per_s": epoch_tokens / max(seconds, 1e-9)})
        if info.is_main:
            log.info("epoch %d: train ppl %.2f  valid ppl %.2f  lr %.4g  %.0f tok/s", epoch + 1,
                     math.exp(min(epoch_loss / max(1, epoch_count), 50)), valid_ppl, lr,
                     epoch_tokens / max(seconds, 1e-9))
        if valid_ppl < best_valid:
            best_valid = valid_ppl
            if info.is_main:
                save_checkpoint(best_path, {"model": state_for_best, "config": model_config_dict(model),
                                            "vocab": list(corpus.vocab.words), "valid_ppl": valid_ppl,
                                            "valid_tokens": select_tokens, "epoch": epoch + 1})
        barrier(info)  # every rank reloads best.pt at the end: it must be complete
        save(Position(epoch + 1, 0, global_step), None)
        if stop_after_steps is not None and steps_this_call >= stop_after_steps and epoch + 1 < cfg.epochs:
            return {"stopped_early": True, "position": Position(epoch + 1, 0, global_step).__dict__}
    best = load_checkpoint(best_path) if best_path.is_file() else {"model": _clone_state(model.state_dict())}
    model.load_state_dict(best["model"])
    hooks.finish(model)
    tick = time.perf_counter()
    # The validation that chose best.pt scored the whole split on exactly these weights: reuse it.
    measured = best.get("valid_ppl")
    reuse = (isinstance(measured, float) and math.isfinite(measured)
             and best.get("valid_tokens", valid_total) == valid_total
             and _same_weights(model.state_dict(), best["model"]))
    valid_final = measured if reuse else _evaluate(model, exp, corpus, "valid", dev)
    test_final = _evaluate(model, exp, corpus, "test", dev)
    clock["valid"] += time.perf_counter() - tick
    metrics = {
        "model": exp.model_type, "params": _count_params(model), "epochs": cfg.epochs,
        "epochs_run": steps_done / max(1, full_epoch_steps), "steps": steps_done,
        "valid_ppl": valid_final, "test_ppl": test_final,
        "selection_valid_tokens": best.get("valid_tokens", valid_total),
        "selection_valid_ppl": measured if isinstance(measured, float) else valid_final,
        "train_seconds": clock["train"], "valid_seconds": clock["valid"],
        "train_tokens_per_s": (train_tokens / train_seconds) if train_seconds else
        (history[-1]["tokens_per_s"] if history else 0.0),
        "history": history, "world_size": info.world_size, "corpus": corpus_summary(corpus),
        "evaluation": evaluation_settings(exp, corpus), **hooks.metrics(),
    }
    if info.is_main:
        atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics
