"""One NNI trial: ``python -m nas.nni.trial --spec OUT/nni/spec.json [--params JSON]``.

The launcher (:mod:`nas.nni.launcher`) writes the spec; NNI starts this module once per trial
with ``NNI_TRIAL_JOB_ID`` set. The trial merges NNI's parameters (``nni.get_next_parameter()``)
over ``--params`` and the config's own settings, so it also runs standalone: outside NNI the
parameters are ``{}`` and the result is only logged.

Its run folder ``<spec.out>/<trial_id>/`` is what ``mpnas report`` reads:

- hparams mode: the derived experiment file (one strategy, one budget, the parameters applied
  to the ``search`` / ``retrain`` sections) goes through ``mpnas pipeline`` in a subprocess,
  which writes ``config.yaml command.txt eval/ search/`` into the run folder;
- bits mode: ``search/nni_<trial>/precision.yaml`` is the tuner's map, retrained
  (:func:`nas.retrain.run.retrain`), packed (:func:`search_spaces.packed.export_packed`) and scored
  on the packed file's model; ``eval/nni_<trial>.json`` is written here.

Both add ``nni_trial.json``: trial id, parameters, final result. Failures raise (the trial is
FAILED and its traceback is in NNI's ``trial.stderr``); a diverged training run is a result
(objective :data:`nas.nni.space.DIVERGED_OBJECTIVE`), not a failure.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from nas.core.console import configure_logging
from nas.core.errors import MpnasError
from nas.nni.space import SPEC_VERSION, config_budget, final_result, hparam_target, objective
from search_spaces.models import restore_model

log = logging.getLogger(__name__)

DIVERGED_MARK = "training diverged"  # in every TrainingDivergedError message (nas/retrain/loop.py)


def load_spec(path: str | Path) -> dict[str, Any]:
    """The launcher's spec file (checked for its version)."""
    spec = json.loads(Path(path).read_text(encoding="utf-8"))
    if spec.get("version") != SPEC_VERSION:
        raise MpnasError(f"{path}: trial spec version {spec.get('version')!r}, this mpnas reads {SPEC_VERSION}")
    return spec


def _coerce(value: Any, annotation: str) -> Any:
    """NNI returns floats for q* distributions; int fields get ints, float fields floats."""
    if annotation.startswith("int") and isinstance(value, float) and value.is_integer():
        return int(value)
    if annotation.startswith("float") and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def derive_config(raw: Mapping[str, Any], params: Mapping[str, Any], default_budget: float) -> dict[str, Any]:
    """hparams mode: the experiment file of one trial.

    ``strategy`` and ``budget`` (average bits) become ``pipeline.strategies`` / ``pipeline.budgets``
    (one each, no uniform baseline) and ``search.strategy``; ``retrain.<key>`` goes to
    ``retrain``; any other key to ``search``. Missing ``strategy`` / ``budget`` keep the
    config's ``search.strategy`` and ``default_budget``.
    """
    from nas.config.sections import RetrainSection, SearchSection

    types = {"search": {f.name: str(f.type) for f in dataclasses.fields(SearchSection)},
             "retrain": {f.name: str(f.type) for f in dataclasses.fields(RetrainSection)}}
    derived = copy.deepcopy(dict(raw))
    sections = {name: dict(derived.get(name) or {}) for name in ("search", "retrain", "pipeline")}
    strategy = params.get("strategy", sections["search"].get("strategy", "gumbel"))
    budget = float(params.get("budget", default_budget))
    for key, value in params.items():
        section, name = hparam_target(key)
        if section != "special":
            sections[section][name] = _coerce(value, types[section][name])
    sections["search"]["strategy"] = strategy
    sections["pipeline"].update({"strategies": [strategy], "budgets": [budget], "include_uniform": False})
    derived.update(sections)
    return derived


def diverged_result() -> dict[str, Any]:
    """What a trial whose training diverged reports: a finite, bad objective."""
    return {"default": objective(math.inf, 0.0, None, 0.0), "diverged": True, "ppl": None, "size_bytes": None,
            "avg_bits": None}


def _trial_ids() -> tuple[str, str | None]:
    trial = os.environ.get("NNI_TRIAL_JOB_ID")
    if not trial or trial == "STANDALONE":
        trial = time.strftime("standalone-%Y%m%d-%H%M%S")
    return trial, os.environ.get("NNI_EXP_ID")


def _write_json(path: Path, data: Any) -> None:
    from nas.core.atomic import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _command_text(spec_path: str, params: Mapping[str, Any], trial: str, exp_id: str | None) -> str:
    command = shlex.join([sys.executable, "-m", "nas.nni.trial", "--spec", str(spec_path)])
    return (f"{command}\n# NNI trial {trial} of experiment {exp_id or '(standalone)'}; parameters:\n"
            f"# {json.dumps(dict(params), sort_keys=True)}\n")


# --------------------------------------------------------------------------------------------
# hparams mode


def _pipeline_command(spec: Mapping[str, Any], config: Path, run: Path) -> list[str]:
    command = [sys.executable, "-m", "nas.cli.main", "pipeline", str(config), "--out", str(run), "--data", spec["data"],
               "--no-report"]
    if spec.get("checkpoint"):
        command += ["--checkpoint", spec["checkpoint"]]
    if spec.get("device") and spec["device"] != "cpu":
        command += ["--device", spec["device"]]
    if spec.get("threads"):
        command += ["--threads", str(spec["threads"])]
    return command


def pick_row(rows: Mapping[str, Mapping[str, Any]], strategy: str) -> tuple[str, Mapping[str, Any]]:
    """The evaluated row of the trial's strategy among the pipeline's rows (label -> row)."""
    mine = [(label, row) for label, row in sorted(rows.items()) if row.get("strategy") == strategy]
    if not mine:
        raise RuntimeError(f"the pipeline wrote no eval row for strategy {strategy!r} "
                           f"(rows: {', '.join(sorted(rows)) or 'none'})")
    return mine[0]


def run_hparams_trial(spec: Mapping[str, Any], params: Mapping[str, Any], run: Path) -> dict[str, Any]:
    """Run ``mpnas pipeline`` on the derived config; returns the final result."""
    from nas.config.sections import load_config

    exp = load_config(spec["config"])
    raw = yaml.safe_load(Path(spec["config"]).read_text(encoding="utf-8"))
    default_budget = config_budget(exp)
    derived = derive_config(raw, params, default_budget)
    if spec.get("retrain_method"):
        derived["pipeline"]["retrain_method"] = spec["retrain_method"]
    config = Path(spec["derived"]) / run.name / Path(spec["config"]).name  # same stem: same model name
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(derived, sort_keys=False), encoding="utf-8")
    command = _pipeline_command(spec, config, run)
    log.info("running: %s", shlex.join(command))
    proc = subprocess.run(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, check=False)
    log.info("%s", proc.stdout)
    (config.parent / "pipeline.log").write_text(proc.stdout, encoding="utf-8")
    strategy = derived["pipeline"]["strategies"][0]
    budget = derived["pipeline"]["budgets"][0]
    if proc.returncode != 0:
        if DIVERGED_MARK in proc.stdout:
            return diverged_result()
        raise RuntimeError(f"mpnas pipeline exited {proc.returncode}: {shlex.join(command)}\n"
                           + "\n".join(proc.stdout.rstrip().splitlines()[-30:]))
    rows = {p.stem: json.loads(p.read_text(encoding="utf-8")) for p in sorted((run / "eval").glob("*.json"))}
    label, row = pick_row(rows, strategy)
    value = objective(float(row[spec["objective"]]), float(row["avg_bits"]), budget, float(spec["penalty"]))
    return {**final_result(value, row, spec["objective"]), "label": label}


# --------------------------------------------------------------------------------------------
# bits mode


def default_bits_params(space: Any) -> dict[str, int]:
    """Standalone bits-mode parameters: each free cluster at the budget's whole bits (or its fewest)."""
    budget = space.budget
    bits = int(budget.value) if budget is not None and budget.kind == "avg_bits" else 0
    chosen = space.uniform_map(bits) if bits >= 1 else space.smallest_map()
    return {name: chosen.bits[name] for name in space.free}


def run_bits_trial(spec: Mapping[str, Any], params: Mapping[str, Any], run: Path, trial: str) -> dict[str, Any]:
    """Retrain, pack and evaluate the tuner's map; writes the eval row; returns the final result."""
    from nas.config.sections import load_config
    from nas.core.data import load_corpus
    from nas.retrain.distributed import DistInfo, resolve_device
    from nas.retrain.hooks import TrainingDivergedError
    from nas.retrain.run import load_fp_checkpoint, retrain
    from search_spaces.space import BYTES_PER_MB, SearchSpace

    exp = load_config(spec["config"])
    corpus = load_corpus(Path(spec["data"]), exp.data.corpus_options())
    ckpt = load_fp_checkpoint(spec["checkpoint"], corpus)
    model = restore_model(ckpt)
    space = SearchSpace.from_config(exp.space, exp.budget, model, exp.source)
    chosen = space.from_nni_params({**default_bits_params(space), **params})
    label = f"nni_{trial}"
    meta = {"strategy": f"nni_{spec['tuner'].lower()}", "tuner": spec["tuner"], "trial": trial,
            "budget": dict(exp.budget or {}), "checkpoint": spec["checkpoint"]}
    precision = chosen.with_meta(meta)
    map_path = run / "search" / label / "precision.yaml"
    map_path.parent.mkdir(parents=True, exist_ok=True)
    precision.save(map_path)
    retrain_dir = run / "retrain" / label
    device = resolve_device(spec.get("device") or "cpu", DistInfo())
    pipeline = getattr(exp, "pipeline", None)
    method = spec.get("retrain_method") or getattr(pipeline, "retrain_method", None) or exp.retrain.method
    started = time.perf_counter()
    try:
        retrain(exp, corpus, spec["checkpoint"], precision, retrain_dir, method=method, device=str(device),
                progress=False)
    except TrainingDivergedError as exc:
        log.info("diverged: %s", exc)
        return diverged_result()
    retrain_s = time.perf_counter() - started
    (retrain_dir / "checkpoint.pt").unlink(missing_ok=True)  # resume state (optimizer too); no trial resumes
    model.load_state_dict(load_fp_checkpoint(retrain_dir / "best.pt")["model"])
    packed = retrain_dir / "model.mpq"
    size, ppl = _packed_measurements(model, precision, packed, corpus, exp, device)
    budget = space.budget
    row = {"model": spec["model_name"], "strategy": meta["strategy"],
           "budget": float(budget.value) if budget is not None and budget.kind == "avg_bits" else None,
           "avg_bits": size["avg_bits"], "theoretical_bytes": math.ceil(size["theoretical_bytes"]),
           "packed_bytes": packed.stat().st_size, "compression": size["compression"],
           "valid_ppl": ppl["valid"], "test_ppl": ppl["test"], "wer": None, "search_s": None,
           "retrain_s": retrain_s, "precision": str(map_path.relative_to(run)),
           "nni_trial": trial, "nni_parameters": dict(params), "within_budget": space.fits_budget(precision)}
    _write_json(run / "eval" / f"{label}.json", row)
    used, limit = _budget_use(space, size)
    value = objective(ppl[spec["objective"].removesuffix("_ppl")], used, limit, float(spec["penalty"]))
    result = {**final_result(value, row, spec["objective"]), "label": label, "within_budget": row["within_budget"]}
    log.info("%s: avg bits %.3f, %.4f MB, valid ppl %.2f, test ppl %.2f, objective %.3f", label, size["avg_bits"],
             size["theoretical_bytes"] / BYTES_PER_MB, ppl["valid"], ppl["test"], value)
    return result



def _packed_measurements(model: Any, precision: Any, packed: Path, corpus: Any, exp: Any, device: Any
                         ) -> tuple[dict[str, float], dict[str, float]]:
    """Pack the retrained model, reload it and measure it: its sizes and valid/test perplexity."""
    from evaluators.perplexity import perplexity
    from search_spaces.packed import export_packed, load_packed
    from search_spaces.size import model_size

    export_packed(model, precision, packed)
    quantized, _ = load_packed(packed)
    quantized.to(device)
    size = model_size(quantized, precision)
    ppl = {split: perplexity(quantized, corpus.split(split), corpus.vocab.eos_id, batch_size=exp.data.eval_batch_size,
                             bptt=exp.data.bptt, stride=exp.data.eval_stride, device=device)["ppl"]
           for split in ("valid", "test")}
    return size, ppl


def _budget_use(space: Any, size: Mapping[str, float]) -> tuple[float, float | None]:
    """What the objective's penalty compares: the map's use of the budget's kind, and the limit (None: none)."""
    budget = space.budget
    if budget is None:
        return 0.0, None
    if budget.kind == "avg_bits":
        return size["avg_bits"], budget.value
    return size["theoretical_bytes"], budget.max_bytes(space)


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Entry point of one trial."""
    parser = argparse.ArgumentParser(prog="python -m nas.nni.trial", description=__doc__.splitlines()[0])
    parser.add_argument("--spec", required=True, help="OUT/nni/spec.json written by `mpnas nni`")
    parser.add_argument("--params", default="{}", help="JSON parameters under NNI's (standalone runs)")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        import nni
    except ImportError:  # standalone outside the NNI venv: --params only, the result is printed
        if os.environ.get("NNI_TRIAL_JOB_ID"):
            raise ImportError(f"this NNI trial runs under {sys.executable}, which cannot import nni; "
                              "emit the experiment with --python pointing at the NNI venv's python") from None
        nni = None

    spec = load_spec(args.spec)
    if spec.get("threads"):
        import torch

        torch.set_num_threads(int(spec["threads"]))
    params = {**json.loads(args.params), **((nni.get_next_parameter() if nni else None) or {})}
    trial, exp_id = _trial_ids()
    run = Path(spec["out"]) / trial
    run.mkdir(parents=True, exist_ok=True)
    record = {"trial_id": trial, "experiment_id": exp_id, "mode": spec["mode"], "parameters": params, "result": None}
    _write_json(run / "nni_trial.json", record)
    if spec["mode"] == "bits":
        (run / "config.yaml").write_text(Path(spec["config"]).read_text(encoding="utf-8"), encoding="utf-8")
        (run / "command.txt").write_text(_command_text(args.spec, params, trial, exp_id), encoding="utf-8")
        result = run_bits_trial(spec, params, run, trial)
    else:
        result = run_hparams_trial(spec, params, run)
        (run / "nni_command.txt").write_text(_command_text(args.spec, params, trial, exp_id), encoding="utf-8")
    # NNI's manager stores JSON: no NaN / inf in the reported dict.
    reported = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in result.items()}
    _write_json(run / "nni_trial.json", {**record, "result": reported})
    if nni is not None:
        nni.report_final_result(reported)
    print(f"trial {trial}: reported {json.dumps(reported)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
