"""The ``mpnas`` command line: ``train``, ``retrain``, ``export``, ``evaluate``, ``pipeline``, ``quickstart``, ..."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from pathlib import Path
from typing import Any

from nas.cli.common import is_packed, load_any_model, precision_beside, run_reporting_user_errors
from nas.cli.nbest import add_nbest_arguments
from nas.cli.nni import add_nni_parser
from nas.cli.pipeline import add_pipeline_parser, run_from_args
from nas.cli.report import add_report_parser
from nas.cli.search import add_search_parser, add_space_parser
from nas.config.sections import RETRAIN_METHODS, load_config
from nas.core.console import configure_logging
from nas.core.corpus_report import corpus_summary, describe_vocab_mismatch, format_corpus_summary
from nas.core.data import CorpusOptions, DataError, load_corpus, resolve_data_dir
from nas.core.errors import UsageError
from nas.core.threads import apply_threads
from search_spaces.models import model_from_config, restore_model


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="corpus folder (train/valid/test.txt); default $MPNAS_DATA, "
                        "then a downloaded PTB")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: $MPNAS_THREADS, $OMP_NUM_THREADS, else usable "
                        "cores // $MPNAS_JOBS, the number of jobs sharing this machine, default 1)")


def cmd_train(args: argparse.Namespace) -> int:
    """Train the FP model of an experiment file."""
    from nas.retrain.loop import train

    exp = load_config(args.config)
    corpus = load_corpus(resolve_data_dir(args.data or exp.data.path), exp.data.corpus_options())
    print(format_corpus_summary(corpus_summary(corpus)), flush=True)
    out = Path(args.out or Path("runs") / Path(exp.source).stem)
    metrics = train(exp, corpus, out, device=args.device, resume=args.resume,
                    progress=not args.no_progress, checkpoint_every=args.checkpoint_every)
    print(f"valid ppl {metrics['valid_ppl']:.2f}  test ppl {metrics['test_ppl']:.2f}  "
          f"(best checkpoint: {out / 'best.pt'})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Perplexity (and size) of a checkpoint or a packed file on the valid and test splits."""
    from evaluators.perplexity import perplexity

    path = Path(args.model)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint or packed file")
    if args.nbest:
        from nas.cli.nbest import run_nbest

        return run_nbest(args, functools.partial(load_any_model, keep_packed=args.keep_packed))
    model, size, vocab = load_any_model(path, keep_packed=args.keep_packed)
    corpus = load_corpus(resolve_data_dir(args.data), CorpusOptions(blank_lines=args.blank_lines))
    if vocab is not None and vocab != corpus.vocab.words:
        raise DataError(f"{path}: its vocabulary differs from the corpus in {corpus.folder}: "
                        f"{describe_vocab_mismatch(vocab, corpus.vocab.words)}")
    # a checkpoint's sizes come from the precision map beside it; without one they are FP32 sizes
    packed = is_packed(path)
    map_file = None if packed else precision_beside(path)
    unquantized = map_file is not None and not map_file.is_file()
    result: dict[str, object] = {"size": size,
                                 "precision": "packed file" if packed else None if unquantized else str(map_file)}
    if unquantized:
        print(f"note: no precision map beside {path} ({map_file} is missing): the weights are evaluated as "
              "stored, and the sizes below are those of FP32 (unquantized) weights. For a retrained model, "
              "put its precision.yaml there or evaluate its packed .mpq file.")
    for split in args.splits:
        ppl = perplexity(model, corpus.split(split), corpus.vocab.eos_id, batch_size=args.batch_size,
                         device=args.device)
        result[split] = ppl
        print(f"{split}: ppl {ppl['ppl']:.2f} over {int(ppl['tokens'])} tokens")
    disk = f", on disk {size['packed_bytes'] / 1e6:.3f} MB" if "packed_bytes" in size else ""
    label = "size (FP32, unquantized: no precision map)" if unquantized else "size"
    print(f"{label}: theoretical {size['theoretical_bytes'] / 1e6:.3f} MB{disk}, average bits {size['avg_bits']:.2f}, "
          f"compression {size['compression']:.2f}x vs FP32")
    if args.json:
        print(json.dumps(result))
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    """Quantization-aware retraining (ADMM or STE) of an FP checkpoint at a precision map."""
    from nas.retrain.run import load_fp_checkpoint, resolve_precision, retrain

    exp = load_config(args.config)
    corpus = load_corpus(resolve_data_dir(args.data or exp.data.path), exp.data.corpus_options())
    precision = resolve_precision(args.precision, model_from_config(load_fp_checkpoint(args.checkpoint)["config"]))
    method = args.method or exp.retrain.method
    if args.init:
        exp = dataclasses.replace(exp, retrain=dataclasses.replace(exp.retrain, init=args.init))
    out = Path(args.out or Path("runs") / f"{Path(exp.source).stem}_{method}")
    metrics = retrain(exp, corpus, args.checkpoint, precision, out, method=method, device=args.device,
                      resume=args.resume, progress=not args.no_progress, checkpoint_every=args.checkpoint_every,
                      prototypes=args.prototypes)
    print(f"{method}: valid ppl {metrics['valid_ppl']:.2f}  test ppl {metrics['test_ppl']:.2f}  "
          f"avg bits {metrics['avg_bits']:.2f}  compression {metrics['compression']:.2f}x  ({out / 'best.pt'})")
    return 0


def cmd_prototypes(args: argparse.Namespace) -> int:
    """Retrain one uniform-precision prototype per candidate width (nas/pipeline/prototypes.py); rerun to resume."""
    from nas.pipeline.prototypes import build_prototypes
    from search_spaces.space import DEFAULT_BITS

    exp = load_config(args.config)
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise UsageError(f"--max-steps {args.max_steps}: expected a positive number of steps per epoch")
        # recorded in each prototype's inputs, so a later run without the cap retrains those widths
        exp = dataclasses.replace(exp, retrain=dataclasses.replace(exp.retrain, max_steps_per_epoch=args.max_steps))
    corpus = load_corpus(resolve_data_dir(args.data or exp.data.path), exp.data.corpus_options())
    bits = args.bits or [b for b in (exp.space or {}).get("bits", DEFAULT_BITS) if b < 16]
    out = Path(args.out or Path("runs") / f"{Path(exp.source).stem}_prototypes")
    index = build_prototypes(exp, corpus, args.checkpoint, bits, out, method=args.method, device=args.device,
                             checkpoint_every=args.checkpoint_every, progress=not args.no_progress)
    for b, entry in sorted(index["prototypes"].items(), key=lambda item: int(item[0])):
        print(f"{b}-bit: valid ppl {entry['valid_ppl']:.2f}  test ppl {entry['test_ppl']:.2f}  "
              f"{entry['bytes'] / 1e6:.3f} MB  ({out / entry['file']})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a checkpoint as a packed file at its precision map."""
    from nas.retrain.run import load_fp_checkpoint, resolve_precision
    from search_spaces.packed import export_packed

    ckpt = load_fp_checkpoint(args.checkpoint)
    model = restore_model(ckpt)
    spec = args.precision or str(Path(args.checkpoint).parent / "precision.yaml")
    precision = resolve_precision(spec, model)
    export_packed(model, precision, args.out)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.3f} MB)")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    """The quick end-to-end pipeline on PTB with ``quick.yaml`` (nas/pipeline/runner.py); rerun to resume."""
    out = run_from_args("quick", args, Path("runs") / "quickstart")
    print(f"quickstart done; report: {out / 'report' / 'report.html'}")
    return 0


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """Options of the commands that train (train, retrain)."""
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--checkpoint-every", type=int, default=500, help="also checkpoint every N steps")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_common(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpnas", description="Mixed-precision quantization of LMs")
    sub = parser.add_subparsers(dest="command", required=True)

    _add_training_parsers(sub)
    _add_model_parsers(sub)
    add_space_parser(sub)
    add_search_parser(sub)
    for name in ("space", "search"):
        _add_common(sub.choices[name])
    add_report_parser(sub)

    _add_common(add_pipeline_parser(sub))
    _add_common(add_nni_parser(sub))

    p = sub.add_parser("quickstart", help="quick end-to-end pipeline on PTB (quick.yaml), resumable")
    p.add_argument("--out", help="run folder (default runs/quickstart)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_common(p)
    p.set_defaults(func=cmd_quickstart)
    return parser


def _add_training_parsers(sub: Any) -> None:
    """``mpnas train``, ``retrain`` and ``prototypes``."""
    p = sub.add_parser("train", help="train the FP language model of an experiment file")
    p.add_argument("config", help="experiment YAML (or a packaged name: quick, ptb_lstm, ptb_transformer)")
    p.add_argument("--out", help="run folder (default runs/<config name>)")
    _add_run_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("retrain", help="quantization-aware retraining (ADMM or STE) at a precision map")
    p.add_argument("config", help="experiment YAML (its `retrain` section)")
    p.add_argument("--precision", required=True, help="precision map (.yaml/.json) or uniform:BITS")
    p.add_argument("--checkpoint", required=True, help="the FP best.pt to start from")
    p.add_argument("--method", choices=RETRAIN_METHODS, help="default: retrain.method of the config")
    p.add_argument("--out", help="run folder (default runs/<config>_<method>)")
    p.add_argument("--init", choices=["fp", "inherited"],
                   help="start each cluster from the FP weights or its prototype's (default: retrain.init)")
    p.add_argument("--prototypes", help="prototype folder of `mpnas prototypes` (for --init inherited)")
    _add_run_options(p)
    p.set_defaults(func=cmd_retrain)

    p = sub.add_parser("prototypes", help="retrain one uniform-precision model per candidate width (resumable)")
    p.add_argument("config", help="experiment YAML (its `retrain` section; widths: space.bits)")
    p.add_argument("--checkpoint", required=True, help="the FP checkpoint (best.pt or .safetensors)")
    p.add_argument("--bits", type=int, nargs="+", help="widths (default: the config's space.bits below 16)")
    p.add_argument("--method", choices=RETRAIN_METHODS, help="default: retrain.method of the config")
    p.add_argument("--out", help="prototype folder (default runs/<config>_prototypes)")
    p.add_argument("--max-steps", type=int, help="cap on retraining steps per epoch (e.g. 100 for 4 and 8 bits, "
                   "where retraining recovers little; default: retrain.max_steps_per_epoch)")
    _add_run_options(p)
    p.set_defaults(func=cmd_prototypes)


def _add_model_parsers(sub: Any) -> None:
    """``mpnas export`` and ``evaluate``: work on a checkpoint or a packed file."""
    p = sub.add_parser("export", help="write a (retrained) checkpoint as a bit-packed file")
    p.add_argument("checkpoint", help="best.pt of `mpnas retrain` (or any checkpoint with --precision)")
    p.add_argument("--precision", help="map file or uniform:BITS (default: precision.yaml beside the checkpoint)")
    p.add_argument("--out", required=True, help="packed file to write (e.g. model.mpq)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("evaluate", help="perplexity and size of a checkpoint or packed file")
    p.add_argument("model", help="a best.pt of `mpnas train`/`retrain`, or a packed .mpq file")
    p.add_argument("--splits", nargs="+", default=["valid", "test"], choices=["train", "valid", "test"])
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--blank-lines", choices=["eos", "skip"], default="eos",
                   help="a blank corpus line is one <eos> (default, as the LM benchmarks count) or no token")
    p.add_argument("--json", action="store_true", help="also print the numbers as JSON")
    p.add_argument("--keep-packed", action="store_true",
                   help="run a packed .mpq file from its packed low-bit weights (a fraction of the memory, same "
                        "logits; ignored for checkpoints)")
    add_nbest_arguments(p)
    _add_common(p)
    p.set_defaults(func=cmd_evaluate)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mpnas`` console script."""
    args = build_parser().parse_args(argv)
    configure_logging()

    def run() -> int:
        if hasattr(args, "threads") and args.command != "nni":  # nni: threads per trial (cores // concurrency)
            apply_threads(args.threads)
        return args.func(args)

    return run_reporting_user_errors(run)


if __name__ == "__main__":
    sys.exit(main())
