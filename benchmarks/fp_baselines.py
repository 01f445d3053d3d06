"""FP baselines on PTB: train the LSTM (Zaremba small) and the 6-layer Transformer.

    python benchmarks/fp_baselines.py --model lstm --threads 1
    python benchmarks/fp_baselines.py --model transformer --threads 1

Checkpoints go to ``benchmarks/checkpoints/<model>/`` (``best.pt`` is the FP starting
point of the quantization benchmarks; not committed). Rerunning the same command resumes
an interrupted run. The row for the model in ``benchmarks/results/fp_baselines.csv`` is
replaced (columns ``model,params,epochs,valid_ppl,test_ppl,train_tokens_per_s``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
from pathlib import Path

import torch

from nas.config.sections import load_config
from nas.core.checkpoint import atomic_write_text
from nas.core.console import configure_logging
from nas.core.data import load_corpus, resolve_data_dir
from nas.retrain.loop import train

HERE = Path(__file__).resolve().parent
CONFIGS = {"lstm": "ptb_lstm", "transformer": "ptb_transformer"}
COLUMNS = ["model", "params", "epochs", "valid_ppl", "test_ppl", "train_tokens_per_s"]


def write_row(csv_path: Path, row: dict[str, object]) -> None:
    """Replace (or add) the row of ``row['model']`` in the results CSV, atomically."""
    rows = []
    if csv_path.is_file():
        rows = [r for r in csv.DictReader(csv_path.open()) if r["model"] != row["model"]]
    rows.append({k: row[k] for k in COLUMNS})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda r: r["model"]))
    atomic_write_text(csv_path, buffer.getvalue())


def main() -> None:
    configure_logging()  # the library logs its progress (epoch lines, pipeline stages)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--data", help="PTB folder (default $MPNAS_DATA)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int, default=None,
                        help="stop after this many epochs (e.g. once valid has risen for several); with the "
                             "step schedule the epochs run are those of the full recipe")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    exp = load_config(CONFIGS[args.model])
    if args.epochs is not None:
        if exp.train.schedule == "cosine":
            parser.error("--epochs would change the cosine schedule of this model's recipe")
        exp = dataclasses.replace(exp, train=dataclasses.replace(exp.train, epochs=args.epochs))
    corpus = load_corpus(resolve_data_dir(args.data))
    metrics = train(exp, corpus, HERE / "checkpoints" / args.model, device=args.device, resume=True,
                    progress=False, checkpoint_every=500)
    row = {"model": f"ptb_{args.model}", **{k: metrics[k] for k in COLUMNS[1:]}}
    row["valid_ppl"] = f"{metrics['valid_ppl']:.2f}"
    row["test_ppl"] = f"{metrics['test_ppl']:.2f}"
    row["train_tokens_per_s"] = f"{metrics['train_tokens_per_s']:.0f}"
    write_row(HERE / "results" / "fp_baselines.csv", row)
    print(row)


if __name__ == "__main__":
    main()
