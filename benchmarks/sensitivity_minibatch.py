"""Does one mini-batch of 32 sentences suffice for the prototype-mode sensitivities? (issue 13, item 2)

    MPNAS_DATA=../shared/data/ptb .venv/bin/python benchmarks/sensitivity_minibatch.py --model lstm --threads 1

For the PTB reference model and its committed prototypes (``benchmarks/prototypes/ptb_<model>``),
it computes the kl and hessian score tables on prototypes twice: with the config's data (kl: the
first ``search.kl_tokens`` valid tokens, 10,000; hessian: ``search.hessian_batches`` training
batches) and with one mini-batch of 32 sentences (PTB averages 22.1 tokens per sentence, so 704
tokens: kl on the first 704 valid tokens; hessian on one batch of 704 tokens: the LSTM's 20 x 35,
the Transformer's 11 windows of 64). It then compares the small tables with the full ones:
Spearman rank correlation over all (cluster, width) scores, and the maps each allocates at 1.5,
2 and 3 average bits (clusters, and share of the weights, given the same width).

``--cache DIR`` reuses score tables already computed with the same settings (the search sweep's
``<run>/cache/scores``), so the full tables cost nothing when the sweep made them; the seconds
column is then the original scoring time. Rows go to ``benchmarks/results/sensitivity_minibatch.csv``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
from pathlib import Path

import torch

from nas.config.sections import load_config
from nas.core.atomic import atomic_write_csv
from nas.core.console import configure_logging
from nas.core.data import load_corpus, resolve_data_dir
from nas.pipeline.stages import Point, load_model, search_point
from search_spaces.clusters import cluster_weight, find_clusters
from search_spaces.precision import PrecisionMap

HERE = Path(__file__).resolve().parent
CONFIGS = {"lstm": "ptb_lstm", "transformer": "ptb_transformer"}
SENTENCE_TOKENS = 704  # 32 sentences x 22 tokens (PTB train: 929,589 tokens in 42,068 lines)
COLUMNS = ["model", "strategy", "data", "tokens", "score_s", "budget_bits", "spearman_vs_full", "same_clusters",
           "clusters", "same_weight_share"]


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation (Pearson on ranks; ties are broken by position, rare for real scores)."""
    ra = torch.tensor(a, dtype=torch.float64).argsort().argsort().double()
    rb = torch.tensor(b, dtype=torch.float64).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def flat_scores(precision: PrecisionMap) -> dict[tuple[str, str], float]:
    """``{(cluster, width): score}`` of a kl or hessian map's meta."""
    return {(c, b): float(s) for c, row in precision.meta["scores"].items() for b, s in row.items()}


def _parser() -> argparse.ArgumentParser:
    """The command line of this benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--data")
    parser.add_argument("--prototypes", type=Path, help="default: benchmarks/prototypes/ptb_<model>")
    parser.add_argument("--cache", type=Path, help="score-table cache (default: benchmarks/runs/<model>_minibatch)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    parser.add_argument("--quantize-all", action="store_true",
                        help="empty the space's keep_fp, as the search sweep's --quantize-all does")
    parser.add_argument("--threads", type=int, default=1)
    return parser


def main() -> None:
    configure_logging()
    args = _parser().parse_args()
    torch.set_num_threads(args.threads)
    exp = load_config(CONFIGS[args.model])
    if args.quantize_all:
        exp = dataclasses.replace(exp, space={**(exp.space or {}), "keep_fp": []})
    corpus = load_corpus(resolve_data_dir(args.data or exp.data.path), exp.data.corpus_options())
    fp = HERE / "checkpoints" / f"ptb_{args.model}.safetensors"
    prototypes = args.prototypes or HERE / "prototypes" / f"ptb_{args.model}"
    cache = args.cache or HERE / "runs" / f"{args.model}_minibatch"
    out_dir = HERE / "runs" / f"{args.model}_minibatch" / "maps"
    recurrent = exp.model_type == "lstm"
    length = exp.data.bptt if recurrent else exp.data.context
    small_batch = SENTENCE_TOKENS // length  # LSTM: 20 rows of 35; Transformer: 11 windows of 64
    variants = {
        "full": exp,
        "32_sentences": dataclasses.replace(
            exp, search=dataclasses.replace(exp.search, kl_tokens=SENTENCE_TOKENS, hessian_batches=1),
            data=dataclasses.replace(exp.data, batch_size=small_batch)),
    }
    sizes = cluster_sizes(fp)
    rows: list[dict[str, str]] = []
    for strategy in ("kl", "hessian"):
        maps: dict[str, dict[float, PrecisionMap]] = {}
        for name, variant in variants.items():
            maps[name] = {}
            for budget in args.budgets:
                point = Point(strategy, budget)
                maps[name][budget] = search_point(variant, corpus, fp, point, out_dir / name / f"{point.label}.yaml",
                                                  cache_dir=cache, device="cpu", prototypes=prototypes)
        full = maps["full"]
        ref = flat_scores(full[args.budgets[0]])
        for name, variant in variants.items():
            first = maps[name][args.budgets[0]]
            scores = flat_scores(first)
            keys = sorted(ref)
            rho = spearman([ref[k] for k in keys], [scores[k] for k in keys])
            tokens = (variant.search.kl_tokens if strategy == "kl"
                      else variant.search.hessian_batches * variant.data.batch_size * length)
            for budget in args.budgets:
                a, b = full[budget].bits, maps[name][budget].bits
                same = [c for c in a if a[c] == b[c]]
                rows.append({"model": f"ptb_{args.model}", "strategy": strategy, "data": name, "tokens": str(tokens),
                             "score_s": f"{float(first.meta['score_seconds']):.1f}", "budget_bits": f"{budget:g}",
                             "spearman_vs_full": f"{rho:.4f}", "same_clusters": str(len(same)),
                             "clusters": str(len(a)),
                             "same_weight_share": f"{sum(sizes[c] for c in same) / sum(sizes.values()):.4f}"})
    path = HERE / "results" / "sensitivity_minibatch.csv"
    kept = [r for r in csv.DictReader(path.open())] if path.is_file() else []
    kept = [r for r in kept if r["model"] != f"ptb_{args.model}"] + rows
    atomic_write_csv(path, COLUMNS, kept)
    for row in rows:
        print(",".join(row[c] for c in COLUMNS), flush=True)


def cluster_sizes(fp: Path) -> dict[str, int]:
    """Each cluster's number of weights, by name."""
    model = load_model(fp)
    return {name: cluster_weight(model, cluster).numel() for name, cluster in find_clusters(model).items()}


if __name__ == "__main__":
    main()
