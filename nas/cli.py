"""The ``mpnas`` command line: ``train``, ``evaluate`` and ``quickstart``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from nas.config import ConfigError, load_config
from nas.data import DataError, load_corpus, resolve_data_dir


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", help="corpus folder (train/valid/test.txt); default $MPNAS_DATA, "
                        "then a downloaded PTB")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _corpus(args: argparse.Namespace, config_path: str | None):
    exp_data = None
    if config_path is not None:
        exp_data = load_config(config_path).data.path
    return load_corpus(resolve_data_dir(args.data or exp_data))


def cmd_train(args: argparse.Namespace) -> int:
    """Train the FP model of an experiment file."""
    from nas.train import train

    exp = load_config(args.config)
    corpus = load_corpus(resolve_data_dir(args.data or exp.data.path))
    out = Path(args.out or Path("runs") / Path(exp.source).stem)
    metrics = train(exp, corpus, out, device=args.device, resume=args.resume,
                    progress=not args.no_progress, checkpoint_every=args.checkpoint_every)
    print(f"valid ppl {metrics['valid_ppl']:.2f}  test ppl {metrics['test_ppl']:.2f}  "
          f"(best checkpoint: {out / 'best.pt'})")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Perplexity of a checkpoint on the valid and test splits."""
    from evaluators.perplexity import perplexity
    from nas.checkpoint import load_checkpoint
    from search_spaces.models import build_model

    ckpt = load_checkpoint(Path(args.checkpoint))
    if "config" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{args.checkpoint}: not a model checkpoint (expected keys 'model' and 'config')")
    config = dict(ckpt["config"])
    model = build_model(config.pop("type"), **config)
    model.load_state_dict(ckpt["model"])
    corpus = load_corpus(resolve_data_dir(args.data))
    if "vocab" in ckpt and tuple(ckpt["vocab"]) != corpus.vocab.words:
        raise ValueError(f"{args.checkpoint}: its vocabulary differs from the corpus in {corpus.folder}")
    result = {}
    for split in args.splits:
        result[split] = perplexity(model, corpus.split(split), corpus.vocab.eos_id,
                                   batch_size=args.batch_size, device=args.device)
        print(f"{split}: ppl {result[split]['ppl']:.2f} over {int(result[split]['tokens'])} tokens")
    if args.json:
        print(json.dumps(result))
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    """The quick end-to-end run on PTB with ``quick.yaml``."""
    args.config = "quick"
    args.out = args.out or "runs/quickstart"
    args.resume = True
    args.checkpoint_every = 200
    return cmd_train(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpnas", description="Mixed-precision quantization of LMs")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train the FP language model of an experiment file")
    p.add_argument("config", help="experiment YAML (or a packaged name: quick, ptb_lstm, ptb_transformer)")
    p.add_argument("--out", help="run folder (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--checkpoint-every", type=int, default=500, help="also checkpoint every N steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="perplexity of a checkpoint")
    p.add_argument("checkpoint", help="a best.pt written by `mpnas train`")
    p.add_argument("--splits", nargs="+", default=["valid", "test"], choices=["train", "valid", "test"])
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--json", action="store_true", help="also print the numbers as JSON")
    _add_common(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("quickstart", help="quick end-to-end run on PTB (quick.yaml)")
    p.add_argument("--out", help="run folder (default runs/quickstart)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_common(p)
    p.set_defaults(func=cmd_quickstart)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mpnas`` console script."""
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as exc:
        print(f"mpnas: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
