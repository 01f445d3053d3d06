"""Search cost in FP epochs, measured in one process: FP epoch, searches, FP epoch again.

    MPNAS_DATA=../shared/data/ptb .venv/bin/python benchmarks/search_cost.py --model lstm \\
        --strategies kl hessian gumbel --threads 1

For the FP checkpoint (``--checkpoint``;
default: the committed reference ``benchmarks/checkpoints/ptb_<model>.safetensors``): the FP epoch time (median
step on real batches x steps per epoch, as ``search_sweep.py``) is measured before and after
the searches, and each strategy searches a 2.0-bit map from scratch (no score-table cache) with
the settings of ``search_spaces/ptb_<model>.yaml`` (gumbel: ``--gumbel-epochs``). The ratio uses
the mean of the two FP timings, so load that changes during the run shows up as a gap between
them (printed). Rows replace this model's rows in ``benchmarks/results/search_cost.csv``
(``model,strategy,search_s,fp_epoch_s,fp_epoch_gap,search_fp_epochs``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import tempfile
import time
from pathlib import Path

import torch
from search_sweep import CONFIGS, fp_epoch_seconds  # benchmarks/ is on sys.path when this script runs

from nas.config.sections import load_config
from nas.core.atomic import atomic_write_csv
from nas.core.console import configure_logging
from nas.core.data import load_corpus, resolve_data_dir
from nas.pipeline.stages import Point, search_point
from nas.retrain.run import load_fp_checkpoint

HERE = Path(__file__).resolve().parent
COLUMNS = ["model", "strategy", "search_s", "fp_epoch_s", "fp_epoch_gap", "search_fp_epochs"]


def write_rows(path: Path, model: str, rows: list[dict[str, object]]) -> None:
    """Replace ``model``'s rows of these strategies in ``path``, atomically."""
    strategies = {str(r["strategy"]) for r in rows}
    kept = [r for r in csv.DictReader(path.open())] if path.is_file() else []
    kept = [r for r in kept if r["model"] != model or r["strategy"] not in strategies] + rows
    kept.sort(key=lambda r: (str(r["model"]), str(r["strategy"])))
    atomic_write_csv(path, COLUMNS, kept)


def main() -> None:
    configure_logging()  # the library logs its progress (epoch lines, pipeline stages)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--checkpoint", type=Path, help="FP checkpoint (default: the committed reference)")
    parser.add_argument("--strategies", nargs="+", default=["kl", "hessian"],
                        choices=["kl", "hessian", "gumbel"])
    parser.add_argument("--gumbel-epochs", type=float, default=0.5)
    parser.add_argument("--data")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    exp = load_config(CONFIGS[args.model])
    exp = dataclasses.replace(exp, search=dataclasses.replace(exp.search, epochs=args.gumbel_epochs))
    corpus = load_corpus(resolve_data_dir(args.data))
    fp_path = args.checkpoint or HERE / "checkpoints" / f"ptb_{args.model}.safetensors"
    before = fp_epoch_seconds(exp, corpus, load_fp_checkpoint(fp_path, corpus))
    print(f"FP epoch before: {before:.1f} s", flush=True)
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in args.strategies:
            point = Point(strategy, 2.0)
            start = time.perf_counter()
            search_point(exp, corpus, fp_path, point, Path(tmp) / f"{strategy}.yaml",
                         cache_dir=Path(tmp) / "cache", device="cpu")
            seconds[strategy] = time.perf_counter() - start
            print(f"{strategy}: {seconds[strategy]:.1f} s", flush=True)
    after = fp_epoch_seconds(exp, corpus, load_fp_checkpoint(fp_path, corpus))
    fp_epoch = 0.5 * (before + after)
    gap = abs(after - before) / fp_epoch
    print(f"FP epoch after: {after:.1f} s (gap {gap:.1%})", flush=True)
    rows = [{"model": f"ptb_{args.model}", "strategy": s, "search_s": f"{t:.1f}", "fp_epoch_s": f"{fp_epoch:.1f}",
             "fp_epoch_gap": f"{gap:.3f}", "search_fp_epochs": f"{t / fp_epoch:.3f}"} for s, t in seconds.items()]
    for row in rows:
        print(row, flush=True)
    write_rows(HERE / "results" / "search_cost.csv", f"ptb_{args.model}", rows)


if __name__ == "__main__":
    main()
