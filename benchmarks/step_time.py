"""Training step time of quantization-aware methods as a ratio of the FP step, in one run.

    MPNAS_DATA=../shared/data/ptb .venv/bin/python benchmarks/step_time.py --model lstm --steps 30 --threads 1

For the FP checkpoint (``--checkpoint``;
default: the committed reference ``benchmarks/checkpoints/ptb_<model>.safetensors``) it times, on the same PTB
batches and interleaved in rounds (so load changes on a shared machine hit every method alike):
a plain FP step, an ADMM step and an STE step at uniform 2 bits, and a Gumbel supernet weight
step over candidates {1, 2, 4, 8}. Prints and writes ``benchmarks/results/step_time.csv``
(``model,method,median_step_s,ratio_to_fp,steps``); ratios are medians over medians.
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
import time
from pathlib import Path

import torch

from nas.config.sections import load_config
from nas.core.checkpoint import atomic_write_text
from nas.core.data import load_corpus, resolve_data_dir
from nas.retrain.distributed import DistInfo
from nas.retrain.hooks import TrainingHooks
from nas.retrain.loop import epoch_batches
from nas.retrain.run import load_fp_checkpoint, make_hooks
from nas.search.gumbel import GumbelSupernet
from search_spaces.clusters import find_clusters
from search_spaces.models import restore_model
from search_spaces.precision import PrecisionMap

HERE = Path(__file__).resolve().parent
CONFIGS = {"lstm": "ptb_lstm", "transformer": "ptb_transformer"}


def _fresh(ckpt: dict) -> torch.nn.Module:
    model = restore_model(ckpt)
    return model


def time_hooks(model: torch.nn.Module, hooks: TrainingHooks, batches: list) -> list[float]:
    """Seconds per step: forward, penalty, backward, hooks, clipping, SGD step (as nas.retrain.loop does)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    state, times = None, []
    for step, (inputs, targets) in enumerate(batches):
        start = time.perf_counter()
        hooks.before_forward(model)
        out = model(inputs, state, targets)
        extra = hooks.penalty(model)
        optimizer.zero_grad()
        (out.loss if extra is None else out.loss + extra).backward()
        hooks.before_step(model)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        hooks.after_step(model, step, lr=0.01, loss_scale=1.0)
        state = model.detach_state(out.state) if hasattr(model, "detach_state") else None
        times.append(time.perf_counter() - start)
    return times


def time_supernet(model: torch.nn.Module, batches: list, rescale_every: int = 50) -> list[float]:
    """Seconds per supernet weight step (composite weights, one matmul per layer)."""
    names = find_clusters(model)
    net = GumbelSupernet(model, {n: (1, 2, 4, 8) for n in names})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(0)
    state, times = None, []
    for step, (inputs, targets) in enumerate(batches):
        start = time.perf_counter()
        if step % rescale_every == 0:
            net.refresh_scales()
        out = net(inputs, state, targets, tau=1.0, generator=generator)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        state = model.detach_state(out.state) if hasattr(model, "detach_state") else None
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--checkpoint", type=Path, help="FP checkpoint (default: the committed reference)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    exp = load_config(CONFIGS[args.model])
    corpus = load_corpus(resolve_data_dir(args.data))
    ckpt = load_fp_checkpoint(args.checkpoint or HERE / "checkpoints" / f"ptb_{args.model}.safetensors", corpus)
    batches = epoch_batches(exp, corpus, 0, DistInfo(), recurrent=args.model == "lstm")[: args.steps + 3]
    precision = PrecisionMap.uniform(_fresh(ckpt), 2)
    times: dict[str, list[float]] = {"fp": [], "admm": [], "ste": [], "gumbel": []}
    for _ in range(args.rounds):
        for method in times:
            model = _fresh(ckpt)
            if method == "gumbel":
                sample = time_supernet(model, batches)
            else:
                hooks = TrainingHooks() if method == "fp" else make_hooks(exp.retrain, precision, method)(model)
                sample = time_hooks(model, hooks, batches)
            times[method] += sample[3:]  # drop warm-up steps
    fp = statistics.median(times["fp"])
    rows = [{"model": f"ptb_{args.model}", "method": m, "median_step_s": f"{statistics.median(t):.4f}",
             "ratio_to_fp": f"{statistics.median(t) / fp:.3f}", "steps": len(t)} for m, t in times.items()]
    path = HERE / "results" / "step_time.csv"
    kept = [r for r in csv.DictReader(path.open()) if r["model"] != f"ptb_{args.model}"] if path.is_file() else []
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(kept + rows)
    atomic_write_text(path, buffer.getvalue())
    print(buffer.getvalue())


if __name__ == "__main__":
    main()
