"""The papers' setting: low-bit LMs trained from random initialisation, ADMM vs STE at equal epochs.

    MPNAS_DATA=../shared/data/ptb .venv/bin/python benchmarks/scratch_quant.py \\
        --config benchmarks/scratch_lstm.yaml --bits 2 --method admm --threads 1

Trains the config's model from scratch with the config's ``retrain`` section as the recipe (its
optimiser, schedule, epochs and ADMM settings; ``--epochs`` overrides) under uniform ``--bits``
precision with ``--method`` (``admm`` or ``ste``; ADMM's forward from ``retrain.admm_forward``,
or ``--admm-forward``). The run folder ``benchmarks/checkpoints/scratch/<config>/<method>_<bits>/``
resumes when rerun. Writes the row ``model,method,bits,epochs,valid_ppl,test_ppl`` of
``benchmarks/results/scratch.csv`` and the per-epoch valid perplexities of the run in
``benchmarks/results/scratch_curves.csv`` (``model,method,bits,epoch,valid_ppl``), both replaced
per (model, method, bits) under a lock, so one invocation per core can run side by side.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import fcntl
from pathlib import Path

import torch

from nas.config.sections import load_config
from nas.core.atomic import atomic_write_csv
from nas.core.console import configure_logging
from nas.core.data import load_corpus, resolve_data_dir
from nas.retrain.loop import train
from nas.retrain.run import make_hooks
from search_spaces.models import build_model
from search_spaces.precision import PrecisionMap

HERE = Path(__file__).resolve().parent
COLUMNS = ["model", "method", "bits", "epochs", "valid_ppl", "test_ppl"]
CURVE_COLUMNS = ["model", "method", "bits", "epoch", "valid_ppl"]


def replace_rows(path: Path, columns: list[str], key: tuple[str, str, str], rows: list[dict[str, object]]) -> None:
    """Replace the rows of ``key`` = (model, method, bits) in ``path``, atomically and under a lock."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        kept = []
        if path.is_file():
            kept = [r for r in csv.DictReader(path.open()) if (r["model"], r["method"], r["bits"]) != key]
        atomic_write_csv(path, columns, sorted(kept + [{k: r[k] for k in columns} for r in rows],
                                               key=lambda r: (r["model"], r["method"], -int(r["bits"]),
                                                              float(r.get("epoch", 0)))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="experiment YAML or packaged name")
    parser.add_argument("--bits", type=int, required=True)
    parser.add_argument("--method", choices=["admm", "ste"], required=True)
    parser.add_argument("--admm-forward", choices=["quantized", "latent"])
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--data")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    configure_logging()  # the library's progress lines (epochs) on stdout
    if args.threads:
        torch.set_num_threads(args.threads)
    exp = load_config(args.config)
    recipe = exp.retrain
    if args.epochs:
        recipe = dataclasses.replace(recipe, epochs=args.epochs)
    if args.admm_forward:
        recipe = dataclasses.replace(recipe, admm_forward=args.admm_forward)
    corpus = load_corpus(resolve_data_dir(args.data))
    probe = build_model(exp.model_type, **{**exp.model_kwargs(), "vocab_size": len(corpus.vocab)})
    precision = PrecisionMap.uniform(probe, args.bits)
    method = args.method if args.method == "ste" else f"admm_{recipe.admm_forward}"
    out = HERE / "checkpoints" / "scratch" / Path(args.config).stem / f"{method}_{args.bits}"
    metrics = train(exp, corpus, out, device=args.device, resume=True, progress=False, checkpoint_every=500,
                    train_cfg=recipe, make_hooks=make_hooks(recipe, precision, args.method))
    model = f"ptb_{exp.model_type}"
    key = (model, method, str(args.bits))
    replace_rows(HERE / "results" / "scratch.csv", COLUMNS, key, [{
        "model": model, "method": method, "bits": args.bits, "epochs": recipe.epochs,
        "valid_ppl": f"{metrics['valid_ppl']:.2f}", "test_ppl": f"{metrics['test_ppl']:.2f}"}])
    replace_rows(HERE / "results" / "scratch_curves.csv", CURVE_COLUMNS, key, [
        {"model": model, "method": method, "bits": args.bits, "epoch": h["epoch"],
         "valid_ppl": f"{h['valid_ppl']:.2f}"} for h in metrics["history"]])
    print({k: metrics[k] for k in ("valid_ppl", "test_ppl")}, flush=True)


if __name__ == "__main__":
    main()
