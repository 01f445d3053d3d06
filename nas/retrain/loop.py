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

import hashlib
import logging
import math
import time
from collections.abc import Callable, Iterator
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
from nas.core.errors import CheckpointError
from nas.retrain.distill import Distiller
from nas.retrain.distributed import DistInfo, barrier, dist_info_from_env, init_distributed, resolve_device, shutdown
from nas.retrain.hooks import EpochStats, Position, RunOptions, TrainingDivergedError, TrainingHooks
from nas.retrain.step import train_step
from search_spaces.models import build_model, model_config_dict

log = logging.getLogger(__name__)


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
    torch.manual_seed(cfg.seed)
    model = build_model(exp.model_type, **{**exp.model_kwargs(), "vocab_size": len(corpus.vocab)}).to(dev)
    if initial_state is not None:
        model.load_state_dict(initial_state)
    return _Run(exp, cfg, corpus, out_dir, dev, info, options, model, make_hooks(model), distiller).run()


class _Run:
    """One call of :func:`train`: the model, its optimizer and hooks, where it stands, what it measured."""

    def __init__(self, exp: ExperimentConfig, cfg: TrainSection, corpus: Corpus, out_dir: Path, dev: torch.device,
                 info: DistInfo, options: RunOptions, model: nn.Module, hooks: TrainingHooks,
                 distiller: Distiller | None) -> None:
        self.exp, self.cfg, self.corpus, self.out_dir, self.dev, self.info = exp, cfg, corpus, out_dir, dev, info
        self.options, self.model, self.hooks, self.distiller = options, model, hooks, distiller
        self.recurrent = hasattr(model, "init_state")
        self.optimizer = make_optimizer(cfg, model.parameters())
        self.position, self.best_valid, self.history = Position(), math.inf, []
        self.lstm_state: Any = None
        self.ckpt_path, self.best_path = out_dir / "checkpoint.pt", out_dir / "best.pt"
        self.valid_total = corpus.split("valid").numel()
        # tokens the per-epoch validation scores; None in _evaluate = the whole split
        self.select_tokens = self.valid_total if cfg.valid_tokens is None else min(cfg.valid_tokens, self.valid_total)
        self.select_slice = None if self.select_tokens == self.valid_total else self.select_tokens
        self.clock = {"train": 0.0, "valid": 0.0}  # seconds, summed over resumed calls (saved in checkpoints)
        if options.resume:
            self._resume()
        self.net: nn.Module = DistributedDataParallel(model) if info.enabled else model
        self.full_epoch_steps = len(epoch_batches(exp, corpus, 0, info, self.recurrent, cfg.seed))
        self.steps_per_epoch = min(self.full_epoch_steps, cfg.max_steps_per_epoch or self.full_epoch_steps)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.steps_this_call, self.train_seconds, self.train_tokens = 0, 0.0, 0
        self.steps_done = self.position.global_step
        self.lr = 0.0

    def _resume(self) -> None:
        """Continue from ``checkpoint.pt`` (if there is one): weights, optimizer, RNG, position, hooks."""
        if not self.ckpt_path.is_file():
            if self.info.is_main:
                log.info("no checkpoint at %s; starting from scratch", self.ckpt_path)
            return
        ckpt = load_checkpoint(self.ckpt_path)
        if ckpt.get("valid_tokens", self.valid_total) != self.select_tokens:
            raise CheckpointError(
                f"{self.ckpt_path}: this run validated on {ckpt.get('valid_tokens', self.valid_total)} valid "
                f"tokens per epoch, the config now asks for {self.select_tokens} (valid_tokens = "
                f"{self.cfg.valid_tokens}); resume with the same valid_tokens or start a fresh run")
        self.clock.update(ckpt.get("seconds") or {})
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"])
        self.position = Position(**ckpt["position"])
        self.best_valid, self.history = ckpt["best_valid"], ckpt["history"]
        self.hooks.load_state_dict(ckpt.get("hooks", {}))
        if ckpt.get("lstm_state") is not None:
            self.lstm_state = [(h.to(self.dev), c.to(self.dev)) for h, c in ckpt["lstm_state"]]
        if self.distiller is not None:
            self.distiller.load_state_dict(ckpt.get("distiller", {}), self.dev)

    def save(self, pos: Position, state: Any) -> None:
        """Write ``checkpoint.pt`` (main rank): everything a resumed call needs to go on from ``pos``."""
        if self.info.is_main:
            save_checkpoint(self.ckpt_path, {
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "rng": torch.get_rng_state(), "position": pos.__dict__, "best_valid": self.best_valid,
                "history": self.history, "config": self.exp.to_dict(), "hooks": self.hooks.state_dict(),
                "valid_tokens": self.select_tokens, "seconds": dict(self.clock),
                "distiller": self.distiller.state_dict() if self.distiller is not None else None,
                "lstm_state": None if state is None else [(h.cpu(), c.cpu()) for h, c in state]})

    def run(self) -> dict[str, Any]:
        """Every remaining epoch, then the final metrics (or where an early stop left the run)."""
        self.hooks.begin(self.steps_per_epoch)
        for epoch in range(self.position.epoch, self.cfg.epochs):
            stopped = self._epoch(epoch)
            if stopped is not None:
                return stopped
        return self._finish()

    def _stop_here(self, pos: Position) -> dict[str, Any]:
        return {"stopped_early": True, "position": pos.__dict__}

    def _epoch(self, epoch: int) -> dict[str, Any] | None:
        """Train one epoch (from where a resumed call left it), validate, save; the early-stop result or None."""
        cfg, steps = self.cfg, self.steps_per_epoch
        tick = time.perf_counter()
        batches = epoch_batches(self.exp, self.corpus, epoch, self.info, self.recurrent, cfg.seed)[:steps]
        self.clock["train"] += time.perf_counter() - tick
        start_step = self.position.step if epoch == self.position.epoch else 0
        if start_step == 0:
            self.lstm_state = None  # Zaremba: the hidden state starts from zero every epoch
            if self.distiller is not None:
                self.distiller.reset()
        self.net.train()
        stats = EpochStats(time.perf_counter())
        bar = tqdm(total=steps, initial=start_step, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not (self.options.progress and self.info.is_main), mininterval=1.0, dynamic_ncols=True)
        global_step = self.position.global_step if epoch == self.position.epoch else epoch * steps
        for step in range(start_step, steps):
            tick = time.perf_counter()
            loss, tokens = self._step(epoch, step, global_step, batches[step])
            global_step += 1
            self.steps_done = global_step
            self.steps_this_call += 1
            self.clock["train"] += time.perf_counter() - tick
            stats.add(loss, tokens)
            if step % cfg.log_interval == 0 or step + 1 == steps:
                bar.set_postfix(loss=f"{loss:.3f}", ppl=f"{math.exp(min(loss, 50)):.1f}", lr=f"{self.lr:.3g}",
                                tok_s=f"{stats.tokens_per_s():.0f}", **self.hooks.postfix())
            bar.update(1)
            if step + 1 == steps:
                continue
            here = Position(epoch, step + 1, global_step)
            stop = self.options.stop_after_steps is not None and self.steps_this_call >= self.options.stop_after_steps
            if stop or (self.options.checkpoint_every and global_step % self.options.checkpoint_every == 0):
                self.save(here, self.lstm_state)
            if stop:
                bar.close()
                return self._stop_here(here)
        bar.close()
        return self._end_epoch(epoch, global_step, stats)

    def _step(self, epoch: int, step: int, global_step: int, batch: tuple[torch.Tensor, torch.Tensor]
              ) -> tuple[float, int]:
        """One optimizer step; its cross-entropy and the tokens it trained on (over all ranks)."""
        inputs, targets = (t.to(self.dev) for t in batch)
        self.lr = learning_rate(self.cfg, epoch, global_step, self.total_steps)

        def diverged(loss: float, norm: float) -> TrainingDivergedError:
            return TrainingDivergedError(
                f"{self.exp.source}: training diverged at epoch {epoch + 1}, step {step + 1}: loss={loss}, "
                f"gradient norm={norm}, lr={self.lr:g}. Lower train.lr or set train.clip; the last "
                f"good checkpoint is {self.ckpt_path}")

        mix = None if self.distiller is None else self.distiller.mix
        loss, state = train_step(self.net, self.model, self.hooks, self.optimizer, self.cfg, (inputs, targets),
                                 self.lstm_state, self.lr, global_step, diverged=diverged, mix=mix)
        if self.recurrent:
            self.lstm_state = state
        return loss, inputs.numel() * self.info.world_size

    def _end_epoch(self, epoch: int, global_step: int, stats: EpochStats) -> dict[str, Any] | None:
        """Validate, keep ``best.pt``, save the epoch's checkpoint; the early-stop result or None."""
        seconds = time.perf_counter() - stats.start
        self.train_seconds += seconds
        self.train_tokens += stats.tokens
        with self.hooks.evaluation(self.model):
            tick = time.perf_counter()
            valid_ppl = _evaluate(self.model, self.exp, self.corpus, "valid", self.dev, self.select_slice)
            self.clock["valid"] += time.perf_counter() - tick
            state_for_best = _clone_state(self.model.state_dict())
        if not math.isfinite(valid_ppl):
            raise TrainingDivergedError(
                f"{self.exp.source}: training diverged at epoch {epoch + 1}: validation perplexity is {valid_ppl} "
                f"(lr={self.lr:g}). Lower train.lr or set train.clip; the latest checkpoint is {self.ckpt_path}")
        train_loss = stats.loss / max(1, stats.count)
        self.history.append({"epoch": epoch + 1, "train_loss": train_loss, "valid_ppl": valid_ppl, "lr": self.lr,
                             "tokens_per_s": stats.tokens / max(seconds, 1e-9)})
        if self.info.is_main:
            log.info("epoch %d: train ppl %.2f  valid ppl %.2f  lr %.4g  %.0f tok/s", epoch + 1,
                     math.exp(min(train_loss, 50)), valid_ppl, self.lr, stats.tokens / max(seconds, 1e-9))
        if valid_ppl < self.best_valid:
            self.best_valid = valid_ppl
            if self.info.is_main:
                save_checkpoint(self.best_path, {
                    "model": state_for_best, "config": model_config_dict(self.model),
                    "vocab": list(self.corpus.vocab.words), "valid_ppl": valid_ppl,
                    "valid_tokens": self.select_tokens, "epoch": epoch + 1})
        barrier(self.info)  # every rank reloads best.pt at the end: it must be complete
        self.save(Position(epoch + 1, 0, global_step), None)
        stop = self.options.stop_after_steps
        if stop is not None and self.steps_this_call >= stop and epoch + 1 < self.cfg.epochs:
            return self._stop_here(Position(epoch + 1, 0, global_step))
        return None

    def _finish(self) -> dict[str, Any]:
        """Load ``best.pt``, measure valid and test on the whole splits, write ``metrics.json``."""
        model, valid_total = self.model, self.valid_total
        best = load_checkpoint(self.best_path) if self.best_path.is_file() else {
            "model": _clone_state(model.state_dict())}
        model.load_state_dict(best["model"])
        self.hooks.finish(model)
        tick = time.perf_counter()
        # The validation that chose best.pt scored the whole split on exactly these weights: reuse it.
        measured = best.get("valid_ppl")
        reuse = (isinstance(measured, float) and math.isfinite(measured)
                 and best.get("valid_tokens", valid_total) == valid_total
                 and _same_weights(model.state_dict(), best["model"]))
        valid_final = measured if reuse else _evaluate(model, self.exp, self.corpus, "valid", self.dev)
        test_final = _evaluate(model, self.exp, self.corpus, "test", self.dev)
        self.clock["valid"] += time.perf_counter() - tick
        history = self.history
        metrics = {
            "model": self.exp.model_type, "params": _count_params(model), "epochs": self.cfg.epochs,
            "epochs_run": self.steps_done / max(1, self.full_epoch_steps), "steps": self.steps_done,
            "valid_ppl": valid_final, "test_ppl": test_final,
            "selection_valid_tokens": best.get("valid_tokens", valid_total),
            "selection_valid_ppl": measured if isinstance(measured, float) else valid_final,
            "train_seconds": self.clock["train"], "valid_seconds": self.clock["valid"],
            "train_tokens_per_s": (self.train_tokens / self.train_seconds) if self.train_seconds else
            (history[-1]["tokens_per_s"] if history else 0.0),
            "history": history, "world_size": self.info.world_size, "corpus": corpus_summary(self.corpus),
            "evaluation": evaluation_settings(self.exp, self.corpus), **self.hooks.metrics(),
        }
        if self.info.is_main:
            atomic_write_json(self.out_dir / "metrics.json", metrics)
        return metrics
