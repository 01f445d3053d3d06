"""``mpnas report RUN [RUN ...] --out DIR``: results table, Pareto plot, bits plot and HTML over run folders."""

from __future__ import annotations

import argparse
from typing import Any


def _front_line(row: dict[str, Any]) -> str:
    budget = "-" if row["budget"] is None else f"{row['budget']:g}"
    return (f"  {row['model']:<16} {row['strategy']:<10} {budget:>6} {row['avg_bits']:>8.2f} "
            f"{row['theoretical_bytes'] / 1e6:>10.3f} {row['test_ppl']:>9.2f}  {row['run']}/{row['label']}")


def cmd_report(args: argparse.Namespace) -> int:
    """Write the report files of the given run folders, print their paths and the Pareto front."""
    from evaluators.report import write_report

    report = write_report(args.runs, args.out)
    for path in report.files.values():
        print(f"wrote {path}")
    print(f"Pareto front (theoretical size vs test perplexity) of {len(report.rows)} evaluated models:")
    print(f"  {'model':<16} {'strategy':<10} {'budget':>6} {'avg_bits':>8} {'size_MB':>10} {'test_ppl':>9}  run/label")
    for front in report.fronts.values():
        for row in front:
            print(_front_line(row))
    return 0


def add_report_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``report`` on the ``mpnas`` subparsers; returns the new parser."""
    p = subparsers.add_parser("report", help="results.csv, Pareto and bits plots, report.html over run folders")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (each with eval/<label>.json rows)")
    p.add_argument("--out", required=True, help="folder for results.csv, pareto.png, bits.png, report.html")
    p.set_defaults(func=cmd_report)
    return p
