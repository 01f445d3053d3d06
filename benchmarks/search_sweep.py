"""Mixed-precision search sweep on PTB: every strategy x budget, each map retrained with one budget.

    MPNAS_DATA=../shared/data/ptb .venv/bin/python benchmarks/search_sweep.py --model lstm \\
        --budgets 1.5 2 3 4 --strategies uniform random kl hessian gumbel \\
        --retrain-steps 800 --gumbel-epochs 0.5 --threads 1

It runs ``mpnas pipeline`` (nas/pipeline.py) from ``--checkpoint``
(default: the committed reference ``benchmarks/checkpoints/ptb_<model>.safetensors``)
into ``benchmarks/runs/<model>_search/`` (resumable: rerun the command after an interruption),
with candidates 1, 2, 4, 8 (the config's ``space``), every map retrained with the config's
``retrain`` section (ADMM) capped at ``--retrain-steps`` steps. Then it writes
``benchmarks/results/search.csv`` (columns
``model,strategy,budget_bits,avg_bits,compression,valid_ppl,test_ppl,search_s,search_fp_epochs``)
and copies the run's report plots to ``benchmarks/<model>_pareto.png`` / ``<model>_bits.png``.
To use both cores, split the strategies over two run folders (``--out``, ``--no-copy-plots``)
and draw one report with ``mpnas report RUN_A RUN_B --out DIR``.

``search_fp_epochs`` = search seconds / seconds of one FP training epoch, the latter measured in
this process (median step time of FP training on the same batches x steps per epoch). The kl and
hessian score tables are computed once and reused across budgets; their cost is charged to
every budget (the pipeline records the original scoring time).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import shutil
import statistics
from pathlib import Path

import torch
from step_time import time_hooks  # benchmarks/ is on sys.path when this script runs

from nas.config import load_config
from nas.console import configure_logging
from nas.data import load_corpus, resolve_data_dir
from nas.distributed import DistInfo
from nas.pipeline import read_rows, run_pipeline
from nas.retrain import load_fp_checkpoint
from nas.train import TrainingHooks, epoch_batches
from search_spaces.atomic import atomic_write_csv
from search_spaces.models import build_model

HERE = Path(__file__).resolve().parent
CONFIGS = {"lstm": "ptb_lstm", "transformer": "ptb_transformer"}
COLUMNS = ["model", "strategy", "budget_bits", "avg_bits", "compression", "valid_ppl", "test_ppl", "search_s",
           "search_fp_epochs"]


def fp_epoch_seconds(exp: object, corpus: object, ckpt: dict, steps: int = 30) -> float:
    """Seconds of one FP training epoch: median step time on real batches x steps per epoch."""
    recurrent = exp.model_type == "lstm"
    all_batches = epoch_batches(exp, corpus, 0, DistInfo(), recurrent=recurrent)
    config = dict(ckpt["config"])
    model = build_model(config.pop("type"), **config)
    model.load_state_dict(ckpt["model"])
    times = time_hooks(model, TrainingHooks(), all_batches[: steps + 5])[5:]
    return statistics.median(times) * len(all_batches)


def write_csv(path: Path, model: str, rows: list[dict], fp_epoch_s: float) -> None:
    """Replace this model's rows of the (strategy, budget) points in ``rows`` in search.csv, atomically.

    Rows of other strategies stay, so that runs split by strategy (two processes, two run
    folders) fill one file.
    """
    kept = [r for r in csv.DictReader(path.open())] if path.is_file() else []
    points = {(row["strategy"], f"{row['budget']:g}") for row in rows if row["strategy"] != "fp"}
    kept = [r for r in kept if r["model"] != model or (r["strategy"], r["budget_bits"]) not in points]
    for row in rows:
        if row["strategy"] == "fp":
            continue
        search_s = row.get("search_s")
        kept.append({"model": model, "strategy": row["strategy"], "budget_bits": f"{row['budget']:g}",
                     "avg_bits": f"{row['avg_bits']:.3f}", "compression": f"{row['compression']:.2f}",
                     "valid_ppl": f"{row['valid_ppl']:.2f}", "test_ppl": f"{row['test_ppl']:.2f}",
                     "search_s": "" if search_s is None else f"{search_s:.1f}",
                     "search_fp_epochs": "" if search_s is None else f"{search_s / fp_epoch_s:.3f}"})
    kept.sort(key=lambda r: (r["model"], float(r["budget_bits"]), r["strategy"]))
    atomic_write_csv(path, COLUMNS, kept)


def main() -> None:
    configure_logging()  # the library logs its progress (epoch lines, pipeline stages)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--checkpoint", type=Path, help="FP checkpoint (default: the committed reference)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.5, 2.0, 3.0, 4.0])
    parser.add_argument("--strategies", nargs="+", default=["uniform", "random", "kl", "hessian", "gumbel"])
    parser.add_argument("--retrain-steps", type=int, default=800, help="cap on retraining steps (every map)")
    parser.add_argument("--retrain-method", choices=["admm", "ste"], default=None,
                        help="override the config's retrain.method for every map")
    parser.add_argument("--gumbel-epochs", type=float, default=0.5, help="supernet epochs per budget")
    parser.add_argument("--out", help="run folder (default benchmarks/runs/<model>_search)")
    parser.add_argument("--data")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-prune", dest="prune", action="store_false",
                        help="keep rows of points not in this call's grid (several calls fill one run folder)")
    parser.add_argument("--collect-only", action="store_true",
                        help="do not run anything: write search.csv from the run folder's finished rows")
    parser.add_argument("--no-copy-plots", dest="copy_plots", action="store_false",
                        help="do not copy the run's plots to benchmarks/ (split runs: use mpnas report A B)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    exp = load_config(CONFIGS[args.model])
    exp = dataclasses.replace(
        exp, retrain=dataclasses.replace(exp.retrain, epochs=1, max_steps_per_epoch=args.retrain_steps),
        search=dataclasses.replace(exp.search, epochs=args.gumbel_epochs))
    out = Path(args.out) if args.out else HERE / "runs" / f"{args.model}_search"
    fp_path = args.checkpoint or HERE / "checkpoints" / f"ptb_{args.model}.safetensors"
    if args.collect_only:
        rows = read_rows(out)
    else:
        rows = run_pipeline(exp, out, data=args.data, checkpoint=fp_path, strategies=args.strategies,
                            budgets=args.budgets, include_uniform=False, retrain_method=args.retrain_method,
                            prune=args.prune)
    corpus = load_corpus(resolve_data_dir(args.data))
    fp_epoch_s = fp_epoch_seconds(exp, corpus, load_fp_checkpoint(fp_path, corpus))
    print(f"FP epoch: {fp_epoch_s:.0f} s (median step x steps per epoch, measured now)", flush=True)
    write_csv(HERE / "results" / "search.csv", f"ptb_{args.model}", rows, fp_epoch_s)
    if args.copy_plots:
        for name in ("pareto.png", "bits.png"):
            source = out / "report" / name
            if source.is_file():
                shutil.copyfile(source, HERE / f"{args.model}_{name}")
    print(f"wrote {HERE / 'results' / 'search.csv'}", flush=True)


if __name__ == "__main__":
    main()
