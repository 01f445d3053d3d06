"""Collect ``mpnas retrain`` run folders into one CSV (the raw rows of a RESULTS.md table).

    .venv/bin/python benchmarks/collect_retrain.py benchmarks/runs/kd/lstm/kl_b2_kd \\
        benchmarks/runs/kd/lstm/uniform2_kd --fp benchmarks/checkpoints/ptb_lstm.safetensors \\
        --out benchmarks/results/kd_retrain.csv

One row per run folder: the map's strategy (from ``precision.yaml``'s meta, ``uniform`` for
``uniform:B``), the retrain recipe (method, distillation weight, epochs), sizes, valid/test
perplexity, test / FP test, per-epoch valid perplexity and training tokens/s. Rows already in
``--out`` for other run folders are kept; the file is rewritten atomically.

``--trained-scales`` also evaluates the STE run's last state (``checkpoint.pt``: latent weights
and the scales its last steps trained with) projected with those scales: columns
``valid_trained_scales`` and ``test_trained_scales``. Runs made before the STE hooks validated
that way (commit "STE: validate ... with the scales training used") picked best.pt with scales
re-solved on the latent weights; this re-evaluates them as the current code would.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import torch
import yaml

from nas.config.sections import parse_config
from nas.core.atomic import atomic_write_csv
from nas.core.checkpoint import load_checkpoint
from nas.core.data import Corpus, load_corpus, resolve_data_dir
from nas.retrain.loop import _evaluate
from nas.retrain.ste import SteHooks
from search_spaces.models import build_model
from search_spaces.precision import PrecisionMap

COLUMNS = ["run", "model", "strategy", "method", "distill", "epochs", "avg_bits", "compression", "valid_ppl",
           "test_ppl", "test_over_fp", "valid_by_epoch", "train_tokens_per_s", "valid_trained_scales",
           "test_trained_scales", "test_trained_scales_over_fp"]


def trained_scales_ppl(run: Path, corpus: Corpus, threads: int | None) -> tuple[float, float]:
    """Valid and test perplexity of the run's last STE state, projected with its trained scales."""
    if threads:
        torch.set_num_threads(threads)
    ckpt = load_checkpoint(run / "checkpoint.pt")
    exp = parse_config(ckpt["config"], str(run / "checkpoint.pt"))
    model = build_model(exp.model_type, **{**exp.model_kwargs(), "vocab_size": len(corpus.vocab)})
    model.load_state_dict(ckpt["model"])
    hooks = SteHooks(model, PrecisionMap.load(run / "precision.yaml"))
    hooks.load_state_dict(ckpt["hooks"])
    device = torch.device("cpu")
    with hooks.evaluation(model):
        return _evaluate(model, exp, corpus, "valid", device), _evaluate(model, exp, corpus, "test", device)


def row_for(run: Path, fp_test: float, corpus: Corpus | None = None, threads: int | None = None
            ) -> dict[str, str]:
    """The CSV row of one retrain run folder."""
    metrics_path = run / "metrics.json"
    if not metrics_path.is_file():
        raise SystemExit(f"{run}: no metrics.json (the retrain has not finished)")
    metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    if "method" not in metrics:  # nas.retrain.loop wrote it; nas.retrain.run has not finished the run folder yet
        raise SystemExit(f"{metrics_path}: no 'method' key (the retrain has not finished)")
    precision = yaml.safe_load((run / "precision.yaml").read_text(encoding="utf-8"))
    meta = precision.get("meta") or {}
    config = load_checkpoint(run / "checkpoint.pt")["config"]
    retrain = config["retrain"]
    row = {
        "run": str(run), "model": metrics["model"], "strategy": meta.get("strategy", "uniform"),
        "method": metrics["method"], "distill": f"{retrain.get('distill', 0.0):g}", "epochs": str(retrain["epochs"]),
        "avg_bits": f"{metrics['avg_bits']:.3f}", "compression": f"{metrics['compression']:.2f}",
        "valid_ppl": f"{metrics['valid_ppl']:.2f}", "test_ppl": f"{metrics['test_ppl']:.2f}",
        "test_over_fp": f"{metrics['test_ppl'] / fp_test:.3f}",
        "valid_by_epoch": " ".join(f"{h['valid_ppl']:.2f}" for h in metrics["history"]),
        "train_tokens_per_s": f"{metrics['train_tokens_per_s']:.0f}",
        "valid_trained_scales": "", "test_trained_scales": "", "test_trained_scales_over_fp": "",
    }
    if corpus is not None and metrics["method"] == "ste":
        valid, test = trained_scales_ppl(run, corpus, threads)
        row.update(valid_trained_scales=f"{valid:.2f}", test_trained_scales=f"{test:.2f}",
                   test_trained_scales_over_fp=f"{test / fp_test:.3f}")
    return row


def main() -> None:
    """Parse arguments, read the run folders, merge into ``--out``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="mpnas retrain run folders")
    parser.add_argument("--fp", type=Path, required=True, help="the FP best.pt (its test ppl is the reference)")
    parser.add_argument("--fp-test", type=float, help="FP test ppl (default: benchmarks/results/fp_baselines.csv)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--trained-scales", action="store_true",
                        help="also evaluate the last STE state with its trained scales (needs --data or $MPNAS_DATA)")
    parser.add_argument("--data", help="corpus folder (default $MPNAS_DATA)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    corpus = load_corpus(resolve_data_dir(args.data)) if args.trained_scales else None
    fp_test = args.fp_test
    if fp_test is None:
        name = {"lstm": "ptb_lstm", "transformer": "ptb_transformer"}[load_checkpoint(args.fp)["config"]["type"]]
        with open(Path(__file__).parent / "results" / "fp_baselines.csv", encoding="utf-8") as handle:
            fp_test = next(float(r["test_ppl"]) for r in csv.DictReader(handle) if r["model"] == name)
    rows: dict[str, dict[str, str]] = {}
    if args.out.is_file():
        with open(args.out, encoding="utf-8") as handle:
            rows = {r["run"]: {c: r.get(c, "") for c in COLUMNS} for r in csv.DictReader(handle)}
    for run in args.runs:
        rows[str(run)] = row_for(run, fp_test, corpus, args.threads)
    atomic_write_csv(args.out, COLUMNS, list(rows.values()))
    for row in rows.values():
        print(",".join(row[c] for c in COLUMNS))


if __name__ == "__main__":
    main()
