"""Mixed-precision search sweep on PTB: strategies x budgets, each map fine-tuned with one budget.

    MPNAS_DATA=../shared/data/ptb .venv/bin/python benchmarks/search_sweep.py --model lstm \\
        --budgets 2 --strategies kl hessian gumbel --prototypes benchmarks/prototypes/ptb_lstm \\
        --mode prototype --init inherited --retrain-method ste --retrain-steps 500 --threads 1

It runs ``mpnas pipeline`` (nas/pipeline/runner.py) from ``--checkpoint``
(default: the committed reference ``benchmarks/checkpoints/ptb_<model>.safetensors``)
into ``--out`` (default ``benchmarks/runs/<model>_search_<mode>_<init>``; resumable: rerun the
command after an interruption), with the config's candidate widths (``space``; 1, 2, 3, 4, 8),
every map fine-tuned with the config's ``retrain`` section capped at one epoch of
``--retrain-steps`` steps.

- ``--prototypes DIR``: a folder of ``mpnas prototypes`` (``pipeline.prototypes_dir``); its
  widths become report points (strategy ``prototype``).
- ``--mode prototype``: kl and hessian score, and gumbel's supernet mixes, the prototypes'
  weights; ``--mode fp`` (default): the FP weights (post-training quantization).
- ``--init inherited``: each map's fine-tuning starts from its prototypes' weights; ``fp``
  (default): from the FP weights.

Then it writes ``benchmarks/results/search.csv`` (columns ``model,strategy,mode,init,budget_bits,
avg_bits,compression,valid_ppl,test_ppl,retrain_steps,search_s,search_fp_epochs,retrain_s,
retrain_fp_epochs``; uniform and random measure nothing, their ``mode`` is ``fp``) and, unless
``--no-copy-plots``, copies the run's report plots to ``benchmarks/<model>_pareto.png`` /
``<model>_bits.png``. Rows are keyed by (model, strategy, mode, init, budget, retrain steps): several calls
fill one file.

``*_fp_epochs`` = seconds / seconds of one FP training epoch, the latter measured in this
process (median step time of FP training on the same batches x steps per epoch). The kl and
hessian score tables are computed once per run folder and reused across budgets; their cost is
charged to every budget (the pipeline records the original scoring time).
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

from nas.config.sections import load_config
from nas.core.atomic import atomic_write_csv
from nas.core.console import configure_logging
from nas.core.data import load_corpus, resolve_data_dir
from nas.pipeline.runner import run_pipeline
from nas.pipeline.state import read_rows
from nas.retrain.distributed import DistInfo
from nas.retrain.hooks import TrainingHooks
from nas.retrain.loop import epoch_batches
from nas.retrain.run import load_fp_checkpoint
from search_spaces.models import restore_model

HERE = Path(__file__).resolve().parent
CONFIGS = {"lstm": "ptb_lstm", "transformer": "ptb_transformer"}
COLUMNS = ["model", "strategy", "mode", "init", "budget_bits", "avg_bits", "compression", "valid_ppl", "test_ppl",
           "retrain_steps", "search_s", "search_fp_epochs", "retrain_s", "retrain_fp_epochs"]
MEASURING = ("kl", "hessian", "gumbel")  # the strategies whose search reads weights (fp or prototype mode)


def fp_epoch_seconds(exp: object, corpus: object, ckpt: dict, steps: int = 30) -> float:
    """Seconds of one FP training epoch: median step time on real batches x steps per epoch."""
    recurrent = exp.model_type == "lstm"
    all_batches = epoch_batches(exp, corpus, 0, DistInfo(), recurrent=recurrent)
    model = restore_model(ckpt)
    times = time_hooks(model, TrainingHooks(), all_batches[: steps + 5])[5:]
    return statistics.median(times) * len(all_batches)


def _fp_epochs(seconds: float | None, fp_epoch_s: float) -> tuple[str, str]:
    return ("", "") if seconds is None else (f"{seconds:.1f}", f"{seconds / fp_epoch_s:.3f}")


def write_csv(path: Path, model: str, rows: list[dict], fp_epoch_s: float, *, mode: str, init: str,
              retrain_steps: int) -> None:
    """Replace this call's rows (same model, strategy, mode, init, budget) in search.csv, atomically.

    Rows of other strategies, modes and inits stay, so that several calls (and two processes with
    their own run folders) fill one file. Prototype rows (strategy ``prototype``) are the
    prototypes themselves: mode ``prototype``, init ``fp``, no fine-tuning here.
    """
    kept = [r for r in csv.DictReader(path.open())] if path.is_file() else []
    new = []
    for row in rows:
        if row["strategy"] == "fp":
            continue
        prototype = row["strategy"] == "prototype"
        row_mode = "prototype" if prototype or (mode == "prototype" and row["strategy"] in MEASURING) else "fp"
        search_s, search_ep = _fp_epochs(row.get("search_s"), fp_epoch_s)
        retrain_s, retrain_ep = _fp_epochs(row.get("retrain_s"), fp_epoch_s)
        new.append({"model": model, "strategy": row["strategy"], "mode": row_mode,
                    "init": "fp" if prototype else init, "budget_bits": f"{row['budget']:g}",
                    "avg_bits": f"{row['avg_bits']:.3f}", "compression": f"{row['compression']:.2f}",
                    "valid_ppl": f"{row['valid_ppl']:.2f}", "test_ppl": f"{row['test_ppl']:.2f}",
                    "retrain_steps": "" if prototype else str(retrain_steps),
                    "search_s": search_s, "search_fp_epochs": search_ep,
                    "retrain_s": retrain_s, "retrain_fp_epochs": retrain_ep})
    key = ("model", "strategy", "mode", "init", "budget_bits", "retrain_steps")
    replaced = {tuple(r[k] for k in key) for r in new}
    kept = [r for r in kept if tuple(r.get(k, "") for k in key) not in replaced] + new
    kept.sort(key=lambda r: (r["model"], float(r["budget_bits"]), r["strategy"], r["mode"], r["init"],
                             int(r["retrain_steps"] or 0)))
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
    parser.add_argument("--prototypes", type=Path, help="folder of `mpnas prototypes` (pipeline.prototypes_dir)")
    parser.add_argument("--mode", choices=["fp", "prototype"], default="fp",
                        help="kl/hessian/gumbel on the FP weights or on the prototypes (needs --prototypes)")
    parser.add_argument("--init", choices=["fp", "inherited"], default="fp",
                        help="fine-tune each map from the FP weights or the prototypes' (needs --prototypes)")
    parser.add_argument("--out", help="run folder (default benchmarks/runs/<model>_search_<mode>_<init>)")
    parser.add_argument("--quantize-all", action="store_true",
                        help="empty the space's keep_fp (the Transformer's pos_embedding), as the uniform table "
                        "and the prototypes do: a kept FP cluster counts 32 bits, and uniform at 2.0 then uses 1 bit")
    parser.add_argument("--data")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-prune", dest="prune", action="store_false",
                        help="keep rows of points not in this call's grid (several calls fill one run folder)")
    parser.add_argument("--collect-only", action="store_true",
                        help="do not run anything: write search.csv from the run folder's finished rows")
    parser.add_argument("--no-copy-plots", dest="copy_plots", action="store_false",
                        help="do not copy the run's plots to benchmarks/ (split runs: use mpnas report A B)")
    args = parser.parse_args()
    if (args.mode == "prototype" or args.init == "inherited") and args.prototypes is None:
        parser.error(f"--mode {args.mode} --init {args.init} needs --prototypes DIR (a folder of `mpnas prototypes`)")
    torch.set_num_threads(args.threads)
    exp = load_config(CONFIGS[args.model])
    exp = dataclasses.replace(
        exp, retrain=dataclasses.replace(exp.retrain, epochs=1, max_steps_per_epoch=args.retrain_steps,
                                         init=args.init),
        search=dataclasses.replace(exp.search, epochs=args.gumbel_epochs),
        space={**(exp.space or {}), **({"keep_fp": []} if args.quantize_all else {})},
        pipeline=dataclasses.replace(exp.pipeline, prototypes_dir=None if args.prototypes is None else str(
            args.prototypes), search_on_prototypes=args.mode == "prototype"))
    out = Path(args.out) if args.out else HERE / "runs" / f"{args.model}_search_{args.mode}_{args.init}"
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
    write_csv(HERE / "results" / "search.csv", f"ptb_{args.model}", rows, fp_epoch_s, mode=args.mode,
              init=args.init, retrain_steps=args.retrain_steps)
    if args.copy_plots:
        for name in ("pareto.png", "bits.png"):
            source = out / "report" / name
            if source.is_file():
                shutil.copyfile(source, HERE / f"{args.model}_{name}")
    print(f"wrote {HERE / 'results' / 'search.csv'}", flush=True)


if __name__ == "__main__":
    main()
