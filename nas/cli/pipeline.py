"""``mpnas pipeline`` and ``mpnas quickstart``: parse, run the pipeline into a run folder, exit on SIGTERM."""

from __future__ import annotations

import argparse
import shlex
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from nas.pipeline.runner import run_pipeline


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    """SIGTERM as an exception, so that temporary files are cleaned up on the way out."""
    raise SystemExit(128 + signum)


def command_line(args: argparse.Namespace) -> str:
    """The ``mpnas`` command line that parsed into ``args`` (for ``command.txt``)."""
    parts = ["mpnas", args.command] + ([args.config] if args.command != "quickstart" else [])
    for option in ("out", "data", "checkpoint", "checkpoint_every", "device", "threads"):
        value = getattr(args, option, None)
        if value is not None and not (option == "device" and value == "cpu") and not (
                option == "checkpoint_every" and value == 200):
            parts += [f"--{option.replace('_', '-')}", str(value)]
    if getattr(args, "no_report", False):
        parts.append("--no-report")
    return shlex.join(parts)


def run_from_args(config: str, args: argparse.Namespace, default_out: Path) -> Path:
    """Run the pipeline for parsed CLI arguments (SIGTERM exits cleanly); returns the run folder."""
    out = Path(args.out or default_out)
    args.out = str(out)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    try:
        run_pipeline(config, out, data=args.data, checkpoint=getattr(args, "checkpoint", None), device=args.device,
                     report=not getattr(args, "no_report", False), command=command_line(args),
                     checkpoint_every=getattr(args, "checkpoint_every", 200))
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)
    return out


def cmd_pipeline(args: argparse.Namespace) -> int:
    """``mpnas pipeline CONFIG``: the whole pipeline into a run folder."""
    out = run_from_args(args.config, args, Path("runs") / f"{Path(args.config).stem}_pipeline")
    if not args.no_report:
        print(f"report: {out / 'report' / 'report.html'}")
    return 0


def add_pipeline_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``mpnas pipeline`` (the caller adds --data, --device, --threads)."""
    p = sub.add_parser("pipeline", help="FP training -> search -> retrain -> evaluate -> report, resumable")
    p.add_argument("config", help="experiment YAML (its `pipeline` section lists strategies and budgets)")
    p.add_argument("--out", help="run folder (default runs/<config name>_pipeline); rerun to resume")
    p.add_argument("--checkpoint", help="an FP best.pt to start from instead of training")
    p.add_argument("--checkpoint-every", type=int, default=200, help="(re)training checkpoints every N steps")
    p.add_argument("--no-report", action="store_true", help="stop after evaluation (eval/*.json)")
    p.set_defaults(func=cmd_pipeline)
    return p
