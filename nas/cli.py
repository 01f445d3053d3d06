"""The ``mpnas`` command line: ``train``, ``retrain``, ``export``, ``evaluate``, ``pipeline``, ``quickstart``, ..."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from nas.config import ConfigError, load_config
from nas.console import configure_logging
from nas.data import (
    CorpusOptions,
    DataError,
    describe_vocab_mismatch,
    format_corpus_summary,
    load_corpus,
    resolve_data_dir,
)
from nas.errors import MpnasError, UsageError
from nas.nbest_cli import add_nbest_arguments
from nas.nni_launcher import add_nni_parser
from nas.pipeline import add_pipeline_parser, run_from_args
from nas.report_cli import add_report_parser
from nas.search_cli import add_search_parser, add_space_parser
from nas.threads import apply_threads
from search_spaces.space import SpaceError


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="corpus folder (train/valid/test.txt); default $MPNAS_DATA, "
                        "then a downloaded PTB")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: $MPNAS_THREADS, $OMP_NUM_THREADS, else usable "
                        "cores // $MPNAS_JOBS, the number of jobs sharing this machine, default 1)")


def cmd_train(args: argparse.Namespace) -> int:
    """Train the FP model of an experiment file."""
    from nas.train import train

    exp = load_config(args.config)
    corpus = load_corpus(resolve_data_dir(args.data or exp.data.path), exp.data.corpus_options())
    print(format_corpus_summary(corpus.summary()), flush=True)
    out = Path(args.out or Path("runs") / Path(exp.source).stem)
    metrics = train(exp, corpus, out, device=args.device, resume=args.resume,
                    progress=not args.no_progress, checkpoint_every=args.checkpoint_every)
    print(f"valid ppl {metrics['valid_ppl']:.2f}  test ppl {metrics['test_ppl']:.2f}  "
          f"(best checkpoint: {out / 'best.pt'})")
    return 0


def _is_packed(path: Path) -> bool:
    from search_spaces.packed import MAGIC

    with path.open("rb") as handle:
        return handle.read(len(MAGIC)) == MAGIC


def _precision_beside(checkpoint: Path) -> Path:
    """The precision map of a checkpoint: ``precision.yaml`` in its folder (as ``mpnas retrain`` writes it)."""
    return checkpoint.parent / "precision.yaml"


def _load_any_model(path: Path, keep_packed: bool = False
                    ) -> tuple[torch.nn.Module, dict[str, float], tuple[str, ...] | None]:
    """A model from a packed file (its weights kept packed with ``keep_packed``) or a checkpoint, with its
    size numbers and vocabulary."""
    from evaluators.size import model_size
    from nas.retrain import load_fp_checkpoint
    from search_spaces.models import build_model
    from search_spaces.packed import load_packed
    from search_spaces.precision import PrecisionMap

    if _is_packed(path):
        model, precision = load_packed(path, keep_packed=keep_packed)
        if keep_packed:
            from search_spaces.packed_runtime import packed_model_size

            size = {**packed_model_size(path), "packed_bytes": float(path.stat().st_size)}
        else:
            size = {**model_size(model, precision), "packed_bytes": float(path.stat().st_size)}
        return model, size, None
    ckpt = load_fp_checkpoint(path)
    config = dict(ckpt["config"])
    model = build_model(config.pop("type"), **config)
    model.load_state_dict(ckpt["model"])
    precision_file = _precision_beside(path)
    precision = PrecisionMap.load(precision_file) if precision_file.is_file() else PrecisionMap.uniform(model, 32)
    vocab = tuple(ckpt["vocab"]) if "vocab" in ckpt else None
    return model, model_size(model, precision), vocab


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Perplexity (and size) of a checkpoint or a packed file on the valid and test splits."""
    from evaluators.perplexity import perplexity

    path = Path(args.model)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint or packed file")
    if args.nbest:
        from nas.nbest_cli import run_nbest

        return run_nbest(args, functools.partial(_load_any_model, keep_packed=args.keep_packed))
    model, size, vocab = _load_any_model(path, keep_packed=args.keep_packed)
    corpus = load_corpus(resolve_data_dir(args.data), CorpusOptions(blank_lines=args.blank_lines))
    if vocab is not None and vocab != corpus.vocab.words:
        raise DataError(f"{path}: its vocabulary differs from the corpus in {corpus.folder}: "
                        f"{describe_vocab_mismatch(vocab, corpus.vocab.words)}")
    # a checkpoint's sizes come from the precision map beside it; without one they are FP32 sizes
    packed = _is_packed(path)
    map_file = None if packed else _precision_beside(path)
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
    from nas.retrain import load_fp_checkpoint, resolve_precision, retrain
    from search_spaces.models import build_model

    exp = load_config(args.config)
    corpus = load_corpus(resolve_data_dir(args.data or exp.data.path), exp.data.corpus_options())
    config = dict(load_fp_checkpoint(args.checkpoint)["config"])
    precision = resolve_precision(args.precision, build_model(config.pop("type"), **config))
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
    """Retrain one uniform-precision prototype per candidate width (nas/prototypes.py); rerun to resume."""
    from nas.prototypes import build_prototypes
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
    from nas.retrain import load_fp_checkpoint, resolve_precision
    from search_spaces.models import build_model
    from search_spaces.packed import export_packed

    ckpt = load_fp_checkpoint(args.checkpoint)
    config = dict(ckpt["config"])
    model = build_model(config.pop("type"), **config)
    model.load_state_dict(ckpt["model"])
    spec = args.precision or str(Path(args.checkpoint).parent / "precision.yaml")
    precision = resolve_precision(spec, model)
    export_packed(model, precision, args.out)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.3f} MB)")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    """The quick end-to-end pipeline on PTB with ``quick.yaml`` (nas/pipeline.py); rerun to resume."""
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

    p = sub.add_parser("train", help="train the FP language model of an experiment file")
    p.add_argument("config", help="experiment YAML (or a packaged name: quick, ptb_lstm, ptb_transformer)")
    p.add_argument("--out", help="run folder (default runs/<config name>)")
    _add_run_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("retrain", help="quantization-aware retraining (ADMM or STE) at a precision map")
    p.add_argument("config", help="experiment YAML (its `retrain` section)")
    p.add_argument("--precision", required=True, help="precision map (.yaml/.json) or uniform:BITS")
    p.add_argument("--checkpoint", required=True, help="the FP best.pt to start from")
    p.add_argument("--method", choices=["admm", "ste"], help="default: retrain.method of the config")
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
    p.add_argument("--method", choices=["admm", "ste"], help="default: retrain.method of the config")
    p.add_argument("--out", help="prototype folder (default runs/<config>_prototypes)")
    p.add_argument("--max-steps", type=int, help="cap on retraining steps per epoch (e.g. 100 for 4 and 8 bits, "
                   "where retraining recovers little; default: retrain.max_steps_per_epoch)")
    _add_run_options(p)
    p.set_defaults(func=cmd_prototypes)

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


# What ``mpnas`` reports as ``mpnas: error: <message>`` with exit status 2: the user's own mistakes
# (nas.errors.MpnasError and its subclasses: DataError, CheckpointError, UsageError, PackedFileError,
# PrecisionMapError, PrototypeError, NBestError, TrainingDivergedError, ...), a missing file, a
# file that is not UTF-8 text (mpnas decodes only the files it is given), a config or a search
# space that does not validate. Any other exception is a bug: it propagates with its traceback.
USER_ERRORS: tuple[type[Exception], ...] = (MpnasError, FileNotFoundError, UnicodeDecodeError, ConfigError,
                                           SpaceError)


def run_reporting_user_errors(func: Callable[[], int]) -> int:
    """``func()``; a user error (:data:`USER_ERRORS`) prints ``mpnas: error: ...`` and returns 2."""
    try:
        return func()
    except USER_ERRORS as exc:
        print(f"mpnas: error: {exc}", file=sys.stderr)
        return 2


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
