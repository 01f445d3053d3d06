"""Export an FP baseline run as a committed reference checkpoint (weights-only .safetensors).

    python benchmarks/export_reference.py --model lstm --out benchmarks/checkpoints/ptb_lstm.safetensors
    python benchmarks/export_reference.py --model transformer --out benchmarks/checkpoints/ptb_transformer.safetensors

Reads ``best.pt`` and ``metrics.json`` of the run folder of ``benchmarks/fp_baselines.py``
(default ``benchmarks/checkpoints/<model>/``); the valid/test perplexities are those of
``metrics.json`` (measured at the end of training, not re-evaluated here). The metadata
records the training command (``--train-command``; by default the fp_baselines.py command,
with ``--epochs N`` when the run stopped before the packaged recipe's epochs), the git
revision (``--revision``; default ``git rev-parse HEAD``, ``-dirty`` when tracked files
differ from it) and, as a cheap check of a loaded file, the perplexity on the first
``--slice-tokens`` tokens of the valid split, evaluated as ``mpnas train`` evaluates.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
from pathlib import Path
from typing import Any

import torch

from evaluators.perplexity import perplexity
from nas.config.sections import load_config
from nas.core.checkpoint import load_checkpoint
from nas.core.data import load_corpus, resolve_data_dir
from nas.core.reference import load_reference, save_reference
from nas.retrain.run import load_fp_checkpoint
from search_spaces.models import restore_model

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CONFIGS = {"lstm": "ptb_lstm", "transformer": "ptb_transformer"}
SLICE_TOKENS = 4000

logger = logging.getLogger("export_reference")


def git_revision(repo: Path = REPO) -> str:
    """``git rev-parse HEAD`` of ``repo``, with ``-dirty`` when tracked files differ from it."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, check=True, capture_output=True,
                          text=True).stdout.strip()
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, check=True,
                            capture_output=True, text=True).stdout.strip()
    return f"{head}-dirty" if status else head


def display_path(path: Path) -> str:
    """``path`` relative to the repository when inside it (no machine-specific prefix in the file)."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def default_train_command(model: str, epochs: int | None) -> str:
    """The fp_baselines.py command line of ``model``; ``--epochs`` only when it differs from the recipe."""
    command = f"python benchmarks/fp_baselines.py --model {model} --threads 1"
    if epochs is not None and epochs != load_config(CONFIGS[model]).train.epochs:
        command += f" --epochs {epochs}"
    return command


def slice_eval_settings(model: str) -> dict[str, int]:
    """The perplexity arguments of ``mpnas train``'s evaluation for the packaged config of ``model``."""
    data = load_config(CONFIGS[model]).data
    return {"batch_size": data.eval_batch_size, "bptt": data.bptt, "stride": data.eval_stride}


def slice_ppl(ckpt: dict[str, Any], tokens: torch.Tensor, start_token: int, settings: dict[str, int]) -> float:
    """Perplexity of the checkpoint's model on ``tokens`` with the given evaluation settings."""
    net = restore_model(ckpt)
    return perplexity(net, tokens, start_token, device="cpu", **settings)["ppl"]


def main(argv: list[str] | None = None) -> int:
    """Export one run folder; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--run", type=Path, help="run folder with best.pt and metrics.json "
                                                 "(default benchmarks/checkpoints/<model>)")
    parser.add_argument("--data", help="PTB folder (default $MPNAS_DATA)")
    parser.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    parser.add_argument("--train-command", help="command line that trained the run (default: the "
                                                "fp_baselines.py command, --epochs from metrics.json)")
    parser.add_argument("--revision", help="git revision to record (default: git rev-parse HEAD)")
    parser.add_argument("--slice-tokens", type=int, default=SLICE_TOKENS,
                        help="valid tokens of the recorded slice perplexity (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)

    run = args.run or HERE / "checkpoints" / args.model
    metrics = json.loads((run / "metrics.json").read_text(encoding="utf-8"))
    for key in ("valid_ppl", "test_ppl"):
        if key not in metrics:
            parser.error(f"{run / 'metrics.json'} has no {key!r}: has the run finished?")
    corpus = load_corpus(resolve_data_dir(args.data))
    ckpt = load_fp_checkpoint(run / "best.pt", corpus)
    if ckpt["config"]["type"] != args.model:
        parser.error(f"{run / 'best.pt'} holds a {ckpt['config']['type']} model, not --model {args.model}")

    settings = slice_eval_settings(args.model)
    tokens = corpus.valid[: args.slice_tokens]
    ppl = slice_ppl(ckpt, tokens, corpus.vocab.eos_id, settings)
    command = args.train_command or default_train_command(args.model, metrics.get("epochs"))
    out = save_reference(args.out, ckpt, valid_ppl=metrics["valid_ppl"], test_ppl=metrics["test_ppl"],
                         command=command, revision=args.revision or git_revision(),
                         extra={"valid_slice_tokens": int(tokens.numel()), "valid_slice_ppl": ppl,
                                "valid_slice_eval": settings, "source": display_path(run / "best.pt")})

    # Read the file back: same weights, same slice perplexity.
    loaded = load_checkpoint(out)
    for name, tensor in ckpt["model"].items():
        if not torch.equal(loaded["model"][name], tensor):
            raise SystemExit(f"{out}: tensor {name} differs from {run / 'best.pt'} after the round trip")
    again = slice_ppl(load_reference(out), tokens, corpus.vocab.eos_id, settings)
    logger.info("%s: valid %.2f  test %.2f  (epoch %s)  slice of %d valid tokens: %.4f (reloaded %.4f)  %s",
                out, metrics["valid_ppl"], metrics["test_ppl"], ckpt.get("epoch"), tokens.numel(), ppl, again,
                command)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
