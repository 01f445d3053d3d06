"""``mpnas nni``: prepare and run an NNI experiment from an experiment file, print its summary."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from nas.config.sections import RETRAIN_METHODS, ConfigError, load_config
from nas.nni.launcher import NniRunError, emit_yaml, prepare, run_experiment
from nas.nni.space import (
    MODES,
    TUNERS,
    load_settings,
)


def _print_summary(summary: Mapping[str, Any], out: Path) -> None:
    results = summary["results"]
    print(f"NNI experiment {summary['experiment_id']} {summary['status']} in {summary['elapsed_s']:.0f} s: "
          f"{len(results)} trial result(s) of {len(summary['trials'])} trial(s); best first:")
    print(f"  {'trial':<8} {'objective':>10} {'ppl':>9} {'avg_bits':>8} {'size_MB':>9}  parameters")
    def cell(value: Any, width: int, digits: int, scale: float = 1.0) -> str:
        return f"{value / scale:>{width}.{digits}f}" if isinstance(value, (int, float)) else f"{'-':>{width}}"

    for record in results[:10]:
        r = record["result"]
        params = json.dumps(record.get("parameters", {}), sort_keys=True)
        params = params if len(params) <= 100 else params[:97] + "..."
        print(f"  {record['trial_id']:<8} {cell(r['default'], 10, 3)} {cell(r.get('ppl'), 9, 2)} "
              f"{cell(r.get('avg_bits'), 8, 3)} {cell(r.get('size_bytes'), 9, 4, 1e6)}  {params}"
              + ("  (diverged)" if r.get("diverged") else ""))
    if len(summary["trials"]) < summary["max_trials"]:
        print(f"  ({len(summary['trials'])} of {summary['max_trials']} trials started: the wall-clock limit "
              "ended the experiment, or the tuner ran out of new parameters)")
    print(f"summary: {out / 'nni' / 'results.json'}")
    print(f"report:  mpnas report {out / 'trials'}/* --out {out / 'report'}")


def cmd_nni(args: argparse.Namespace) -> int:
    """Run (or emit) an NNI experiment over an experiment file."""
    from nas.core.data import resolve_data_dir

    exp = load_config(args.config)
    settings = load_settings(exp, {"mode": args.mode, "tuner": args.tuner, "trials": args.trials,
                                   "concurrency": args.concurrency, "max_seconds": args.max_seconds,
                                   "seed": args.seed})
    out = Path(args.out or Path("runs") / f"nni_{Path(exp.source).stem}_{settings.mode}")
    data = resolve_data_dir(args.data or exp.data.path)
    prepared = prepare(exp, settings, out, checkpoint=args.checkpoint, data=Path(data), device=args.device,
                       threads=args.threads, retrain_method=args.method, python=args.python)
    if args.emit_config:
        target = Path(args.emit_config)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(emit_yaml(prepared.config), encoding="utf-8")
        print(f"wrote {target} ({len(prepared.search_space)} tuned parameters, trial spec {prepared.spec_path})")
        if args.python is None and importlib.util.find_spec("nni") is None:
            print(f"warning: the trials will run {sys.executable}, which cannot import nni; pass --python "
                  "with the NNI venv's interpreter", file=sys.stderr)
        print(f"run:    nnictl create --config {target} --port {args.port or 8080}")
        print(f"report: mpnas report {prepared.out / 'trials'}/* --out {prepared.out / 'report'}")
        return 0
    try:
        import nni  # noqa: F401 - only to say clearly that it is missing
    except ImportError as exc:
        raise ConfigError(f"mpnas nni needs NNI 3.0 ({exc}): pip install -e '.[nni]' in a separate venv "
                          "(see requirements-nni.txt), or write the YAML with --emit-config") from exc
    try:
        summary = run_experiment(prepared, settings, port=args.port, keep_going=args.keep_going)
    except NniRunError as exc:
        print(f"mpnas: error: {exc}", file=sys.stderr)
        print(f"(trial folders so far: {prepared.out / 'trials'})", file=sys.stderr)
        return 1
    _print_summary(summary, prepared.out)
    return 0


def add_nni_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``mpnas nni`` (needs NNI only when it runs an experiment)."""
    p = sub.add_parser("nni", help="tune search settings or bit widths with NNI (needs the nni extra)",
                       description="Run an NNI 3.0 HPO experiment on the local machine, or write its YAML. "
                       "Settings: the config's optional `nni` section, overridden by these options.")
    p.add_argument("config", help="experiment YAML (its model, space, budget, search, retrain, pipeline, nni)")
    p.add_argument("--tuner", choices=TUNERS, help="default: nni.tuner, else TPE")
    p.add_argument("--trials", type=int, help="number of trials (default: nni.trials, else 10)")
    p.add_argument("--mode", choices=MODES, help="hparams: tune search settings, run the pipeline per trial; "
                   "bits: tune a bit width per cluster (default: nni.mode, else hparams)")
    p.add_argument("--concurrency", type=int, help="trials at once (default: nni.concurrency, else 1)")
    p.add_argument("--max-seconds", type=int, help="wall-clock limit of the experiment (default: nni.max_seconds)")
    p.add_argument("--seed", type=int, help="TPE/Random tuner seed")
    p.add_argument("--port", type=int, help="NNI manager port (default: a free one)")
    p.add_argument("--out", help="experiment folder; trials in OUT/trials/<id> (default runs/nni_<config>_<mode>)")
    p.add_argument("--checkpoint", help="FP best.pt the trials start from (required in bits mode)")
    p.add_argument("--method", choices=RETRAIN_METHODS,
                   help="retraining method (default: pipeline.retrain_method, else retrain.method)")
    p.add_argument("--keep-going", action="store_true", help="do not stop at the first failed trial")
    p.add_argument("--emit-config", metavar="EXP_YML", help="write the NNI YAML for `nnictl create` and exit")
    p.add_argument("--python", help="interpreter of the trials (default: this one); it must import nni and mpnas")
    p.set_defaults(func=cmd_nni)
    return p
