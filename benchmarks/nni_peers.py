"""Peer baselines: NNI 3.0's ``QATQuantizer`` and ``LsqQuantizer`` at uniform bits on our LMs.

NNI wraps every ``nn.Linear`` / ``nn.Embedding`` weight (for our models: every cluster, i.e. LSTM
gate matrices, embeddings, softmax, attention and FFN) with ``int{bits}``, symmetric, one scale
per matrix, and trains it from an FP checkpoint with the ``retrain`` section's optimizer, lr
schedule, clipping and epochs on our own batches (:func:`nas.retrain.loop.epoch_batches`), as ADMM/STE
retraining does. After every epoch the fake-quantized weights NNI's wrappers compute are copied
into a clean model, checked to hold at most ``2^bits - 1`` distinct values per matrix and to
give the wrapped model's logits, and scored; the best valid epoch is reported.

NNI is not an mpnas dependency; use its own venv (from the repository root)::

    python3 -m venv .venv-nni && .venv-nni/bin/pip install -q -r requirements-nni.txt -e .
    OMP_NUM_THREADS=1 .venv-nni/bin/python benchmarks/nni_peers.py \\
        --checkpoint benchmarks/checkpoints/ptb_lstm.safetensors --config ptb_lstm \\
        --method qat --bits 4 --data ../shared/data/ptb [--epochs 3] [--max-steps N]

It prints one JSON line: valid_ppl, test_ppl, avg_bits, theoretical_bytes, compression,
levels_max (most distinct values in one matrix), step_s / fp_step_s (mean seconds per training
step with NNI and plain FP, measured in the same run: compare the ratio, not absolute times).

How NNI 3.0 is fitted to our models (read from its source, ``nni/compression/base``):

- Wrapping turns ``module.weight`` into a buffer; the trainable latent weight lives on the
  wrapper, and the quantized weight exists only as what the wrapper's forward assigns to
  ``module.weight`` (and leaves there). Our LSTM reads its gates' ``.weight`` without calling the
  gate Linears, so each layer first calls its gate modules on one token, then runs its usual cell.
- A tied softmax is one cluster (the embedding's): the decoder is not wrapped; a forward pre-hook
  hands it the embedding's quantized weight.
- ``nn.Embedding`` is not in NNI's quantization registry; it is registered with Linear's setting.
- 1 bit is skipped: NNI's ``int{b}`` is narrow range ``[-(2^(b-1)-1), 2^(b-1)-1]``, so ``int1`` is
  ``[0, 0]``: LSQ turns every weight into 0 and QAT's scale ``max|W| / 0 = inf`` makes every weight
  NaN (tests/test_nni_peers.py checks both); neither has a binary ``{-a, +a}`` table. ``--bits 1``
  prints a row with the reason instead of training; int2 (ternary) is NNI's lowest real setting.
- QAT's scale is ``EMA(max|W|) / qmax`` (EMA 0.99 per forward); LSQ starts every scale at 0.01
  (NNI's fixed init) and learns it with the weights in the same optimizer param group.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import inspect
import json
import math
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evaluators.perplexity import perplexity
from nas.config.sections import ExperimentConfig, RetrainSection, load_config
from nas.core.data import Corpus, load_corpus, resolve_data_dir
from nas.retrain.distributed import DistInfo
from nas.retrain.hooks import TrainingDivergedError
from nas.retrain.loop import epoch_batches, learning_rate, make_optimizer
from nas.retrain.run import load_fp_checkpoint
from search_spaces.clusters import find_clusters
from search_spaces.models import build_model, model_config_dict
from search_spaces.models.lstm_lm import LSTMLayer
from search_spaces.precision import PrecisionMap
from search_spaces.size import model_size

METHODS = ("qat", "lsq")
ONE_BIT_REASON = ("NNI's int1 is narrow range [0, 0], a single level: LSQ sets every weight to 0, QAT's scale "
                  "max|W|/0 = inf makes them NaN; QAT/LSQ have no binary {-a, +a} table, so 1 bit has no NNI "
                  "peer (int2, ternary, is its lowest real setting)")
Batch = tuple[torch.Tensor, torch.Tensor]


class _RefreshingLSTMLayer(LSTMLayer):
    """An :class:`LSTMLayer` that calls its gate Linears, so NNI quantizes their weights."""

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        # NNI fake-quantizes a weight only inside its module's forward and leaves the result in
        # ``module.weight``; one token per gate refreshes it, then the fused cell reads it.
        for gate in self.gates():
            gate.ih(x[:1, :1])
            gate.hh(state[0][:1])
        return super().forward(x, state)


def nni_targets(model: nn.Module) -> tuple[list[str], dict[str, str]]:
    """``(modules NNI wraps, {tied module: the module owning its weight})``.

    The wrapped modules are exactly the cluster owners of :func:`find_clusters`; a cluster that
    is not a whole ``nn.Linear`` / ``nn.Embedding`` weight (fused ``nn.LSTM``, packed attention)
    raises, since the config here would not cover it.
    """
    wrapped = []
    for cluster in find_clusters(model).values():
        module = model.get_submodule(cluster.module)
        if not isinstance(module, nn.Linear | nn.Embedding) or cluster.rows is not None:
            raise ValueError(f"cluster {cluster.name!r} is not a whole nn.Linear/nn.Embedding weight; "
                             "the NNI peers only wrap those")
        wrapped.append(cluster.module)
    owner_of = {id(model.get_submodule(name).weight): name for name in wrapped}
    tied = {name: owner_of[id(module.weight)] for name, module in model.named_modules()
            if isinstance(module, nn.Linear | nn.Embedding) and name not in wrapped}
    return wrapped, tied


def nni_config_list(modules: list[str], bits: int) -> list[dict[str, Any]]:
    """NNI ``config_list``: weights of ``modules`` at ``int{bits}``, symmetric, one scale each."""
    return [{"op_names": list(modules), "target_names": ["weight"], "quant_dtype": f"int{bits}",
             "quant_scheme": "symmetric", "granularity": "default"}]


def attach_nni(model: nn.Module, method: str, bits: int, optimizer_cfg: RetrainSection,
               training_func: Callable[..., None], training_step: Callable[..., Any]) -> Any:
    """Wrap ``model`` (in place) with NNI's QAT or LSQ quantizer; returns the quantizer.

    ``quantizer.compress(max_steps, max_epochs)`` then calls ``training_func(model, optimizer,
    training_step, lr_schedulers, max_steps, max_epochs)`` with NNI's patched optimizer.
    """
    import nni
    from nni.compression.base.setting import QuantizationSetting
    from nni.compression.quantization import LsqQuantizer, QATQuantizer
    from nni.compression.utils import TorchEvaluator

    if method not in METHODS:
        raise ValueError(f"method={method!r}; expected one of {METHODS}")
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits}; NNI's int dtypes here span 1..8")
    if "Embedding" not in QuantizationSetting.registry:
        QuantizationSetting.register("Embedding", {"weight": QuantizationSetting.default_setting["weight"]})
    wrapped, tied = nni_targets(model)
    for module in model.modules():
        if type(module) is LSTMLayer:
            module.__class__ = _RefreshingLSTMLayer
    for name, owner_name in tied.items():
        module, owner = model.get_submodule(name), model.get_submodule(owner_name)
        del module.weight  # the shared Parameter; NNI moves the owner's latent copy onto its wrapper
        module.register_forward_pre_hook(lambda mod, _args, owner=owner: setattr(mod, "weight", owner.weight))
    # NNI rebuilds the optimizer for the wrapped parameters from a traced call; reuse our
    # make_optimizer's choice and arguments so the peers train exactly like ADMM/STE.
    reference = make_optimizer(optimizer_cfg, iter(model.parameters()))
    accepted = inspect.signature(type(reference)).parameters  # defaults also hold derived keys
    kwargs = {k: v for k, v in reference.defaults.items() if k in accepted}
    optimizer = nni.trace(type(reference))(list(model.parameters()), **kwargs)
    evaluator = TorchEvaluator(training_func, optimizer, training_step)
    cls = QATQuantizer if method == "qat" else LsqQuantizer
    return cls(model, nni_config_list(wrapped, bits), evaluator)


def _build(config: dict[str, Any]) -> nn.Module:
    """A fresh model from ``model_config_dict`` output (``{'type': kind, **config}``)."""
    kwargs = {k: v for k, v in config.items() if k != "type"}
    return build_model(str(config["type"]), **kwargs)


@torch.no_grad()
def extract_quantized(nni_model: nn.Module, probe: torch.Tensor, bits: int | None = None
                      ) -> tuple[nn.Module, dict[str, int]]:
    """A clean model holding the weights NNI's wrappers compute in eval mode, and levels per matrix.

    ``probe`` is a small token batch: one eval forward makes every wrapper write its quantized
    weight; the clean copy must then reproduce the wrapped model's logits on it. With ``bits``,
    raises RuntimeError if a matrix has more than ``2^bits - 1`` distinct values.
    """
    was_training = nni_model.training
    nni_model.eval()
    try:
        expected = nni_model(probe).logits
        clean = _build(model_config_dict(nni_model))
        for name, tensor in [*clean.named_parameters(), *clean.named_buffers()]:
            module_name, _, attr = name.rpartition(".")
            tensor.copy_(getattr(nni_model.get_submodule(module_name), attr))
        clean.eval()
        diff = float((clean(probe).logits - expected).abs().max())
    finally:
        nni_model.train(was_training)
    if not diff <= 1e-4:
        raise RuntimeError(f"the clean copy's logits differ from the NNI model's by {diff:g}")
    levels = {name: int(clean.get_submodule(name).weight.unique().numel()) for name in nni_targets(clean)[0]}
    if bits is not None:
        over = {name: n for name, n in levels.items() if n > 2**bits - 1}
        if over:
            raise RuntimeError(f"not quantized to int{bits}: more than {2**bits - 1} distinct values in {over}")
    return clean, levels


def _evaluate(model: nn.Module, exp: ExperimentConfig, corpus: Corpus, split: str, device: torch.device) -> float:
    # Same call as nas.retrain.loop's validation, so the peers' numbers compare with ours.
    return perplexity(model, corpus.split(split), corpus.vocab.eos_id, batch_size=exp.data.eval_batch_size,
                      bptt=exp.data.bptt, stride=exp.data.eval_stride, device=device)["ppl"]


def _training_step(batch: tuple[torch.Tensor, torch.Tensor, Any], model: nn.Module) -> tuple[torch.Tensor, Any]:
    inputs, targets, state = batch
    out = model(inputs, state, targets)
    return out.loss, out.state


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, training_step: Callable[..., Any],
          batch: Batch, state: Any, cfg: RetrainSection, lr: float) -> tuple[float, Any]:
    """One optimizer step exactly as nas.retrain.loop's loop takes it; returns (loss, next state)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss, new_state = training_step((*batch, state), model)
    optimizer.zero_grad(set_to_none=True)
    scale = batch[0].size(1) if cfg.loss_reduction == "sum_time" else 1
    (loss * scale).backward()
    norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip if cfg.clip > 0 else math.inf))
    value = float(loss.detach())
    if not (math.isfinite(value) and math.isfinite(norm)):
        raise TrainingDivergedError(f"NNI peer diverged: loss={value}, gradient norm={norm}, lr={lr:g}")
    optimizer.step()
    if new_state is not None:
        new_state = [(h.detach(), c.detach()) for h, c in new_state]
    return value, new_state


def nni_quantize_train(model: nn.Module, method: str, bits: int, exp: ExperimentConfig, corpus: Corpus, *,
                       epochs: int | None = None, max_steps_per_epoch: int | None = None,
                       device: str = "cpu", fp_timing_steps: int = 20,
                       log: Callable[[str], None] | None = print) -> tuple[nn.Module, dict[str, Any]]:
    """Train a copy of FP ``model`` with NNI ``method`` at ``bits``; returns (quantized model, metrics).

    ``epochs`` and ``max_steps_per_epoch`` override ``exp.retrain`` (which sets optimizer, lr
    schedule, clipping and loss reduction). The returned model is a plain mpnas model holding
    the best-valid epoch's quantized weights. ``bits=1`` raises ValueError (see ONE_BIT_REASON).
    """
    if bits == 1:
        raise ValueError(ONE_BIT_REASON)
    cfg = dataclasses.replace(exp.retrain, epochs=epochs or exp.retrain.epochs,
                              max_steps_per_epoch=max_steps_per_epoch or exp.retrain.max_steps_per_epoch)
    dev = torch.device(device)
    info, recurrent = DistInfo(), hasattr(model, "init_state")
    steps_per_epoch = len(epoch_batches(exp, corpus, 0, info, recurrent, cfg.seed))
    steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch or steps_per_epoch)
    total_steps = steps_per_epoch * cfg.epochs
    probe = corpus.split("valid")[:16].view(1, -1).to(dev)  # short enough for any Transformer context
    best: dict[str, Any] = {"valid_ppl": math.inf}
    history: list[dict[str, float]] = []
    step_times: list[float] = []

    def training_func(net: nn.Module, optimizer: torch.optim.Optimizer, training_step: Callable[..., Any],
                      _schedulers: Any, _max_steps: int | None, _max_epochs: int | None) -> None:
        torch.manual_seed(cfg.seed)
        global_step = 0
        for epoch in range(cfg.epochs):
            net.train()
            state, losses = None, []
            for batch in epoch_batches(exp, corpus, epoch, info, recurrent, cfg.seed)[:steps_per_epoch]:
                t0 = time.perf_counter()
                loss, state = _step(net, optimizer, training_step, tuple(t.to(dev) for t in batch), state, cfg,
                                    learning_rate(cfg, epoch, global_step, total_steps))
                step_times.append(time.perf_counter() - t0)
                losses.append(loss)
                global_step += 1
            clean, levels = extract_quantized(net, probe, bits)
            valid_ppl = _evaluate(clean, exp, corpus, "valid", dev)
            history.append({"epoch": epoch + 1, "train_loss": sum(losses) / len(losses), "valid_ppl": valid_ppl,
                            "levels_max": max(levels.values())})
            if log:
                log(f"{method} int{bits} epoch {epoch + 1}: valid ppl {valid_ppl:.2f}, "
                    f"at most {max(levels.values())} levels per matrix")
            if valid_ppl < best["valid_ppl"]:
                best.update(valid_ppl=valid_ppl, model=clean, levels=levels, epoch=epoch + 1)

    nni_model = copy.deepcopy(model).to(dev)
    quantizer = attach_nni(nni_model, method, bits, cfg, training_func, _training_step)
    quantizer.compress(total_steps, cfg.epochs)
    fp_step = _fp_step_seconds(model, exp, corpus, cfg, dev, min(fp_timing_steps, steps_per_epoch))
    return _peer_result(model, f"nni_{method}", bits, cfg, steps_per_epoch, best, history, step_times, fp_step,
                        exp, corpus, dev)


def _peer_result(model: nn.Module, method: str, bits: int, cfg: RetrainSection, steps_per_epoch: int,
                 best: dict[str, Any], history: list[dict[str, float]], step_times: list[float], fp_step: float,
                 exp: ExperimentConfig, corpus: Corpus, dev: torch.device) -> tuple[nn.Module, dict[str, Any]]:
    """The best epoch's quantized model and the metrics of a peer run (test ppl, levels, step times, sizes)."""
    quantized: nn.Module = best["model"]
    precision = PrecisionMap.uniform(quantized, bits)
    metrics = {
        "method": method, "bits": bits, "model": model_config_dict(model)["type"],
        "epochs": cfg.epochs, "steps_per_epoch": steps_per_epoch, "best_epoch": best["epoch"],
        "valid_ppl": best["valid_ppl"], "test_ppl": _evaluate(quantized, exp, corpus, "test", dev),
        "levels_max": max(best["levels"].values()), "levels_limit": 2**bits - 1,
        # The first step also initialises NNI's scales: leave it out of the mean.
        "step_s": sum(step_times[1:]) / max(1, len(step_times) - 1), "fp_step_s": fp_step,
        "history": history, **model_size(quantized, precision),
    }
    metrics["step_time_ratio"] = metrics["step_s"] / fp_step if fp_step else math.nan
    return quantized, metrics


def _fp_step_seconds(model: nn.Module, exp: ExperimentConfig, corpus: Corpus, cfg: RetrainSection,
                     dev: torch.device, steps: int) -> float:
    """Mean seconds of a plain FP training step of a copy of ``model`` (the timing baseline)."""
    fp = copy.deepcopy(model).to(dev).train()
    optimizer = make_optimizer(cfg, fp.parameters())
    batches = epoch_batches(exp, corpus, 0, DistInfo(), hasattr(fp, "init_state"))[: steps + 1]
    state, times = None, []
    for batch in batches:
        t0 = time.perf_counter()
        _, state = _step(fp, optimizer, _training_step, tuple(t.to(dev) for t in batch), state, cfg, cfg.lr)
        times.append(time.perf_counter() - t0)
    return sum(times[1:]) / max(1, len(times) - 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="FP best.pt of `mpnas train`")
    parser.add_argument("--config", required=True, help="experiment YAML or packaged name (its retrain section)")
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--bits", type=int, choices=(1, 2, 3, 4, 5, 6, 8), required=True)
    parser.add_argument("--epochs", type=int, help="default: retrain.epochs of the config")
    parser.add_argument("--max-steps", type=int, help="cap on steps per epoch (smoke runs)")
    parser.add_argument("--data", help="corpus folder (default $MPNAS_DATA, then the PTB cache)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--packed", help="also export the quantized model as a packed .mpq file here")
    args = parser.parse_args(argv)
    command = shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(argv)
    row: dict[str, Any] = {"method": f"nni_{args.method}", "bits": args.bits, "command": command}
    if args.bits == 1:
        print(json.dumps({**row, "skipped": ONE_BIT_REASON}), flush=True)
        return
    torch.set_num_threads(args.threads)
    exp = load_config(args.config)
    corpus = load_corpus(resolve_data_dir(args.data))
    ckpt = load_fp_checkpoint(args.checkpoint, corpus)
    model_cfg = dict(ckpt["config"])
    exp = dataclasses.replace(exp, model=model_cfg)  # the checkpoint's architecture wins, as in retrain
    model = _build(model_cfg)
    model.load_state_dict(ckpt["model"])
    quantized, metrics = nni_quantize_train(model, args.method, args.bits, exp, corpus, epochs=args.epochs,
                                    max_steps_per_epoch=args.max_steps, device=args.device,
                                    log=lambda msg: print(msg, file=sys.stderr, flush=True))
    if args.packed:
        from search_spaces.packed import export_packed

        export_packed(quantized, PrecisionMap.uniform(quantized, args.bits), Path(args.packed))
        metrics["packed_bytes"] = Path(args.packed).stat().st_size
    print(json.dumps({**row, **metrics}), flush=True)


if __name__ == "__main__":
    main()
