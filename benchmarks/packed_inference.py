"""Rescoring straight from packed low-bit weights: resident memory and throughput vs the FP32 model.

    OMP_NUM_THREADS=1 python benchmarks/packed_inference.py --threads 1 [--bits 2] [--profile]

For each PTB model (``ptb_lstm``, ``ptb_transformer``) and each ``--bits`` prototype
(``benchmarks/prototypes/ptb_<model>/<bits>bit.mpq``):

- **memory**, each in a fresh subprocess: ``VmHWM`` (peak resident set, /proc/self/status) after
  loading, minus ``VmHWM`` after the imports (the interpreter's and torch's own baseline; the peak
  is reset there through /proc/self/clear_refs when the kernel allows). ``weights_rss_bytes``:
  ``load_packed(path, keep_packed=True)``; ``fp_weights_rss_bytes``: the FP32 reference
  checkpoint loaded into a ``meta`` skeleton with ``assign=True`` (one float32 copy of the weights,
  plus its stored vocabulary); ``unpacked`` in the log: today's ``load_packed(path)``.
- **throughput**, in this process: the packed model and the FP32 reference alternately score
  every hypothesis of the WSJ n-best lists (``score_sentences``, batch 64) and compute the PTB
  test perplexity (the evaluators' defaults); the fastest of ``--repeats`` runs of each counts.
  ``throughput_ratio`` = FP seconds / packed seconds over both tasks (>1: packed is faster).
- a check that the packed model's n-best scores equal the unpacked 2-bit model's on a slice.
- ``--profile``: cProfile of one packed PTB pass, split into unpacking and matmul time.

Rows go to ``benchmarks/results/packed_inference.csv`` with columns
``model,avg_bits,file_bytes,weights_rss_bytes,fp_weights_rss_bytes,throughput_ratio``.
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import ctypes
import io
import json
import logging
import pstats
import subprocess
import sys
import time
from pathlib import Path

import torch

from evaluators.nbest import read_hyporadise
from evaluators.normalize import Normalizer
from evaluators.perplexity import perplexity
from evaluators.rescore import score_sentences
from nas.core.atomic import atomic_write_text
from nas.core.checkpoint import load_checkpoint
from nas.core.data import load_corpus
from search_spaces.models import build_model
from search_spaces.packed import load_packed
from search_spaces.packed_format import read_packed_header
from search_spaces.packed_runtime import packed_model_size, packed_tensors

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data"
COLUMNS = ["model", "avg_bits", "file_bytes", "weights_rss_bytes", "fp_weights_rss_bytes", "throughput_ratio"]
logger = logging.getLogger("packed_inference")


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmHWM, VmRSS)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak may then hide reused heap pages
        logger.warning("malloc_trim unavailable")


def _touch(model: torch.nn.Module) -> None:
    """Read every weight byte once: memory-mapped or lazily loaded tensors count only when resident."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [piece.data for packed in packed_tensors(model) for piece in packed.pieces]
    for tensor in tensors:
        if tensor.numel():
            tensor.max()  # not sum(): an integer sum first copies the tensor as int64


def _warm_up(folder: Path) -> None:
    """Run every code path of a load on tiny models, so that torch's lazy imports and kernel set-up
    (about 70 MB the first time a model is built on ``meta``) fall in the baseline, not in the weights."""
    import safetensors.torch  # noqa: F401 - imported lazily by load_checkpoint

    from search_spaces.packed import export_packed
    from search_spaces.precision import PrecisionMap

    for kind, spec in (("lstm", {"embed_dim": 8, "hidden_dim": 8}), ("transformer", {"d_model": 8, "d_ff": 8})):
        tiny = build_model(kind, vocab_size=16, num_layers=1, **spec)
        export_packed(tiny, PrecisionMap.uniform(tiny, 2), folder / "tiny.mpq")
        with torch.device("meta"):
            build_model(kind, vocab_size=16, num_layers=1, **spec)
        for keep in (True, False):
            model = load_packed(folder / "tiny.mpq", keep_packed=keep)[0]
            _touch(model)
            with torch.no_grad():
                model(torch.zeros(1, 4, dtype=torch.long))


def measure(kind: str, path: Path, skeleton_from: Path) -> dict[str, int]:
    """Peak resident bytes of a load (run in a fresh process: ``--measure KIND PATH SKELETON_MPQ``).

    ``packed`` and ``fp`` load into a ``meta`` skeleton built (from ``skeleton_from``'s header) before
    the weights' baseline: ``weights_rss_bytes`` counts the weights and what replaces the skeleton's
    modules, ``skeleton_rss_bytes`` the module objects themselves (the same for both). ``unpacked`` is
    today's ``load_packed(path)`` as a whole (it builds its own float32 model).
    """
    import gc
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        _warm_up(Path(folder))
    config = dict(read_packed_header(skeleton_from)[0]["model"])
    gc.collect()
    _trim()  # freed heap pages go back to the OS, so the load's pages count when it touches them
    reset = _reset_peak()
    start = _status("VmHWM")
    skeleton = None
    if kind != "unpacked":
        with torch.device("meta"):  # module objects only, no weights
            skeleton = build_model(config.pop("type"), **config)
    base = _status("VmHWM")
    if kind == "packed":
        model, _ = load_packed(path, model=skeleton, keep_packed=True)
    elif kind == "unpacked":
        model, _ = load_packed(path)
    else:
        ckpt = load_checkpoint(path)
        skeleton.load_state_dict(ckpt["model"], assign=True)
        model = skeleton
        del ckpt
    _touch(model)
    peak = _status("VmHWM")
    return {"weights_rss_bytes": peak - base, "skeleton_rss_bytes": base - start,
            "rss_after_bytes": _status("VmRSS") - base, "peak_reset": int(reset)}


def measure_in_subprocess(kind: str, path: Path, skeleton_from: Path) -> dict[str, int]:
    """:func:`measure` in a fresh interpreter with the same imports."""
    out = subprocess.run([sys.executable, __file__, "--measure", kind, str(path), str(skeleton_from)], check=True,
                         capture_output=True, text=True,
                         env={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent), "PATH": "/usr/bin:/bin"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fp_model(path: Path) -> tuple[torch.nn.Module, tuple[str, ...]]:
    ckpt = load_checkpoint(path)
    config = dict(ckpt["config"])
    model = build_model(config.pop("type"), **config)
    model.load_state_dict(ckpt["model"])
    return model.eval(), tuple(ckpt["vocab"])


def _workloads(args: argparse.Namespace) -> tuple[list[list[str]], torch.Tensor, int]:
    lists = read_hyporadise(args.nbest)[: args.limit]
    normalize = Normalizer(split_hyphens=True)
    sentences = [normalize(h) for nb in lists for h in nb.hypotheses]
    corpus = load_corpus(args.ptb)
    tokens = corpus.split("test")[: args.ptb_tokens]
    return sentences, tokens, corpus.vocab.eos_id


def _run(model: torch.nn.Module, vocab: tuple[str, ...], sentences: list[list[str]], tokens: torch.Tensor,
         eos: int) -> tuple[float, float, float]:
    """Seconds of the n-best scoring and of the PTB perplexity, and the perplexity."""
    start = time.perf_counter()
    with torch.no_grad():
        score_sentences(model, sentences, vocab, batch_size=64)
        middle = time.perf_counter()
        ppl = perplexity(model, tokens, eos)["ppl"]
    return middle - start, time.perf_counter() - middle, ppl


def profile_packed(model: torch.nn.Module, tokens: torch.Tensor, eos: int) -> str:
    """cProfile of one packed PTB pass: top functions by own time, and unpacking vs matmul seconds."""
    profiler = cProfile.Profile()
    with torch.no_grad():
        profiler.runcall(perplexity, model, tokens, eos)
    stats = pstats.Stats(profiler)
    unpack = sum(v[3] for k, v in stats.stats.items() if k[2] in ("dequantize", "gather")
                 and k[0].endswith("tensor.py"))  # cumulative time of PackedPiece.dequantize / gather
    matmul = sum(v[2] for k, v in stats.stats.items() if any(n in k[2] for n in ("addmm", "'mm'", "linear")))
    buffer = io.StringIO()
    pstats.Stats(profiler, stream=buffer).sort_stats("tottime").print_stats(12)
    total = stats.total_tt
    return (f"total {total:.2f}s, unpacking (PackedPiece.dequantize/gather, cumulative) {unpack:.2f}s "
            f"({100 * unpack / total:.0f}%), matmul (addmm/mm/linear own time) {matmul:.2f}s "
            f"({100 * matmul / total:.0f}%)\n" + buffer.getvalue())


def bench_model(name: str, bits: list[int], args: argparse.Namespace, work: tuple) -> list[dict[str, object]]:
    """Rows of one PTB model at each width; logs timings, perplexities and the profile."""
    sentences, tokens, eos = work
    fp_path = HERE / "checkpoints" / f"{name}.safetensors"
    fp_model, vocab = _fp_model(fp_path)
    fp_mem = measure_in_subprocess("fp", fp_path, HERE / "prototypes" / name / f"{bits[0]}bit.mpq")
    fp_rss = fp_mem["weights_rss_bytes"]
    rows = []
    for b in bits:
        path = HERE / "prototypes" / name / f"{b}bit.mpq"
        packed, _ = load_packed(path, keep_packed=True)
        unpacked, _ = load_packed(path)
        with torch.no_grad():  # same scores as the unpacked model, on a slice
            same = (score_sentences(packed, sentences[:200], vocab).logprobs
                    == score_sentences(unpacked.eval(), sentences[:200], vocab).logprobs)
        del unpacked
        times: dict[str, list[tuple[float, float]]] = {"fp": [], "packed": []}
        for _ in range(args.repeats):
            for label, model in (("fp", fp_model), ("packed", packed)):
                nbest_s, ppl_s, ppl = _run(model, vocab, sentences, tokens, eos)
                times[label].append((nbest_s, ppl_s))
                logger.info("%s %dbit %s: n-best %.2fs, PTB test %.2fs (ppl %.2f)", name, b, label, nbest_s, ppl_s,
                            ppl)
        best = {k: (min(t[0] for t in v), min(t[1] for t in v)) for k, v in times.items()}
        mem = measure_in_subprocess("packed", path, path)
        unpacked_mem = measure_in_subprocess("unpacked", path, path)
        size = packed_model_size(path)
        ratio = sum(best["fp"]) / sum(best["packed"])
        logger.info("%s %dbit: file %d B, packed weights RSS %d B (%.2fx file; skeleton modules %d B more), "
                    "unpacked load_packed %d B, FP %d B (%.1fx file); throughput x%.3f (n-best x%.3f, PTB x%.3f); "
                    "scores equal unpacked: %s", name, b, path.stat().st_size, mem["weights_rss_bytes"],
                    mem["weights_rss_bytes"] / path.stat().st_size, mem["skeleton_rss_bytes"],
                    unpacked_mem["weights_rss_bytes"], fp_rss, fp_rss / path.stat().st_size, ratio,
                    best["fp"][0] / best["packed"][0], best["fp"][1] / best["packed"][1], same)
        rows.append({"model": name, "avg_bits": f"{size['avg_bits']:.2f}", "file_bytes": path.stat().st_size,
                     "weights_rss_bytes": mem["weights_rss_bytes"], "fp_weights_rss_bytes": fp_rss,
                     "throughput_ratio": f"{ratio:.3f}"})
        if args.profile and b == bits[0]:
            logger.info("profile of %s %dbit packed, PTB test:\n%s", name, b, profile_packed(packed, tokens, eos))
    return rows


def write_rows(path: Path, rows: list[dict[str, object]]) -> None:
    """Replace the rows of the same (model, avg_bits) in the CSV, keep the others; atomically."""
    keys = {(r["model"], r["avg_bits"]) for r in rows}
    kept = []
    if path.is_file():
        with path.open(newline="") as handle:
            kept = [r for r in csv.DictReader(handle) if (r["model"], r["avg_bits"]) not in keys]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(sorted(kept + rows, key=lambda r: (str(r["model"]), float(r["avg_bits"]))))
    atomic_write_text(path, buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", nargs=3, metavar=("KIND", "PATH", "SKELETON_MPQ"), help=argparse.SUPPRESS)
    parser.add_argument("--models", nargs="+", default=["ptb_lstm", "ptb_transformer"])
    parser.add_argument("--bits", nargs="+", type=int, default=[2])
    parser.add_argument("--nbest", type=Path, default=DATA / "nbest" / "hyporadise" / "test_wsj_score.json")
    parser.add_argument("--ptb", type=Path, default=DATA / "ptb")
    parser.add_argument("--limit", type=int, help="only the first N n-best lists")
    parser.add_argument("--ptb-tokens", type=int, help="only the first N PTB test tokens")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--results", type=Path, default=HERE / "results" / "packed_inference.csv")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.measure:
        print(json.dumps(measure(args.measure[0], Path(args.measure[1]), Path(args.measure[2]))))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = _workloads(args)
    logger.info("%d hypotheses, %d PTB test tokens, %d thread(s)", len(work[0]), work[1].numel(), args.threads)
    rows = [row for name in args.models for row in bench_model(name, args.bits, args, work)]
    write_rows(args.results, rows)
    print(",".join(COLUMNS))
    for row in rows:
        print(",".join(str(row[k]) for k in COLUMNS))


if __name__ == "__main__":
    main()
