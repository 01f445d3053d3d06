"""WER of rescoring the HyPoradise WSJ 5-best lists with an mpnas LM (dev93 tunes, eval92 tests).

    python benchmarks/wer_rescoring.py --model benchmarks/checkpoints/ptb_lstm.safetensors --name ptb_lstm_fp \\
        --threads 1
    python benchmarks/wer_rescoring.py --model runs/lstm_admm/model.mpq --name ptb_lstm_mp \\
        --vocab benchmarks/checkpoints/ptb_lstm.safetensors \\
        --compare benchmarks/checkpoints/ptb_lstm.safetensors --threads 1 \\
        [--extra runs/lstm_admm/best.pt=ptb_lstm_mp_fakequant]

``--nbest`` defaults to ``../shared/data/nbest/hyporadise/test_wsj_score.json``; the first
503 lists (dev93) tune ``lm_weight`` and ``ins_penalty`` (grids of
:mod:`evaluators.rescore`), the other 333 (eval92) are the test part. Text is normalised
with ``Normalizer(split_hyphens=True)`` for the LM and for WER.

Rows (``dev`` and ``test`` part each) are written to ``benchmarks/results/wer.csv`` with
columns ``model,part,wer,sub,del,ins,ref_words,lm_weight,ins_penalty,hyps_per_s,p_value_vs_fp``:
``NAME`` (the tuned LM), ``asr_1best`` (first hypothesis), ``asr_oracle`` (fewest errors)
and ``asr_no_lm`` (lm_weight 0, ins_penalty tuned), and with ``--compare`` the reference
model as ``COMPARE_NAME``. ``wer`` is in percent. ``p_value_vs_fp`` is the MAPSSWE p-value of
``NAME`` against the ``--compare`` model on that part (the dev part tuned the weights, so
only the test p-value is unbiased). ``hyps_per_s`` counts every hypothesis (repeats
included) over the wall time of LM scoring: compare it only between rows of one run.
Rows of the models written are replaced, the others kept; the file is rewritten atomically.
``--limit N --dev-count K --results /tmp/wer.csv`` tries the script on a slice.
"""

from __future__ import annotations

import argparse
import csv
import io
from pathlib import Path

import torch

from evaluators.nbest import WSJ_DEV93_COUNT, read_hyporadise
from evaluators.normalize import Normalizer
from evaluators.rescore import compare_chosen, evaluate_nbest
from nas.cli.common import load_any_model
from nas.cli.nbest import load_lm
from nas.core.checkpoint import atomic_write_text

HERE = Path(__file__).resolve().parent
DEFAULT_NBEST = HERE.parents[1] / "shared" / "data" / "nbest" / "hyporadise" / "test_wsj_score.json"
COLUMNS = ["model", "part", "wer", "sub", "del", "ins", "ref_words", "lm_weight", "ins_penalty", "hyps_per_s",
           "p_value_vs_fp"]
PARTS = ("dev", "test")


def write_rows(csv_path: Path, rows: list[dict[str, object]]) -> None:
    """Replace every row of the models in ``rows`` in the results CSV (others kept), atomically."""
    names = {row["model"] for row in rows}
    kept = []
    if csv_path.is_file():
        with csv_path.open(newline="") as handle:
            kept = [r for r in csv.DictReader(handle) if r["model"] not in names]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    merged = kept + [{k: row.get(k, "") for k in COLUMNS} for row in rows]
    writer.writerows(sorted(merged, key=lambda r: (str(r["model"]), PARTS.index(str(r["part"])))))
    atomic_write_text(csv_path, buffer.getvalue())


def system_rows(name: str, system: dict[str, object], hyps_per_s: float | None = None,
                p_values: dict[str, float] | None = None) -> list[dict[str, object]]:
    """One CSV row per part for a system dict of :func:`evaluators.rescore.evaluate_nbest`."""
    rows = []
    for part in PARTS:
        summary = system[part]
        rows.append({
            "model": name, "part": part, "wer": f"{summary['wer']:.2f}", "sub": summary["sub"],
            "del": summary["del"], "ins": summary["ins"], "ref_words": summary["ref_words"],
            "lm_weight": "" if system["lm_weight"] is None else f"{system['lm_weight']:g}",
            "ins_penalty": "" if system["ins_penalty"] is None else f"{system['ins_penalty']:g}",
            "hyps_per_s": "" if hyps_per_s is None else f"{hyps_per_s:.0f}",
            "p_value_vs_fp": "" if p_values is None else f"{p_values[part]:.4g}",
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nbest", type=Path, default=DEFAULT_NBEST, help="HyPoradise JSON with scores")
    parser.add_argument("--model", type=Path, required=True, help="best.pt or packed .mpq to evaluate")
    parser.add_argument("--name", help="model column (default: the model's folder name)")
    parser.add_argument("--compare", type=Path, help="reference (FP) model for the MAPSSWE p-value")
    parser.add_argument("--compare-name", default="fp", help="model column of the --compare rows (default fp)")
    parser.add_argument("--extra", action="append", default=[], metavar="PATH=NAME",
                        help="another model scored in the same run (e.g. the packed file of --model), so that "
                             "hyps_per_s compares within one run; repeatable")
    parser.add_argument("--vocab", help="vocabulary for packed files (best.pt with 'vocab' or a word list)")
    parser.add_argument("--dev-count", type=int, default=WSJ_DEV93_COUNT)
    parser.add_argument("--limit", type=int, help="use only the first N lists (a quick try)")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "wer.csv")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lists = read_hyporadise(args.nbest)[: args.limit]
    normalizer = Normalizer(split_hyphens=True)
    options = {"dev_count": args.dev_count, "normalizer": normalizer, "batch_size": args.batch_size,
               "device": args.device}
    name = args.name or (args.model.parent.name if args.model.suffix == ".pt" else args.model.stem)
    model, vocab = load_lm(args.model, load_any_model, args.vocab, args.device)
    result = evaluate_nbest(model, vocab, lists, **options)
    n_dev = result["dev_count"]
    rows = (system_rows("asr_1best", result["one_best"]) + system_rows("asr_oracle", result["oracle"])
            + system_rows("asr_no_lm", result["no_lm"]))
    p_values = None
    if args.compare is not None:
        ref_model, ref_vocab = load_lm(args.compare, load_any_model, args.vocab, args.device)
        reference = evaluate_nbest(ref_model, ref_vocab, lists, **options)
        rows += system_rows(args.compare_name, reference["lm"], reference["hyps_per_s"])
        p_values = {}
        for part, part_slice in (("dev", slice(0, n_dev)), ("test", slice(n_dev, None))):
            p_values[part] = compare_chosen(lists[part_slice], result["lm"]["chosen"][part_slice],
                                            reference["lm"]["chosen"][part_slice], normalizer=normalizer).p_value
    rows += system_rows(name, result["lm"], result["hyps_per_s"], p_values)
    for spec in args.extra:
        path, _, extra_name = spec.partition("=")
        if not extra_name:
            parser.error(f"--extra {spec!r}: expected PATH=NAME")
        extra_model, extra_vocab = load_lm(Path(path), load_any_model, args.vocab, args.device)
        extra = evaluate_nbest(extra_model, extra_vocab, lists, **options)
        extra_p = None
        if args.compare is not None:
            extra_p = {part: compare_chosen(lists[part_slice], extra["lm"]["chosen"][part_slice],
                                            reference["lm"]["chosen"][part_slice], normalizer=normalizer).p_value
                       for part, part_slice in (("dev", slice(0, n_dev)), ("test", slice(n_dev, None)))}
        rows += system_rows(extra_name, extra["lm"], extra["hyps_per_s"], extra_p)
    write_rows(args.results, rows)
    print(f"{len(lists)} lists ({n_dev} dev), {100 * result['unk_rate']:.2f}% <unk> words; wrote {args.results}")
    for row in rows:
        print(",".join(str(row[k]) for k in COLUMNS))


if __name__ == "__main__":
    main()
