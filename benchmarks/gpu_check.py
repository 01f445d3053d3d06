"""CUDA smoke check: training steps, the LSTM's double backward, a gumbel search epoch and Hessian traces.

    python benchmarks/gpu_check.py [--steps 20] [--device cpu]

Exits 0 with a SKIP line when CUDA is absent, so it is safe to run anywhere. Prints one
line per check with the numbers that prove it ran on the device.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from nas.config.sections import parse_config
from nas.retrain.loop import make_optimizer
from search_spaces.models import build_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_steps(kind: str, device: torch.device, steps: int) -> tuple[float, float, float]:
    """Train a small model on random tokens; returns (first loss, last loss, seconds per step)."""
    torch.manual_seed(0)
    kwargs = ({"vocab_size": 1000, "embed_dim": 128, "hidden_dim": 128} if kind == "lstm" else
              {"vocab_size": 1000, "d_model": 128, "num_heads": 4, "d_ff": 512, "context": 64})
    model = build_model(kind, **kwargs).to(device)
    cfg = parse_config({"model": {"type": kind}, "train": {"optimizer": "adam", "lr": 3e-3}}).train
    optimizer = make_optimizer(cfg, model.parameters())
    data = torch.randint(0, 1000, (16, 65), device=device)
    data[:, 1::2] = data[:, 0::2][:, :32]  # a copy pattern the model can learn quickly
    losses = []
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        out = model(data[:, :-1], None, data[:, 1:])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.loss.detach()))
    _sync(device)
    return losses[0], losses[-1], (time.perf_counter() - start) / steps


def lstm_double_backward(device: torch.device) -> float:
    """Hessian-vector product through the explicit-gate LSTM; returns |Hv| summed."""
    torch.manual_seed(0)
    model = build_model("lstm", vocab_size=200, embed_dim=32, hidden_dim=32).to(device)
    tokens = torch.randint(0, 200, (4, 12), device=device)
    params = list(model.parameters())
    grads = torch.autograd.grad(model(tokens, targets=tokens).loss, params, create_graph=True)
    probes = [torch.randn_like(p) for p in params]
    hvp = torch.autograd.grad(sum((g * v).sum() for g, v in zip(grads, probes, strict=True)), params)
    total = sum(float(h.abs().sum()) for h in hvp)
    if not all(torch.isfinite(h).all() for h in hvp) or total == 0.0:
        raise RuntimeError(f"LSTM Hessian-vector product on {device} is degenerate (sum |Hv| = {total})")
    return total


def gumbel_epoch(kind: str, device: torch.device) -> tuple[float, float, float]:
    """One supernet epoch (nas/search/gumbel.py) of a small model on random tokens.

    Returns (expected average bits at the end, the budget, seconds). Checks the exported map's
    average bits are within the budget.
    """
    from nas.search.gumbel import GumbelSettings, gumbel_search
    from search_spaces.clusters import find_clusters

    torch.manual_seed(0)
    kwargs = ({"vocab_size": 500, "embed_dim": 64, "hidden_dim": 64} if kind == "lstm" else
              {"vocab_size": 500, "d_model": 64, "num_heads": 4, "d_ff": 256, "context": 32})
    model = build_model(kind, **kwargs)
    clusters = find_clusters(model)
    candidates = {name: (1, 2, 4, 8) for name in clusters}
    total = sum(c.numel for c in clusters.values())
    tokens = torch.randint(0, 500, (40_000,))
    start = time.perf_counter()
    precision = gumbel_search(model, candidates, tokens, max_weight_bits=2.0 * total,
                              settings=GumbelSettings(epochs=1.0), batch_size=16, length=32, device=device)
    _sync(device)
    seconds = time.perf_counter() - start
    used = sum(precision.bits[n] * clusters[n].numel for n in clusters) / total
    if used > 2.0 + 1e-9:
        raise RuntimeError(f"gumbel on {device}: exported map uses {used:.3f} average bits > budget 2")
    if next(model.parameters()).device.type != device.type:
        raise RuntimeError(f"gumbel search did not run on {device}")
    return used, 2.0, seconds


def hessian_traces(device: torch.device) -> tuple[int, float, float]:
    """Hutchinson traces of every cluster of a small LSTM LM; returns (clusters, max |trace|, seconds)."""
    from nas.search.hessian import hutchinson_traces
    from search_spaces.clusters import find_clusters

    torch.manual_seed(0)
    model = build_model("lstm", vocab_size=300, embed_dim=32, hidden_dim=32).to(device)
    tokens = torch.randint(0, 300, (8, 21), device=device)
    names = list(find_clusters(model))
    start = time.perf_counter()
    traces = hutchinson_traces(model, names, lambda m: m(tokens[:, :-1], None, tokens[:, 1:]).loss,
                               max_iters=30, tol=1e-2, seed=0)
    _sync(device)
    values = [float(t.trace) for t in traces.values()]
    if len(values) != len(names) or not all(torch.isfinite(torch.tensor(values))):
        raise RuntimeError(f"Hessian traces on {device}: missing or non-finite values {values}")
    return len(values), max(abs(v) for v in values), time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu to dry-run the script")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("SKIP: CUDA is not available on this machine")
        return 0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}")
    failed = False
    for kind in ("lstm", "transformer"):
        first, last, seconds = train_steps(kind, device, args.steps)
        ok = last < first
        failed |= not ok
        print(f"{'OK ' if ok else 'FAIL'} train {kind}: loss {first:.3f} -> {last:.3f} over {args.steps} steps, "
              f"{seconds * 1e3:.1f} ms/step")
    total = lstm_double_backward(device)
    print(f"OK  lstm double backward on {device}: sum |Hv| = {total:.4g}")
    for kind in ("lstm", "transformer"):
        used, budget, seconds = gumbel_epoch(kind, device)
        print(f"OK  gumbel search epoch {kind} on {device}: exported {used:.3f} average bits (budget {budget:g}), "
              f"{seconds:.1f} s")
    count, largest, seconds = hessian_traces(device)
    print(f"OK  hessian traces on {device}: {count} clusters, max |trace| {largest:.4g}, {seconds:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
