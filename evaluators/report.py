"""Reports over run folders: ``results.csv``, ``pareto.png``, ``bits.png`` and a self-contained ``report.html``.

A run folder (written by the pipeline or the NNI launcher) holds::

    RUN/config.yaml                  the experiment config used (copy)
    RUN/command.txt                  the command line that made the run
    RUN/eval/<label>.json            one evaluated model per file (a "row", see ROW_SCHEMA)
    RUN/search/<label>/precision.yaml the chosen precision map

A row may name its map with ``"precision"`` (a path relative to RUN, or null for none); without
that key, ``search/<label>/precision.yaml`` is used when it exists. Every output is written
atomically and carries no timestamp, so the same runs give the same files.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluators.pareto import pareto_front
from nas.core.atomic import atomic_write_bytes, atomic_write_text
from nas.core.errors import MpnasError
from search_spaces.precision import PrecisionMap

# key -> (accepted kind, may be null). Kinds: "str", "int", "number" (int or float, NaN allowed).
ROW_SCHEMA: dict[str, tuple[str, bool]] = {
    "model": ("str", False),
    "strategy": ("str", False),
    "budget": ("number", True),
    "avg_bits": ("number", False),
    "theoretical_bytes": ("int", False),
    "packed_bytes": ("int", True),
    "compression": ("number", False),
    "valid_ppl": ("number", False),
    "test_ppl": ("number", False),
    "wer": ("number", True),
    "search_s": ("number", True),
    "retrain_s": ("number", True),
}
COLUMNS: tuple[str, ...] = (*ROW_SCHEMA, "run")
_KIND_TEXT = {"str": "a string", "int": "an integer", "number": "a number"}
_MB = 1e6


@dataclass(frozen=True)
class Report:
    """What :func:`write_report` produced: the files, the sorted rows and the Pareto front per model."""

    files: dict[str, Path]
    rows: list[dict[str, Any]]
    fronts: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def _check_value(value: Any, kind: str, nullable: bool) -> bool:
    if value is None:
        return nullable
    if isinstance(value, bool):
        return False
    if kind == "str":
        return isinstance(value, str) and bool(value)
    if kind == "int":
        return isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
    return isinstance(value, numbers.Real)


class ReportError(MpnasError):
    """A run folder's eval rows cannot be reported; the message names the file and key."""


def parse_row(data: Any, source: str) -> dict[str, Any]:
    """Validate one eval JSON object; ValueError names ``source``, the key and what was expected.

    Returns the schema keys (ints as int, numbers as float) plus ``precision`` when present;
    unknown keys are dropped.
    """
    if not isinstance(data, Mapping):
        raise ReportError(f"{source}: expected a JSON object (one evaluated model), got {type(data).__name__}")
    row: dict[str, Any] = {}
    for key, (kind, nullable) in ROW_SCHEMA.items():
        expected = _KIND_TEXT[kind] + (" or null" if nullable else "")
        if key not in data:
            raise ReportError(f"{source}: missing key {key!r} (expected {expected})")
        value = data[key]
        if not _check_value(value, kind, nullable):
            raise ReportError(f"{source}: key {key!r} must be {expected}, got {value!r}")
        if value is not None and kind != "str":
            value = int(value) if kind == "int" else float(value)
        row[key] = value
    if "precision" in data:
        precision = data["precision"]
        if precision is not None and (not isinstance(precision, str) or not precision):
            raise ReportError(f"{source}: key 'precision' must be a path relative to the run folder "
                              f"or null, got {precision!r}")
        row["precision"] = precision
    return row


def collect_rows(runs: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Every ``RUN/eval/*.json`` of ``runs`` as rows, with ``run`` (the folder name) and ``label`` (file stem).

    Files are read in name order, runs in the given order. FileNotFoundError if a RUN has no
    ``eval/`` folder; ValueError (naming the file) for a malformed row; ValueError if no run
    holds any row.
    """
    rows: list[dict[str, Any]] = []
    for run in map(Path, runs):
        eval_dir = run / "eval"
        if not eval_dir.is_dir():
            what = "run folder does not exist" if not run.is_dir() else "no eval/ folder"
            raise FileNotFoundError(f"{run}: {what} (expected {eval_dir}/<label>.json, one per evaluated model)")
        for path in sorted(eval_dir.glob("*.json")):
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except ValueError as exc:
                raise ReportError(f"{path}: not valid JSON ({exc})") from exc
            row = parse_row(data, str(path))
            row["run"] = run.resolve().name
            row["label"] = path.stem
            row["_run_dir"] = run
            rows.append(row)
    if not rows:
        raise ReportError(f"no evaluated models: no eval/*.json in {', '.join(map(str, runs)) or 'no run given'}")
    return rows


def sort_rows(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Rows ordered by model, strategy, budget (null first), then run and label."""
    def key(row: Mapping[str, Any]) -> tuple[Any, ...]:
        budget = row.get("budget")
        missing = budget is None or (isinstance(budget, float) and math.isnan(budget))
        return (row["model"], row["strategy"], not missing, 0.0 if missing else budget,
                row.get("run", ""), row.get("label", ""))
    return sorted(rows, key=key)


def _csv_cell(value: Any) -> str:
    return "" if value is None else str(value)


def results_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """The text of ``results.csv``: header :data:`COLUMNS`, rows in :func:`sort_rows` order, null as empty."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in sort_rows(rows):
        writer.writerow([_csv_cell(row.get(c)) for c in COLUMNS])
    return buffer.getvalue()


def _budget_text(budget: Any) -> str:
    return "fp" if budget is None else f"{budget:g}"


def map_label(row: Mapping[str, Any]) -> str:
    """``strategy@budget`` (``fp`` for an unbudgeted row)."""
    if row.get("budget") is None:
        return str(row["strategy"])
    return f"{row['strategy']}@{_budget_text(row['budget'])}"


def precision_path(row: Mapping[str, Any]) -> Path | None:
    """The precision map file of a row read by :func:`collect_rows`, or None if it has none."""
    run = Path(row["_run_dir"])
    if "precision" in row:
        return None if row["precision"] is None else run / row["precision"]
    default = run / "search" / str(row["label"]) / "precision.yaml"
    return default if default.is_file() else None


def load_maps(rows: Sequence[Mapping[str, Any]]) -> list[tuple[str, PrecisionMap]]:
    """``(label, map)`` for each row with a precision map, in :func:`sort_rows` order; labels are unique."""
    found: list[tuple[Mapping[str, Any], PrecisionMap]] = []
    for row in sort_rows(rows):
        path = precision_path(row)
        if path is None:
            continue
        if not path.is_file():
            raise FileNotFoundError(f"{path}: precision map named by {row['run']}/eval/{row['label']}.json "
                                    "does not exist")
        found.append((row, PrecisionMap.load(path)))
    several_models = len({row["model"] for row, _ in found}) > 1
    labels = [f"{row['model']}: " * several_models + map_label(row) for row, _ in found]
    out = []
    for (row, pmap), label in zip(found, labels, strict=True):
        if labels.count(label) > 1:
            label = f"{label} ({row['run']}/{row['label']})"
        out.append((label, pmap))
    return out


def _figure_png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def _new_figure(width: float, height: float) -> Any:
    # An explicit Agg canvas on a bare Figure: headless, and unlike matplotlib.use("Agg") + pyplot it
    # changes no process-wide backend and leaves no figure in pyplot's global list.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


_MARKERS = ("o", "^", "D", "v", "P", "X", "<", ">", "h", "p")


def _size_tick(value: float, _position: object = None) -> str:
    """Log-axis tick text: plain numbers at 1, 2, 3 and 5 times a power of ten (0.3, 0.5, 1, 2), else none."""
    if value <= 0:
        return ""
    mantissa = round(value / 10 ** math.floor(math.log10(value) + 1e-9), 6)
    return f"{value:g}" if mantissa in (1.0, 2.0, 3.0, 5.0) else ""


def plot_pareto(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """PNG: test perplexity vs theoretical size (MB, log x), one marker per strategy, the front as a step line.

    One panel per model. The FP baseline (strategy ``fp``) is a star, ``uniform`` points are
    squares joined by a dotted line; other strategies get distinct markers.
    """
    from matplotlib.ticker import FuncFormatter

    models = sorted({row["model"] for row in rows})
    fig = _new_figure(6.4 * max(1, len(models)), 4.8)
    strategies = sorted({row["strategy"] for row in rows} - {"fp", "uniform"})
    style = {s: {"marker": _MARKERS[i % len(_MARKERS)], "color": f"C{(i + 2) % 10}", "s": 36}
             for i, s in enumerate(strategies)}
    style["fp"] = {"marker": "*", "color": "black", "s": 180}
    style["uniform"] = {"marker": "s", "color": "C1", "s": 36}
    for index, model in enumerate(models or ["(no rows)"]):
        ax = fig.add_subplot(1, max(1, len(models)), index + 1)
        mine = [r for r in rows if r["model"] == model]
        plotted = [r for r in mine if r["theoretical_bytes"] > 0 and math.isfinite(r["test_ppl"])]
        for strategy in sorted({r["strategy"] for r in plotted}, key=lambda s: (s != "fp", s != "uniform", s)):
            points = sorted((r["theoretical_bytes"] / _MB, r["test_ppl"]) for r in plotted if r["strategy"] == strategy)
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            if strategy == "uniform":
                ax.plot(xs, ys, linestyle=":", color=style[strategy]["color"], linewidth=1)
            ax.scatter(xs, ys, label=strategy, zorder=3, edgecolors="black", linewidths=0.4, **style[strategy])
        front = [r for r in pareto_front(plotted) if r["theoretical_bytes"] > 0]
        if front:
            ax.step([r["theoretical_bytes"] / _MB for r in front], [r["test_ppl"] for r in front], where="post",
                    color="grey", linewidth=1.2, zorder=2, label="Pareto front")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(_size_tick))
        ax.xaxis.set_minor_formatter(FuncFormatter(_size_tick))
        ax.set_xlabel("theoretical size (MB, log scale)")
        ax.set_ylabel("test perplexity")
        ax.set_title(model)
        ax.grid(True, which="both", alpha=0.3)
        if plotted:
            ax.legend(fontsize="small")
    return _figure_png(fig)


def cluster_order(maps: Sequence[tuple[str, PrecisionMap]]) -> list[str]:
    """Clusters of all maps in model order: the key order of each map file, first appearance wins."""
    seen: dict[str, None] = {}
    for _, pmap in maps:
        seen.update((c, None) for c in pmap.bits if c not in seen)
    return list(seen)


def plot_bits(maps: Sequence[tuple[str, PrecisionMap]]) -> bytes:
    """PNG heatmap: one row per map (its label), one column per cluster in map order, cells annotated with bits."""
    import numpy as np

    clusters = cluster_order(maps)
    fig = _new_figure(max(6.0, 0.38 * len(clusters) + 2.5), max(2.5, 0.42 * len(maps) + 2.2))
    ax = fig.add_subplot(1, 1, 1)
    if not maps:
        ax.text(0.5, 0.5, "no precision maps in these runs", ha="center", va="center")
        ax.set_axis_off()
        return _figure_png(fig)
    grid = np.full((len(maps), len(clusters)), np.nan)
    for i, (_, pmap) in enumerate(maps):
        for j, cluster in enumerate(clusters):
            if cluster in pmap.bits:
                grid[i, j] = pmap.bits[cluster]
    shade = np.log2(grid)  # 1 -> 0, 2 -> 1, ..., 32 -> 5: low bits stay distinguishable next to FP
    image = ax.imshow(np.ma.masked_invalid(shade), aspect="auto", cmap="viridis", vmin=0, vmax=5)
    if grid.size <= 1500:
        for (i, j), bits in np.ndenumerate(grid):
            if not np.isnan(bits):
                ax.text(j, i, "FP" if bits >= 32 else f"{bits:g}", ha="center", va="center", fontsize=7,
                        color="white" if shade[i, j] < 2.5 else "black")
    ax.set_xticks(range(len(clusters)), clusters, rotation=90, fontsize=7)
    ax.set_yticks(range(len(maps)), [label for label, _ in maps], fontsize=8)
    ax.set_xlabel("cluster (model order)")
    colorbar = fig.colorbar(image, ax=ax, ticks=range(6))
    colorbar.ax.set_yticklabels(["1", "2", "4", "8", "16", "32"])
    colorbar.set_label("bits")
    return _figure_png(fig)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _read_or_note(path: Path) -> str:
    return path.read_text(encoding="utf-8") if path.is_file() else f"({path.name} is missing in this run)"


def report_html(rows: Sequence[Mapping[str, Any]], runs: Sequence[Path], fronts: Mapping[str, Sequence[Any]],
                images: Mapping[str, bytes]) -> str:
    """The self-contained HTML page: images as data URIs, the results table, each run's config and command."""
    on_front = {id(r) for front in fronts.values() for r in front}
    esc = html.escape
    head = "".join(f"<th>{esc(c)}</th>" for c in (*COLUMNS, "pareto"))
    body = []
    for row in sort_rows(rows):
        mark = "yes" if id(row) in on_front else ""
        cells = "".join(f"<td>{esc(_cell(row.get(c)))}</td>" for c in COLUMNS)
        body.append(f'<tr class="{"front" if mark else ""}">{cells}<td>{mark}</td></tr>')
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8"><title>mpnas report</title>',
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}tr.front{font-weight:bold}"
        "pre{background:#f4f4f4;padding:1em;overflow-x:auto}img{max-width:100%}</style></head><body>",
        "<h1>mpnas report</h1>",
        f"<p>{len(rows)} evaluated models from {len(runs)} run(s). Bold rows are on the Pareto front "
        "(theoretical size vs test perplexity, per model).</p>",
    ]
    for name, png in images.items():
        data = base64.b64encode(png).decode("ascii")
        parts.append(f'<h2>{esc(name)}</h2><img alt="{esc(name)}" src="data:image/png;base64,{data}">')
    parts += ["<h2>results</h2>", f"<table><thead><tr>{head}</tr></thead><tbody>", *body, "</tbody></table>"]
    for run in runs:
        parts.append(f"<h2>run {esc(run.resolve().name)}</h2>")
        parts.append(f"<h3>command.txt</h3><pre>{esc(_read_or_note(run / 'command.txt'))}</pre>")
        parts.append(f"<h3>config.yaml</h3><pre>{esc(_read_or_note(run / 'config.yaml'))}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(runs: Sequence[str | Path], out_dir: str | Path) -> Report:
    """Read ``runs`` and write ``results.csv``, ``pareto.png``, ``bits.png`` and ``report.html`` into ``out_dir``.

    Errors (FileNotFoundError / ValueError) name the offending file before anything is written.
    """
    run_dirs = [Path(r) for r in runs]
    out = Path(out_dir)
    rows = collect_rows(run_dirs)
    maps = load_maps(rows)
    sorted_rows = [dict(r) for r in sort_rows(rows)]
    fronts = {m: pareto_front([r for r in sorted_rows if r["model"] == m])
              for m in sorted({r["model"] for r in sorted_rows})}
    images = {"pareto.png": plot_pareto(sorted_rows), "bits.png": plot_bits(maps)}
    files = {"results.csv": out / "results.csv", **{n: out / n for n in images}, "report.html": out / "report.html"}
    atomic_write_text(files["results.csv"], results_csv(sorted_rows))
    for name, png in images.items():
        atomic_write_bytes(files[name], png)
    atomic_write_text(files["report.html"], report_html(sorted_rows, run_dirs, fronts, images))
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in sorted_rows]
    by_id = {id(r): p for r, p in zip(sorted_rows, public, strict=True)}
    return Report(files, public, {m: [by_id[id(r)] for r in front] for m, front in fronts.items()})
