"""``mpnas evaluate MODEL --nbest FILE``: WER of n-best rescoring with the model as the LM.

``nas/cli/main.py`` wires this in: :func:`add_nbest_arguments` on the ``evaluate`` parser and,
when ``--nbest`` is given, :func:`run_nbest` with its ``load_any_model``. The module also
runs alone with the same arguments::

    python -m nas.cli.nbest runs/quick/best.pt --nbest ../shared/data/nbest/hyporadise/test_wsj_score.json \\
        --dev-count 503 [--compare other/best.pt] [--vocab best.pt|words.txt] [--json]

Text is normalised with ``Normalizer(split_hyphens=True)`` (lowercase, ``$ , . ! ? ; : "``
removed, ``eighty-six`` -> ``eighty six``) both for the LM and for WER. Rescoring, tuning
and tie-breaking are described in :mod:`evaluators.rescore`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from evaluators.nbest import WSJ_DEV93_COUNT, NBestList, read_hyporadise, read_jsonl, read_kaldi_nbest
from evaluators.normalize import Normalizer
from evaluators.rescore import (
    DEFAULT_INS_PENALTIES,
    DEFAULT_LM_WEIGHTS,
    DEFAULT_OLD_LM_WEIGHT,
    DEFAULT_RANK_WEIGHT,
    compare_chosen,
    evaluate_nbest,
    jsonable,
)
from nas.cli.common import load_any_model, run_reporting_user_errors
from nas.core.checkpoint import load_checkpoint
from nas.core.console import configure_logging
from nas.core.data import EOS, DataError, Vocabulary
from nas.core.errors import CheckpointError, MpnasError, UsageError
from nas.core.reference import is_reference
from nas.core.threads import apply_threads

FORMATS = ("hyporadise", "kaldi", "jsonl")
LoadModel = Callable[[Path], tuple[nn.Module, dict[str, float], Sequence[str] | None]]
ALPHA = 0.05
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive


def _floats(values: Sequence[str], option: str) -> list[float]:
    """``['0', '0.1,0.2']`` -> ``[0.0, 0.1, 0.2]``: space- and comma-separated grids both work."""
    out = []
    for value in values:
        for part in value.split(","):
            if part.strip():
                try:
                    out.append(float(part))
                except ValueError:
                    raise UsageError(f"{option}: expected numbers, got {part!r}") from None
    if not out:
        raise UsageError(f"{option}: empty grid")
    return out


def add_nbest_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the n-best rescoring options (``--nbest`` switches them on) to ``parser``."""
    g = parser.add_argument_group("n-best rescoring (WER)")
    g.add_argument("--nbest", metavar="FILE", help="n-best lists to rescore: report WER instead of perplexity")
    g.add_argument("--nbest-format", choices=FORMATS,
                   help="default: .jsonl -> jsonl; a JSON array -> hyporadise; otherwise kaldi text")
    g.add_argument("--kaldi-acscore", metavar="FILE", help="kaldi format: acoustic costs (UTTID-N cost)")
    g.add_argument("--kaldi-lmscore", metavar="FILE", help="kaldi format: first-pass LM costs (UTTID-N cost)")
    g.add_argument("--kaldi-ref", metavar="FILE", help="kaldi format: references (UTTID word ...)")
    g.add_argument("--compare", metavar="MODEL2", help="second LM; MAPSSWE test between the two on the test part")
    g.add_argument("--dev-count", type=int, metavar="N",
                   help=f"first N lists tune the weights, the rest are test (default: {WSJ_DEV93_COUNT} for "
                        "the 836-list HyPoradise WSJ file, else half)")
    g.add_argument("--vocab", metavar="CHECKPOINT_OR_TXT",
                   help="vocabulary for packed files: a best.pt holding 'vocab' or a text file, one word a line")
    g.add_argument("--lm-weights", nargs="+", metavar="W", help="LM weight grid (numbers, spaces or commas)")
    g.add_argument("--ins-penalties", nargs="+", metavar="P",
                   help="insertion penalty grid (e.g. --ins-penalties -1 0 1 or --ins-penalties=-1,0,1)")
    g.add_argument("--rank-weight", type=float, default=DEFAULT_RANK_WEIGHT,
                   help="rank prior for lists without scores: asr = -W * rank (default 1)")
    g.add_argument("--old-lm-weight", type=float, default=DEFAULT_OLD_LM_WEIGHT,
                   help="kaldi lists: asr = -(acscore + W * lmscore) (default 1)")
    g.add_argument("--nbest-batch-size", type=int, default=64, help="sentences per LM batch (default 64)")


def detect_format(path: Path) -> str:
    """Guess the n-best format: ``.jsonl`` suffix, then the first non-blank character."""
    if path.suffix == ".jsonl":
        return "jsonl"
    with path.open("rb") as handle:
        head = handle.read(4096).lstrip()
    if head.startswith(b"["):
        return "hyporadise"
    if head.startswith(b"{"):
        return "jsonl"
    return "kaldi"


def read_nbest(path: Path, fmt: str | None = None, *, acscore: str | None = None, lmscore: str | None = None,
               ref: str | None = None) -> tuple[list[NBestList], str]:
    """Read ``path`` in ``fmt`` (detected when None); returns the lists and the format used."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such n-best file")
    fmt = fmt or detect_format(path)
    if fmt != "kaldi" and (acscore or lmscore or ref):
        raise UsageError(f"{path}: --kaldi-acscore/--kaldi-lmscore/--kaldi-ref need the kaldi format, not {fmt}")
    if fmt == "hyporadise":
        lists = read_hyporadise(path)
    elif fmt == "jsonl":
        lists = read_jsonl(path)
    elif fmt == "kaldi":
        lists = read_kaldi_nbest(path, acscore, lmscore, ref)
    else:
        raise UsageError(f"{path}: unknown n-best format {fmt!r}; expected one of {FORMATS}")
    if not lists:
        raise MpnasError(f"{path}: no n-best lists in the file")
    missing = [nb.utt_id for nb in lists if nb.reference is None]
    if missing:
        hint = " (give --kaldi-ref)" if fmt == "kaldi" else ""
        raise MpnasError(f"{path}: {len(missing)} lists have no reference, e.g. '{missing[0]}'; WER needs them{hint}")
    return lists, fmt


def load_vocabulary(path: Path) -> Vocabulary:
    """A vocabulary from a checkpoint holding ``vocab`` or a text file with one word per line."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such vocabulary file")
    with path.open("rb") as handle:
        is_checkpoint = handle.read(len(_ZIP_MAGIC)) == _ZIP_MAGIC or is_reference(path)
    if is_checkpoint:
        ckpt = load_checkpoint(path)
        if "vocab" not in ckpt:
            raise CheckpointError(f"{path}: checkpoint stores no 'vocab'; use the best.pt of `mpnas train` "
                                  "or a word list")
        words = tuple(ckpt["vocab"])
    else:
        try:
            lines = path.read_text(encoding="utf-8").split("\n")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not a UTF-8 word list ({exc.reason})") from None
        seen: dict[str, int] = {}
        for lineno, line in enumerate(lines, start=1):
            word = line.strip()
            if not word:
                continue
            if len(word.split()) != 1:
                raise DataError(f"{path}: line {lineno}: expected one word, got {word!r}")
            if word in seen:
                raise DataError(f"{path}: line {lineno}: duplicate word {word!r} (first on line {seen[word]})")
            seen[word] = lineno
        words = tuple(seen)
    if EOS not in words:
        raise DataError(f"{path}: vocabulary has no {EOS}")
    return Vocabulary(words)


def load_lm(path: Path, load_model: LoadModel, vocab_source: str | None, device: str) -> tuple[nn.Module, Vocabulary]:
    """The model at ``path`` (via ``load_model``) and its vocabulary: stored, else from ``vocab_source``."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint or packed file")
    model, _, stored = load_model(path)
    given = load_vocabulary(Path(vocab_source)) if vocab_source else None
    if stored is not None and given is not None and tuple(stored) != given.words:
        raise CheckpointError(f"{path}: its stored vocabulary differs from --vocab {vocab_source}")
    if stored is None and given is None:
        raise CheckpointError(f"{path}: stores no vocabulary (packed files do not); pass --vocab with the "
                              "training best.pt or a word list, one word per line")
    vocab = Vocabulary(tuple(stored)) if stored is not None else given
    assert vocab is not None
    size = getattr(getattr(model, "config", None), "vocab_size", len(vocab))
    if size != len(vocab):
        raise CheckpointError(f"{path}: the model has {size} output words but its vocabulary "
                              f"({vocab_source or 'stored'}) has {len(vocab)}")
    return model.to(device), vocab


def _device(name: str | None) -> str:
    if name in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _pct(part: dict[str, float]) -> str:
    return f"{part['wer']:6.2f}% ({part['sub']}/{part['del']}/{part['ins']})"


def _print_result(name: str, result: dict[str, object], baselines: bool) -> None:
    print(f"LM {name}: {result['hyps']} hypotheses ({result['unique_hyps']} distinct) scored in "
          f"{result['lm_seconds']:.2f} s = {result['hyps_per_s']:.0f} hyps/s; "
          f"{100 * result['unk_rate']:.2f}% of their words are <unk>")
    print(f"  {'system':<34} {'dev WER (S/D/I)':<24} {'test WER (S/D/I)':<24}")
    rows = [("1-best", "one_best"), ("oracle", "oracle")] if baselines else []
    rows += [("no LM", "no_lm"), ("LM", "lm")]
    for label, key in rows:
        system = result[key]
        if system["lm_weight"] is not None:
            label = f"{label} (lm_weight {system['lm_weight']:g}, ins {system['ins_penalty']:g})"
        print(f"  {label:<34} {_pct(system['dev']):<24} {_pct(system['test']):<24}")


def run_nbest(args: argparse.Namespace, load_model: LoadModel) -> int:
    """Rescore ``args.nbest`` with ``args.model`` (and ``args.compare``); print WER and MAPSSWE."""
    nbest = Path(args.nbest)
    lists, fmt = read_nbest(nbest, args.nbest_format, acscore=args.kaldi_acscore, lmscore=args.kaldi_lmscore,
                            ref=args.kaldi_ref)
    dev_count = args.dev_count
    if dev_count is None and fmt == "hyporadise" and len(lists) == WSJ_DEV93_COUNT + 333:
        dev_count = WSJ_DEV93_COUNT  # dev93 then eval92 (see evaluators.nbest)
    if dev_count is not None and not 0 <= dev_count <= len(lists):
        raise UsageError(f"{nbest}: --dev-count {dev_count} is outside [0, {len(lists)}] lists")
    device = _device(getattr(args, "device", None))
    normalizer = Normalizer(split_hyphens=True)
    options = {
        "dev_count": dev_count, "dev_fraction": 0.5, "normalizer": normalizer,
        "lm_weights": _floats(args.lm_weights, "--lm-weights") if args.lm_weights else DEFAULT_LM_WEIGHTS,
        "ins_penalties": (_floats(args.ins_penalties, "--ins-penalties") if args.ins_penalties
                          else DEFAULT_INS_PENALTIES),
        "rank_weight": args.rank_weight, "old_lm_weight": args.old_lm_weight,
        "batch_size": args.nbest_batch_size, "device": device,
    }
    names = [args.model] + ([args.compare] if args.compare else [])
    results = []
    for name in names:
        model, vocab = load_lm(Path(name), load_model, args.vocab, device)
        results.append(evaluate_nbest(model, vocab, lists, **options))
    n_dev = results[0]["dev_count"]
    print(f"n-best {nbest} ({fmt}): {len(lists)} lists, dev {n_dev}, test {len(lists) - n_dev}")
    for k, (name, result) in enumerate(zip(names, results, strict=True)):
        _print_result(name, result, baselines=k == 0)
    output: dict[str, object] = {"nbest": str(nbest), "format": fmt, "models": {
        name: jsonable(result) for name, result in zip(names, results, strict=True)}}
    if args.compare:
        test = lists[n_dev:]
        verdict = compare_chosen(test, results[0]["lm"]["chosen"][n_dev:], results[1]["lm"]["chosen"][n_dev:],
                                 normalizer=normalizer, alpha=ALPHA)
        winner = {"A": args.model, "B": args.compare}.get(verdict.winner or "", "neither")
        print(f"MAPSSWE on the test part (A = {args.model}, B = {args.compare}): {verdict.n_segments} segments, "
              f"W = {verdict.statistic:.3f}, p-value = {verdict.p_value:.4g}: "
              f"{'significant' if verdict.significant else 'not significant'} at alpha {ALPHA}; winner: {winner}")
        output["mapsswe"] = {"a": args.model, "b": args.compare, "part": "test", "segments": verdict.n_segments,
                             "mean_diff": verdict.mean_diff, "statistic": verdict.statistic,
                             "p_value": verdict.p_value, "alpha": ALPHA, "significant": verdict.significant,
                             "winner": None if verdict.winner is None else winner}
    if getattr(args, "json", False):
        print(json.dumps(output))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """A stand-alone parser shaped like ``mpnas evaluate`` with the n-best options (``--nbest`` required)."""
    parser = argparse.ArgumentParser(prog="python -m nas.cli.nbest", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a best.pt of `mpnas train`/`retrain`, or a packed .mpq file")
    parser.add_argument("--json", action="store_true", help="also print the numbers as JSON")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: the rule of nas.core.threads; see README)")
    add_nbest_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point; errors print ``mpnas: error: ...`` and return 2 as ``mpnas`` does."""
    args = build_parser().parse_args(argv)
    if not args.nbest:
        print("mpnas: error: --nbest FILE is required", file=sys.stderr)
        return 2
    configure_logging()

    def run() -> int:
        apply_threads(args.threads)
        return run_nbest(args, load_any_model)

    return run_reporting_user_errors(run)


if __name__ == "__main__":
    sys.exit(main())
