"""Uniform-precision quantization of the FP PTB models: ADMM vs STE (NNI peers: nni_peers.py).

    MPNAS_DATA=../shared/data/ptb .venv/bin/python benchmarks/uniform_quant.py \\
        --model lstm --bits 8 4 2 1 --methods admm ste nni_qat nni_lsq --epochs 1 --threads 1

``admm_ls`` / ``ste_ls`` are ADMM / STE with learned scales (``retrain.learn_scales``, LSQ's
gradient). ``nni_qat`` / ``nni_lsq`` run ``benchmarks/nni_peers.py`` in ``.venv-nni`` (NNI's own pins) with
the same checkpoint, retrain section, epochs and step cap. For every (bits, method) it retrains
the committed reference checkpoint ``benchmarks/checkpoints/ptb_<model>.safetensors`` (or
``--checkpoint``) with the retrain section of ``--config`` (default: the packaged
``ptb_<model>`` config) and the same budget for every method (``--epochs`` of at most
``--max-steps`` steps each), exports the packed file, and replaces the row in
``benchmarks/results/uniform.csv`` (columns
``model,method,bits,epochs,avg_bits,theoretical_bytes,packed_bytes,compression,valid_ppl,test_ppl,step_time_ratio``;
``epochs`` counts the training actually run, a fraction when ``--max-steps`` cuts an epoch).
Several invocations may run side by side (one per core): rows are written under a file lock.
``step_time_ratio`` is the median retraining step time over the median FP step time, both
measured in this process on the same batches (a ratio, so the shared machine's noise cancels).
Retraining runs go to ``benchmarks/checkpoints/<model>_uniform/<method>_<bits>/`` and resume.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import fcntl
import json
import statistics
import subprocess
import time
from pathlib import Path

import torch
from step_time import time_hooks  # benchmarks/ is on sys.path when this script runs

from nas.config.sections import load_config
from nas.core.atomic import atomic_write_csv
from nas.core.checkpoint import atomic_write_text
from nas.core.console import configure_logging
from nas.core.data import load_corpus, resolve_data_dir
from nas.retrain.distributed import DistInfo
from nas.retrain.hooks import TrainingHooks
from nas.retrain.loop import epoch_batches
from nas.retrain.run import load_fp_checkpoint, make_hooks, retrain
from search_spaces.models import build_model
from search_spaces.packed import export_packed
from search_spaces.precision import PrecisionMap

HERE = Path(__file__).resolve().parent
CONFIGS = {"lstm": "ptb_lstm", "transformer": "ptb_transformer"}
COLUMNS = ["model", "method", "bits", "epochs", "avg_bits", "theoretical_bytes", "packed_bytes", "compression",
           "valid_ppl", "test_ppl", "step_time_ratio"]


def write_rows(csv_path: Path, new_rows: list[dict[str, object]]) -> None:
    """Replace rows with the same (model, method, bits), atomically, under a lock (parallel invocations)."""
    keys = {(str(r["model"]), str(r["method"]), str(r["bits"])) for r in new_rows}
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = []
        if csv_path.is_file():
            rows = [r for r in csv.DictReader(csv_path.open()) if (r["model"], r["method"], r["bits"]) not in keys]
        rows += [{k: r[k] for k in COLUMNS} for r in new_rows]
        rows.sort(key=lambda r: (r["model"], r["method"], -int(r["bits"])))
        atomic_write_csv(csv_path, COLUMNS, rows)


NNI_METHODS = {"nni_qat": "qat", "nni_lsq": "lsq"}
LEARNED_SCALES = {"admm_ls": "admm", "ste_ls": "ste"}  # row name -> retraining method, with learn_scales


def epochs_run(args: argparse.Namespace, steps_per_epoch: int | None = None) -> str:
    """Epochs of training a row got: ``--epochs``, scaled down when ``--max-steps`` cuts an epoch short."""
    if not args.max_steps or not steps_per_epoch or args.max_steps >= steps_per_epoch:
        return f"{args.epochs:g}"
    return f"{args.epochs * args.max_steps / steps_per_epoch:.3g}"


def run_dir(args: argparse.Namespace, method: str, bits: int) -> Path:
    """Where one row's run lives (resumed when present): per config, so recipes never share a run."""
    tag = f"_{args.tag}" if getattr(args, "tag", None) else ""
    return HERE / "checkpoints" / f"{args.model}_uniform" / Path(args.config).stem / f"{method}_{bits}{tag}"


def run_nni_peer(args: argparse.Namespace, method: str, bits: int, fp_path: Path,
                 steps_per_epoch: int) -> dict[str, object] | None:
    """One NNI peer row (``nni_peers.py`` in NNI's venv); None when NNI cannot do ``bits``."""
    out = run_dir(args, method, bits)
    out.mkdir(parents=True, exist_ok=True)
    command = [args.nni_python, str(HERE / "nni_peers.py"), "--checkpoint", str(fp_path), "--config",
               args.config, "--method", NNI_METHODS[method], "--bits", str(bits),
               "--epochs", str(args.epochs), "--threads", str(args.threads or 1), "--packed", str(out / "model.mpq")]
    if args.max_steps:
        command += ["--max-steps", str(args.max_steps)]
    if args.data:
        command += ["--data", args.data]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    atomic_write_text(out / "result.json", json.dumps(result, indent=1) + "\n")
    if "skipped" in result:
        print(f"{method} {bits} bit skipped: {result['skipped']}", flush=True)
        return None
    return {"model": f"ptb_{args.model}", "method": method, "bits": bits, "epochs": epochs_run(args, steps_per_epoch),
            "avg_bits": f"{result['avg_bits']:.3f}",
            "theoretical_bytes": int(result["theoretical_bytes"]), "packed_bytes": result.get("packed_bytes", ""),
            "compression": f"{result['compression']:.2f}", "valid_ppl": f"{result['valid_ppl']:.2f}",
            "test_ppl": f"{result['test_ppl']:.2f}", "step_time_ratio": f"{result['step_time_ratio']:.3f}"}


def measure_ratio(exp: object, corpus: object, ckpt: dict, precision: PrecisionMap, method: str, steps: int) -> float:
    """Median step time with the method's hooks / median FP step time, interleaved in one run.

    ADMM's projection (every ``project_every`` steps) is timed once per round and amortised.
    """
    batches_all = epoch_batches(exp, corpus, 0, DistInfo(), recurrent=exp.model_type == "lstm")
    batches = batches_all[: steps + 5]
    config = dict(ckpt["config"])
    kind = config.pop("type")
    fp_times, q_times, projection_s = [], [], []
    for _ in range(2):  # interleave FP and quantized passes so drifts in machine load hit both
        for hooks_kind, sink in (("fp", fp_times), (method, q_times)):
            model = build_model(kind, **config)
            model.load_state_dict(ckpt["model"])
            hooks = TrainingHooks() if hooks_kind == "fp" else make_hooks(exp.retrain, precision, method)(model)
            hooks.begin(len(batches_all))
            sink += time_hooks(model, hooks, batches)[5:]  # skip warm-up steps
            if hooks_kind == "admm":  # the projections fall outside the timed steps: amortise one
                period = hooks.rescale_every
                hooks.steps = period - 1  # the next step ends a period: it projects
                start = time.perf_counter()
                hooks.after_step(model, 0, lr=exp.retrain.lr, loss_scale=1.0)
                projection_s.append((time.perf_counter() - start) / period)
    extra = statistics.median(projection_s) if projection_s else 0.0
    return (statistics.median(q_times) + extra) / statistics.median(fp_times)


def _parser() -> argparse.ArgumentParser:
    """The command line of this benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2, 1])
    parser.add_argument("--methods", nargs="+", default=["admm", "ste"],
                        choices=["admm", "ste", *LEARNED_SCALES, *NNI_METHODS],
                        help="admm_ls / ste_ls: the same with learned scales (retrain.learn_scales)")
    parser.add_argument("--nni-python", default=str(HERE.parent / ".venv-nni" / "bin" / "python"),
                        help="interpreter with NNI 3.0 installed (requirements-nni.txt)")
    parser.add_argument("--checkpoint", type=Path, help="FP checkpoint (default: benchmarks/checkpoints/"
                        "ptb_<model>.safetensors, the committed reference)")
    parser.add_argument("--config", help="experiment YAML or packaged name whose retrain section is used "
                        "(default: ptb_<model>)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-steps", type=int, default=None, help="cap on steps per retraining epoch")
    parser.add_argument("--timing-steps", type=int, default=20)
    parser.add_argument("--data")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--tag", help="suffix of the rows' method name (e.g. a recipe variant given by --config), "
                        "so that they do not replace the plain method's rows")
    return parser


def main() -> None:
    args = _parser().parse_args()
    configure_logging()  # the library's progress lines (epochs) on stdout
    if args.threads:
        torch.set_num_threads(args.threads)
    args.config = args.config or CONFIGS[args.model]
    exp = load_config(args.config)
    exp = dataclasses.replace(exp, retrain=dataclasses.replace(exp.retrain, epochs=args.epochs,
                                                               max_steps_per_epoch=args.max_steps))
    corpus = load_corpus(resolve_data_dir(args.data))
    fp_path = args.checkpoint or HERE / "checkpoints" / f"ptb_{args.model}.safetensors"
    ckpt = load_fp_checkpoint(fp_path, corpus)
    recurrent = ckpt["config"]["type"] == "lstm"
    steps_per_epoch = len(epoch_batches(exp, corpus, 0, DistInfo(), recurrent=recurrent))
    for bits in args.bits:
        for method in args.methods:
            if method in NNI_METHODS:
                row = run_nni_peer(args, method, bits, fp_path, steps_per_epoch)
                if row is not None:
                    write_rows(HERE / "results" / "uniform.csv", [row])
                print(row, flush=True)
                continue
            probe = build_model(ckpt["config"]["type"], **{k: v for k, v in ckpt["config"].items() if k != "type"})
            precision = PrecisionMap.uniform(probe, bits)
            out = run_dir(args, method, bits)
            row_exp, base = exp, LEARNED_SCALES.get(method, method)
            if method in LEARNED_SCALES:
                row_exp = dataclasses.replace(exp, retrain=dataclasses.replace(exp.retrain, learn_scales=True))
            metrics = retrain(row_exp, corpus, fp_path, precision, out, method=base, resume=True, progress=False,
                              checkpoint_every=200)
            quantized = build_model(ckpt["config"]["type"], **{k: v for k, v in ckpt["config"].items() if k != "type"})
            quantized.load_state_dict(load_fp_checkpoint(out / "best.pt")["model"])
            packed = out / "model.mpq"
            export_packed(quantized, precision, packed)
            ratio = measure_ratio(row_exp, corpus, ckpt, precision, base, args.timing_steps)
            row = {"model": f"ptb_{args.model}", "method": f"{method}_{args.tag}" if args.tag else method, "bits": bits,
                   "epochs": epochs_run(args, steps_per_epoch), "avg_bits": f"{metrics['avg_bits']:.3f}",
                   "theoretical_bytes": int(metrics["theoretical_bytes"]),
                   "packed_bytes": packed.stat().st_size, "compression": f"{metrics['compression']:.2f}",
                   "valid_ppl": f"{metrics['valid_ppl']:.2f}", "test_ppl": f"{metrics['test_ppl']:.2f}",
                   "step_time_ratio": f"{ratio:.3f}"}
            write_rows(HERE / "results" / "uniform.csv", [row])
            print(row, flush=True)


if __name__ == "__main__":
    main()
