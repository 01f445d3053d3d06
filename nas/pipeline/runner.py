"""``mpnas pipeline``: FP training -> search -> retrain -> evaluate -> report, resumable.

Run folder (``RUN``)::

    config.yaml                       the experiment config used
    command.txt                       the command line (one line)
    state.json                        {stage: {"inputs_hash", "done", "seconds"}}
    fp/best.pt, fp/metrics.json       FP training (with --checkpoint: fp/source.json, path + sha256)
    search/<label>/precision.yaml     label = f"{strategy}_b{budget:g}", e.g. kl_b2, uniform_b4
    retrain/<label>/best.pt, metrics.json, model.mpq
    eval/fp.json, eval/<label>.json   one result row per model (keys: nas.pipeline.stages.ROW_KEYS)
    report/results.csv, pareto.png, bits.png, report.html
    cache/scores/                     kl/hessian score tables, shared across budgets

Stages (``fp``, ``eval/fp``, ``search/<label>``, ``retrain/<label>``, ``eval/<label>``, ``report``)
run in that order. Each has an inputs hash: sha256 of its config sections (canonical JSON), the
content hashes of its upstream artifacts and its label. A stage is skipped when its artifacts
exist and ``state.json`` records the same hash as done. A stage that started with the same hash
but never finished (the run was killed) resumes: training and retraining continue from their
``checkpoint.pt``. A stage whose hash changed starts over in an emptied folder. Every file is
written atomically, so a run killed at any point (SIGTERM or SIGKILL) and restarted ends with
the same results as an uninterrupted one. Runs are seeded from the config; ``search_s`` and
``retrain_s`` are the seconds ``state.json`` recorded for the call that completed the stage.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from nas.config.sections import ConfigError, ExperimentConfig, load_config, resolve_config_path
from nas.core.checkpoint import atomic_write_json, atomic_write_text
from nas.core.data import Corpus, load_corpus, resolve_data_dir
from nas.pipeline.preflight import check_pipeline
from nas.pipeline.stages import (
    Point,
    canonical_hash,
    checkpoint_hash,
    corpus_hash,
    file_sha256,
    fp_row,
    load_model,
    plan_points,
    precision_hash,
    quantized_row,
    record_fp_source,
    retrain_point,
    search_point,
    train_fp,
)
from nas.pipeline.state import PipelineError, RunState, read_rows, section_inputs
from nas.search.strategies import settings_used
from search_spaces.packed import load_packed
from search_spaces.precision import PrecisionMap
from search_spaces.size import model_size

logger = logging.getLogger(__name__)  # ``log`` is the stage-line callback of Pipeline


class Pipeline:
    """One run folder and the stages that fill it; :func:`run_pipeline` is the usual entry point.

    The stage methods may also be called one by one (e.g. by an NNI trial): ``fp()`` first, then
    ``search(point)`` (or ``given_map(point, precision)`` for a map chosen elsewhere),
    ``retrain(point)``, ``evaluate(point)`` for any :class:`~nas.pipeline.stages.Point`.
    """

    def __init__(self, exp: ExperimentConfig, run_dir: Path, corpus: Corpus, *, checkpoint: Path | None = None,
                 device: str = "cpu", checkpoint_every: int = 200, log: Callable[[str], None] = logger.info) -> None:
        self.exp, self.run, self.corpus = exp, Path(run_dir), corpus
        self.checkpoint = None if checkpoint is None else Path(checkpoint)
        self.device, self.checkpoint_every, self.log = device, checkpoint_every, log
        self.model_name = Path(exp.source).stem
        self.method = exp.pipeline.retrain_method or exp.retrain.method
        self.state = RunState(self.run / "state.json")
        self.corpus_hash = corpus_hash(corpus)
        # the corpus hash covers what blank_lines does to the tokens; left out at its default so
        # that runs from before the key keep their hashes
        self.data = {k: v for k, v in dataclasses.asdict(exp.data).items()
                     if k != "path" and not (k == "blank_lines" and v == "eos")}
        self.ran: list[str] = []  # stages run (not skipped) by this object, in order
        self.step, self.total = 0, 0
        self._hashes: dict[tuple[str, int, int], str] = {}

    # --- bookkeeping ---------------------------------------------------------------------------

    @property
    def fp_checkpoint(self) -> Path:
        """The FP model every later stage starts from."""
        return self.checkpoint if self.checkpoint is not None else self.run / "fp" / "best.pt"

    def _content_hash(self, path: Path, how: Callable[[Path], str]) -> str:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        if key not in self._hashes:
            self._hashes[key] = how(path)
        return self._hashes[key]

    def _stage(self, name: str, inputs: dict[str, Any], artifacts: list[Path], work_dir: Path | None,
               action: Callable[[], None]) -> None:
        """Run ``action`` unless ``name`` is done with the same inputs and its artifacts exist."""
        self.step += 1
        prefix = f"[{self.step}/{self.total or self.step}] {name.replace('/', ' ')}"
        inputs_hash = canonical_hash({"stage": name, **inputs})
        entry = self.state.get(name)
        same = entry is not None and entry.get("inputs_hash") == inputs_hash
        if same and entry.get("done") and all(p.exists() for p in artifacts):
            self.log(f"{prefix}: up to date")
            return
        resuming = same and not entry.get("done")
        if work_dir is not None and work_dir.exists() and not resuming:
            shutil.rmtree(work_dir)  # stale output of other inputs: never resume from it
        self.state.set(name, inputs_hash, False, None)
        self.log(f"{prefix} ..." + (" (resuming)" if resuming else ""))
        start = time.perf_counter()
        action()
        seconds = time.perf_counter() - start
        self.state.set(name, inputs_hash, True, round(seconds, 3))
        self.ran.append(name)
        self.log(f"{prefix}: done in {seconds:.1f} s")

    def _fp_hash(self) -> str:
        return self._content_hash(self.fp_checkpoint, checkpoint_hash)

    # --- stages --------------------------------------------------------------------------------

    def fp(self) -> None:
        """FP training into ``fp/`` or, with a given checkpoint, ``fp/source.json``."""
        fp_dir = self.run / "fp"
        if self.checkpoint is not None:
            inputs = {"checkpoint_sha256": self._content_hash(self.checkpoint, file_sha256),
                      "corpus": self.corpus_hash}
            self._stage("fp", inputs, [fp_dir / "source.json"], fp_dir,
                        lambda: record_fp_source(self.checkpoint, fp_dir, self.corpus))
            return
        inputs = {"model": self.exp.model, "data": self.data, "train": section_inputs(self.exp.train),
                  "corpus": self.corpus_hash}
        self._stage("fp", inputs, [fp_dir / "best.pt", fp_dir / "metrics.json"], fp_dir,
                    lambda: train_fp(self.exp, self.corpus, fp_dir, device=self.device,
                                     checkpoint_every=self.checkpoint_every))

    def evaluate_fp(self) -> None:
        """``eval/fp.json``: the FP model's row."""
        out = self.run / "eval" / "fp.json"
        inputs = {"fp": self._fp_hash(), "model": self.model_name, "data": self.data, "corpus": self.corpus_hash}
        self._stage("eval/fp", inputs, [out], None, lambda: atomic_write_json(
            out, fp_row(self.exp, self.corpus, self.fp_checkpoint, self.model_name, device=self.device,
                        trained_here=self.checkpoint is None)))

    @property
    def prototype_dir(self) -> Path:
        """Where the ``prototypes`` stage keeps the uniform prototypes (``pipeline.prototypes_dir`` when given)."""
        given = self.exp.pipeline.prototypes_dir
        return Path(given) if given is not None else self.run / "prototypes"

    def prototype_widths(self) -> list[int]:
        """The widths the prototypes stage builds: the space's candidate widths below 16 bits."""
        from search_spaces.space import DEFAULT_BITS

        return sorted({int(b) for b in (self.exp.space or {}).get("bits", DEFAULT_BITS) if b < 16})

    def prototypes(self) -> None:
        """``prototypes/``: one uniform retrained model per candidate width (``pipeline.prototypes``)."""
        from nas.pipeline.prototypes import INDEX, build_prototypes, prototype_file

        widths = self.prototype_widths()
        if self.exp.pipeline.prototypes_dir is not None:
            from nas.pipeline.prototypes import verify_prototypes

            # given, not built here: checked, never retrained (their index hash feeds later stages)
            verify_prototypes(self.prototype_dir, widths, self.fp_checkpoint)
            self.log(f"prototypes: using {self.prototype_dir} (widths {widths})")
            return
        retrain_cfg = dataclasses.replace(self.exp.retrain, method=self.method)
        inputs = {"widths": widths, "retrain": section_inputs(retrain_cfg), "data": self.data,
                  "fp": self._fp_hash(), "corpus": self.corpus_hash}
        artifacts = [self.prototype_dir / INDEX, *(prototype_file(self.prototype_dir, b) for b in widths)]
        # no work_dir: build_prototypes keeps unchanged widths and restarts a width whose inputs changed
        self._stage("prototypes", inputs, artifacts, None, lambda: build_prototypes(
            self.exp, self.corpus, self.fp_checkpoint, widths, self.prototype_dir, method=self.method,
            device=self.device, checkpoint_every=self.checkpoint_every))

    def prototype_points(self) -> list[Point]:
        """One result row per prototype (strategy ``prototype``, budget = its width), when built."""
        if not self.exp.pipeline.uses_prototypes:
            return []
        return [Point("prototype", float(b)) for b in self.prototype_widths()]

    def evaluate_prototypes(self) -> None:
        """``eval/prototype_b<B>.json``: each prototype as a uniform point of the report.

        The perplexities are the prototype run's whole-split measurement of its ``best.pt``,
        which the packed file holds bit for bit (retraining ends on its table); sizes come from
        the packed file.
        """
        from nas.pipeline.prototypes import INDEX, prototype_file, read_index

        for point in self.prototype_points():
            bits = int(point.budget)
            packed = prototype_file(self.prototype_dir, bits)
            out = self.run / "eval" / f"{point.label}.json"
            inputs = {"label": point.label, "packed": self._content_hash(packed, file_sha256),
                      "index": self._content_hash(self.prototype_dir / INDEX, file_sha256), "model": self.model_name}

            def write(packed: Path = packed, point: Point = point, bits: int = bits, out: Path = out) -> None:
                entry = read_index(self.prototype_dir)["prototypes"][str(bits)]
                model, precision = load_packed(packed)
                size = model_size(model, precision)
                # the report reads each row's map (bits plot), from the run folder as for searched rows
                map_file = self.run / "search" / point.label / "precision.yaml"
                map_file.parent.mkdir(parents=True, exist_ok=True)
                precision.save(map_file)
                atomic_write_json(out, {
                    "model": self.model_name, "strategy": point.strategy, "budget": point.budget,
                    "avg_bits": size["avg_bits"], "theoretical_bytes": math.ceil(size["theoretical_bytes"]),
                    "packed_bytes": packed.stat().st_size, "compression": size["compression"],
                    "valid_ppl": entry["valid_ppl"], "test_ppl": entry["test_ppl"], "wer": None,
                    "search_s": None, "retrain_s": None,
                    "precision": str(map_file.relative_to(self.run))})

            self._stage(f"eval/{point.label}", inputs, [out], None, write)

    def _prototype_inputs(self) -> dict[str, Any]:
        from nas.pipeline.prototypes import INDEX

        return {"prototypes": self._content_hash(self.prototype_dir / INDEX, file_sha256)}

    def search(self, point: Point) -> None:
        """``search/<label>/precision.yaml`` (kl and hessian on the prototypes when there are any)."""
        out_dir = self.run / "search" / point.label
        settings = dataclasses.replace(self.exp.search, strategy=point.strategy)
        on_prototypes = (self.exp.pipeline.uses_prototypes and self.exp.pipeline.search_on_prototypes
                         and point.strategy in ("kl", "hessian", "gumbel"))
        inputs = {"label": point.label, "budget": point.budget, "space": self.exp.space, "data": self.data,
                  "search": settings_used(settings, point.strategy), "fp": self._fp_hash(), "corpus": self.corpus_hash,
                  **(self._prototype_inputs() if on_prototypes else {})}
        self._stage(f"search/{point.label}", inputs, [out_dir / "precision.yaml"], out_dir, lambda: search_point(
            self.exp, self.corpus, self.fp_checkpoint, point, out_dir / "precision.yaml",
            cache_dir=self.run / "cache" / "scores", device=self.device,
            prototypes=self.prototype_dir if on_prototypes else None))

    def given_map(self, point: Point, precision: PrecisionMap) -> None:
        """``search/<label>/precision.yaml`` from a map chosen outside mpnas (e.g. an NNI tuner)."""
        out = self.run / "search" / point.label / "precision.yaml"
        inputs = {"label": point.label, "budget": point.budget, "given": precision_hash(precision),
                  "fp": self._fp_hash()}

        def write() -> None:
            precision.validate(load_model(self.fp_checkpoint))
            meta = {**precision.meta, "strategy": point.strategy, "budget": {"avg_bits": point.budget},
                    "label": point.label}
            precision.with_meta(meta).save(out)

        self._stage(f"search/{point.label}", inputs, [out], out.parent, write)

    def retrain(self, point: Point) -> None:
        """``retrain/<label>/{best.pt, metrics.json, model.mpq}``."""
        out_dir = self.run / "retrain" / point.label
        precision_file = self.run / "search" / point.label / "precision.yaml"
        retrain_cfg = dataclasses.replace(self.exp.retrain, method=self.method)
        inherited = retrain_cfg.init == "inherited"
        inputs = {"label": point.label, "retrain": section_inputs(retrain_cfg), "data": self.data,
                  "fp": self._fp_hash(), "precision": precision_hash(PrecisionMap.load(precision_file)),
                  "corpus": self.corpus_hash, **(self._prototype_inputs() if inherited else {})}
        artifacts = [out_dir / name for name in ("best.pt", "metrics.json", "model.mpq")]
        self._stage(f"retrain/{point.label}", inputs, artifacts, out_dir, lambda: retrain_point(
            self.exp, self.corpus, self.fp_checkpoint, precision_file, out_dir, method=self.method,
            device=self.device, checkpoint_every=self.checkpoint_every,
            prototypes=self.prototype_dir if inherited else None))

    def search_seconds(self, point: Point) -> float | None:
        """Seconds of the search, counting the original scoring time of a reused score table."""
        seconds = self.state.seconds(f"search/{point.label}")
        meta = PrecisionMap.load(self.run / "search" / point.label / "precision.yaml").meta
        if seconds is not None and meta.get("scores_cached"):
            seconds = round(seconds + float(meta.get("score_seconds", 0.0)), 3)
        return seconds

    def evaluate(self, point: Point) -> None:
        """``eval/<label>.json``: the retrained model's row, measured on its packed file."""
        out = self.run / "eval" / f"{point.label}.json"
        packed = self.run / "retrain" / point.label / "model.mpq"
        rel = f"search/{point.label}/precision.yaml"
        inputs = {"label": point.label, "packed": self._content_hash(packed, file_sha256), "precision": rel,
                  "model": self.model_name, "data": self.data, "corpus": self.corpus_hash}
        self._stage(f"eval/{point.label}", inputs, [out], None, lambda: atomic_write_json(out, quantized_row(
            self.exp, self.corpus, packed, point, self.model_name, precision_rel=rel,
            search_s=self.search_seconds(point), retrain_s=self.state.seconds(f"retrain/{point.label}"),
            device=self.device)))
        self._refresh_times(point, out)

    def _refresh_times(self, point: Point, row_file: Path) -> None:
        """Keep a row's stage times current: a search rerun that finds the same map leaves the
        row's evaluation up to date, but its time is the new search's."""
        row = json.loads(row_file.read_text())
        times = {"search_s": self.search_seconds(point), "retrain_s": self.state.seconds(f"retrain/{point.label}")}
        if any(row.get(k) != v for k, v in times.items()):
            atomic_write_json(row_file, {**row, **times})

    def prune(self, points: list[Point]) -> None:
        """Remove result rows of labels no longer planned (their search/retrain output stays as a cache)."""
        keep = {"fp.json", *(f"{p.label}.json" for p in points)}
        for row in sorted((self.run / "eval").glob("*.json")):
            if row.name not in keep:
                row.unlink()
                self.state.drop(f"eval/{row.stem}")
                self.log(f"removed the stale row {row.relative_to(self.run)}")

    def report(self) -> None:
        """``report/`` via :func:`evaluators.report.write_report`."""
        out_dir = self.run / "report"
        rows = sorted((self.run / "eval").glob("*.json"))
        inputs = {"rows": {p.name: file_sha256(p) for p in rows}}
        self._stage("report", inputs, [out_dir / "results.csv", out_dir / "report.html"], out_dir,
                    lambda: write_report_of(self.run, out_dir))


def write_report_of(run_dir: Path, out_dir: Path) -> None:
    """Call ``evaluators.report.write_report([run_dir], out_dir)``, with a clear error if it is missing."""
    try:
        from evaluators.report import write_report
    except ImportError as exc:
        raise PipelineError(f"the report stage needs evaluators.report.write_report ({exc}); every other "
                            f"stage is done and its rows are in {run_dir / 'eval'}") from exc
    write_report([run_dir], out_dir)


def run_pipeline(config: str | Path | ExperimentConfig, out: str | Path, *, data: str | Path | None = None,
                 checkpoint: str | Path | None = None, device: str = "cpu", strategies: list[str] | None = None,
                 budgets: list[float] | None = None, include_uniform: bool | None = None,
                 retrain_method: str | None = None, report: bool = True, prune: bool = True,
                 checkpoint_every: int = 200, command: str | None = None,
                 log: Callable[[str], None] = logger.info) -> list[dict[str, Any]]:
    """Run (or resume) the whole pipeline into ``out``; returns the result rows (``eval/*.json``).

    ``config`` is a file, a packaged name (``quick``) or a parsed config. ``strategies``,
    ``budgets``, ``include_uniform`` and ``retrain_method`` override the ``pipeline`` section
    (an NNI trial: ``strategies=["kl"], budgets=[2.0], include_uniform=False, report=False``).
    ``checkpoint`` skips FP training. ``prune`` drops rows of labels no longer planned.
    Before the run folder is touched, :func:`nas.pipeline.preflight.check_pipeline` checks the space at every
    budget on the untrained model (or the checkpoint's): a bad space is an error in seconds.
    """
    if isinstance(config, ExperimentConfig):
        exp, text = config, None
    else:
        exp = load_config(config)
        text = resolve_config_path(config).read_text(encoding="utf-8")
    overrides = {"strategies": strategies, "budgets": budgets, "include_uniform": include_uniform,
                 "retrain_method": retrain_method}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides:
        try:
            exp = dataclasses.replace(exp, pipeline=dataclasses.replace(exp.pipeline, **overrides))  # re-validated
        except ValueError as exc:
            raise ConfigError(f"{exp.source}: the command-line options make an invalid pipeline section: "
                              f"{exc}") from exc
    if text is None or overrides:
        text = yaml.safe_dump({k: v for k, v in exp.to_dict().items() if v is not None}, sort_keys=False)
    corpus = load_corpus(resolve_data_dir(data or exp.data.path), exp.data.corpus_options())
    # the space at every budget, on the untrained model (or the given checkpoint's), before any training
    check_pipeline(exp, corpus, checkpoint)
    run_dir = Path(out)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", text)
    atomic_write_text(run_dir / "command.txt", (command or shlex.join(sys.argv)).replace("\n", " ") + "\n")
    pipe = Pipeline(exp, run_dir, corpus, checkpoint=None if checkpoint is None else Path(checkpoint),
                    device=device, checkpoint_every=checkpoint_every, log=log)
    points = plan_points(exp.pipeline)
    pipe.total = 2 + int(exp.pipeline.uses_prototypes) + len(pipe.prototype_points()) + 3 * len(points) + int(report)
    pipe.fp()
    pipe.evaluate_fp()
    if exp.pipeline.uses_prototypes:
        pipe.prototypes()
        pipe.evaluate_prototypes()
    for stage in (pipe.search, pipe.retrain, pipe.evaluate):
        for point in points:
            stage(point)
    if prune:
        pipe.prune(points + pipe.prototype_points())
    if report:
        pipe.report()
    return read_rows(run_dir)


