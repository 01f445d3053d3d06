"""``mpnas nni``: hyperparameter or bit-width search with NNI 3.0 (HPO experiments, local training service).

Two modes (``--mode`` or ``nni.mode``):

- ``hparams`` (mode a): NNI tunes the search settings (strategy, budget, the ``search`` keys such
  as the gumbel knobs ``lambda_kp lambda_lr arch_lr tau_start tau_end epochs``, and
  ``retrain.<key>``). Each trial writes a derived experiment file (one strategy, one budget, the
  parameters applied) and runs ``mpnas pipeline`` on it into its run folder.
- ``bits`` (mode b): NNI picks a bit width per cluster directly over
  :meth:`search_spaces.space.SearchSpace.to_nni`; each trial retrains that map, packs it and
  evaluates it through the Python API.

Every trial's run folder is ``OUT/trials/<trial_id>/`` in the layout ``mpnas report`` reads
(``config.yaml command.txt eval/<label>.json search/<label>/precision.yaml``), plus
``nni_trial.json`` (its parameters and final result). The objective NNI minimises is
:func:`objective`: perplexity, multiplied up when a map exceeds its budget.

The optional ``nni`` section of an experiment file (all keys optional, CLI options win)::

    nni:
      mode: hparams          # hparams | bits
      tuner: TPE             # TPE | Random | Evolution
      trials: 10             # maxTrialNumber
      concurrency: 1         # trialConcurrency
      max_seconds: 21600     # wall-clock limit of the experiment
      objective: valid_ppl   # valid_ppl | test_ppl (tune on valid; test is for reporting)
      penalty: 10.0          # objective = ppl * (1 + penalty * relative excess over the budget)
      seed: null             # TPE / Random seed
      population_size: 16    # Evolution
      space:                 # hparams mode: NNI search-space entries (default: DEFAULT_HPARAMS_SPACE)
        strategy: {_type: choice, _value: [gumbel]}
        budget: {_type: choice, _value: [2.0]}          # average bits (pipeline budgets)
        lambda_kp: {_type: loguniform, _value: [1.0, 100.0]}
        retrain.lr: {_type: loguniform, _value: [0.001, 0.1]}

This module imports ``nni`` only inside :func:`run_experiment`; everything else is pure so the
main environment (without NNI) can build, check and emit experiments.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import shlex
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from nas.config.sections import ConfigError, ExperimentConfig, load_config
from nas.core.threads import resolve_threads
from nas.nni.space import (  # re-exported: the launcher's public names
    MODES,
    SPEC_VERSION,
    TUNERS,
    NniSettings,
    bits_space,
    config_budget,
    hparams_space,
    load_settings,
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # holds nas/: trials run `-m nas.nni.trial` from here
FAILED_STATES = ("FAILED", "SYS_CANCELED")
FINAL_STATES = ("DONE", "STOPPED", "ERROR")
GRACE_S = 60  # past max_seconds, for NNI to end the experiment itself

logger = logging.getLogger(__name__)


class NniRunError(RuntimeError):
    """An experiment failed: a trial failed, the tuner crashed, or nothing finished in time."""


# --------------------------------------------------------------------------------------------
# Experiment configuration (NNI v2 schema, camelCase: the YAML nnictl reads and Experiment takes)


def trial_command(spec_path: Path, python: str | None = None) -> str:
    """The shell command of every trial: this interpreter, absolute paths."""
    return shlex.join([python or sys.executable, "-m", "nas.nni.trial", "--spec", str(spec_path)])


def tuner_config(settings: NniSettings) -> dict[str, Any]:
    """``tuner`` entry: minimise the objective (Evolution's default is maximise)."""
    args: dict[str, Any] = {}
    if settings.tuner in ("TPE", "Evolution"):
        args["optimize_mode"] = "minimize"
    if settings.tuner in ("TPE", "Random") and settings.seed is not None:
        args["seed"] = settings.seed
    if settings.tuner == "Evolution":
        args["population_size"] = settings.population_size
    return {"name": settings.tuner, "classArgs": args}


def experiment_dict(settings: NniSettings, search_space: Mapping[str, Any], spec_path: Path, work_dir: Path,
                    name: str, python: str | None = None) -> dict[str, Any]:
    """The experiment config for the local training service."""
    return {
        "experimentName": name,
        "searchSpace": dict(search_space),
        "trialCommand": trial_command(spec_path, python),
        "trialCodeDirectory": str(PROJECT_ROOT),
        "trialConcurrency": settings.concurrency,
        "maxTrialNumber": settings.trials,
        "maxExperimentDuration": f"{settings.max_seconds}s",
        "experimentWorkingDirectory": str(work_dir),
        "tuner": tuner_config(settings),
        "trainingService": {"platform": "local"},
    }


def emit_yaml(config: Mapping[str, Any]) -> str:
    """The experiment as an NNI v2 YAML file for ``nnictl create --config``."""
    head = ("# NNI 3.0 experiment written by `mpnas nni --emit-config`.\n"
            "# Run: nnictl create --config THIS.yml --port PORT   (then: nnictl stop EXPERIMENT_ID)\n"
            "# Trials write OUT/trials/<trial_id>/; afterwards: mpnas report OUT/trials/* --out OUT/report\n")
    return head + yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=None, width=100)


def free_port() -> int:
    """A TCP port nothing listens on now (NNI's manager binds all interfaces)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


# --------------------------------------------------------------------------------------------
# Preparing OUT


@dataclass(frozen=True)
class Prepared:
    """What the launcher wrote into OUT before starting NNI."""

    out: Path
    spec_path: Path
    search_space: dict[str, Any]
    config: dict[str, Any]


def check_hparams_trials(exp: ExperimentConfig, search_space: Mapping[str, Any], checkpoint: str | None,
                         data: Path, retrain_method: str | None = None) -> None:
    """Before NNI starts (hparams mode): the config's space at every budget a trial can get, on the
    untrained model (or the checkpoint's), and the sections a trial's pipeline checks together.
    Each tuned value was checked against its key's range by :func:`hparams_space`."""
    from nas.core.data import load_corpus
    from nas.pipeline.preflight import check_pipeline

    if "budget" in search_space:
        budgets = [(f"nni.space.budget._value[{i}]", float(b)) for i, b in enumerate(search_space["budget"]["_value"])]
    else:
        key = "budget.avg_bits" if exp.budget and "avg_bits" in exp.budget else "pipeline.budgets[0]"
        budgets = [(key, config_budget(exp))]
    if retrain_method is not None:  # --method: what every trial's pipeline retrains with
        exp = dataclasses.replace(exp, pipeline=dataclasses.replace(exp.pipeline, retrain_method=retrain_method))
    check_pipeline(exp, load_corpus(data, exp.data.corpus_options()), checkpoint, budgets)


def prepare(exp: ExperimentConfig, settings: NniSettings, out: Path, *, checkpoint: str | None, data: Path,
            device: str = "cpu", threads: int | None = None, retrain_method: str | None = None,
            python: str | None = None) -> Prepared:
    """Check the inputs, build the search space, write ``OUT/nni/`` (config copy, spec).

    Hparams mode also checks what every trial's pipeline would check after its FP training: the
    config's space at each budget a trial can get, on the untrained model (or ``checkpoint``'s),
    and each tuned value against its key's range (:func:`check_hparams_trials`).

    ``threads`` None: each trial gets usable cores // ``settings.concurrency`` (or $MPNAS_THREADS /
    $OMP_NUM_THREADS), so that concurrent trials do not oversubscribe the cores (nas/core/threads.py).
    """
    out = out.resolve()
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise FileNotFoundError(f"--checkpoint {checkpoint}: no such file")
    if settings.mode == "bits":
        if checkpoint is None:
            raise ConfigError("bits mode needs --checkpoint (the FP best.pt whose clusters NNI assigns bits to)")
        search_space = bits_space(exp, checkpoint)
    else:
        search_space = hparams_space(exp, settings)
        check_hparams_trials(exp, search_space, checkpoint, data, retrain_method)
    meta = out / "nni"
    meta.mkdir(parents=True, exist_ok=True)
    (out / "trials").mkdir(exist_ok=True)
    stem = Path(exp.source).stem
    config_copy = meta / f"{stem}.yaml"
    source = Path(exp.source)
    text = source.read_text(encoding="utf-8") if source.is_file() else yaml.safe_dump(exp.to_dict(), sort_keys=False)
    config_copy.write_text(text, encoding="utf-8")
    spec = {"version": SPEC_VERSION, "mode": settings.mode, "tuner": settings.tuner, "model_name": stem,
            "config": str(config_copy), "checkpoint": str(Path(checkpoint).resolve()) if checkpoint else None,
            "data": str(data.resolve()), "out": str(out / "trials"), "derived": str(meta / "derived"),
            "objective": settings.objective, "penalty": settings.penalty, "device": device,
            # trials share this machine: each gets its share of the cores unless told otherwise
            "threads": threads if threads is not None else resolve_threads(jobs=settings.concurrency),
            "retrain_method": retrain_method}
    spec_path = meta / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=2) + "\n", encoding="utf-8")
    (meta / "search_space.json").write_text(json.dumps(search_space, indent=2) + "\n", encoding="utf-8")
    config = experiment_dict(settings, search_space, spec_path, meta / "experiments",
                             f"mpnas-{stem}-{settings.mode}", python)
    return Prepared(out, spec_path, search_space, config)


# --------------------------------------------------------------------------------------------
# Running (the only place that imports nni)


def tail(path: Path, lines: int = 40, chars: int = 4000) -> str:
    """The last lines of a log file ('' if absent)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])[-chars:]


def trial_log_dir(work_dir: Path, exp_id: str, trial_id: str) -> Path | None:
    """NNI's folder of one trial (local: ``<work>/<exp>/environments/local-env/trials/<id>``)."""
    found = sorted((work_dir / exp_id).glob(f"**/trials/{trial_id}"))
    return found[0] if found else None


def trial_failure_text(work_dir: Path, exp_id: str, trial_id: str) -> str:
    """The stderr tail of a failed trial (NNI 3.0 writes ``trial.stderr``; its ``stderrPath`` is wrong)."""
    folder = trial_log_dir(work_dir, exp_id, trial_id)
    if folder is None:
        return f"(no log folder for trial {trial_id} under {work_dir / exp_id})"
    for name in ("trial.stderr", "stderr", "trial.log"):
        text = tail(folder / name)
        if text:
            return f"{folder / name}:\n{text}"
    return f"(trial {trial_id} left no output in {folder})"


def tuner_error(work_dir: Path, exp_id: str) -> str | None:
    """A traceback in the dispatcher (tuner) log, e.g. a result without 'default'; None if none."""
    log = work_dir / exp_id / "log" / "dispatcher.log"
    text = tail(log, lines=60, chars=6000)
    return f"{log}:\n{text[text.find('Traceback'):]}" if "Traceback" in text else None


def collect_results(trials_dir: Path, experiment_id: str | None = None) -> list[dict[str, Any]]:
    """Every trial's ``nni_trial.json`` (its own parameters and result), best objective first.

    With ``experiment_id``, only that experiment's trials (an OUT reused by several runs).

    The trials' own records are used, not NNI's ``export_data()``: with concurrent trials
    NNI 3.0 can pair parameters with the wrong trial there (seen in 2 of 3 small runs).
    """
    results = []
    for path in sorted(trials_dir.glob("*/nni_trial.json")):
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("result") is not None and experiment_id in (None, record.get("experiment_id")):
            results.append(record)
    return sorted(results, key=lambda r: r["result"]["default"])


def run_experiment(prepared: Prepared, settings: NniSettings, *, port: int | None = None, keep_going: bool = False,
                   poll_s: float = 1.0, log: Any = None) -> dict[str, Any]:
    """Start the NNI experiment, wait for it, always stop it; raise NniRunError on failure.

    Returns a summary: experiment id, port, trial statuses, results (see :func:`collect_results`).
    ``log`` receives the progress lines (default: this module's logger, at INFO).
    """
    log = log or logger.info
    from nni.experiment import Experiment, ExperimentConfig
    from nni.experiment import rest as nni_rest

    config = ExperimentConfig(**prepared.config)
    work_dir = Path(prepared.config["experimentWorkingDirectory"])
    experiment = Experiment(config)
    port = port or free_port()
    started = time.monotonic()
    deadline = started + settings.max_seconds + GRACE_S
    status, statuses, problem = "INITIALIZED", {}, None
    experiment.start(port)
    try:
        log(f"NNI experiment {experiment.id}: {settings.tuner}, {settings.trials} trials, {settings.mode} mode, "
            f"web UI http://127.0.0.1:{port} (the manager listens on all interfaces)")
        while True:
            status = nni_rest.get(port, "/check-status").get("status", "UNKNOWN")
            jobs = experiment.list_trial_jobs()
            statuses = {j.trialJobId: j.status for j in jobs}
            failed = [t for t, s in statuses.items() if s in FAILED_STATES]
            if failed and not keep_going:
                break
            if (problem := tuner_error(work_dir, experiment.id)) is not None:
                break
            if status in FINAL_STATES:
                break
            if time.monotonic() > deadline:
                problem = (f"the experiment was still {status} {settings.max_seconds + GRACE_S} s after its start "
                           f"(max_seconds {settings.max_seconds} + {GRACE_S} s grace); stopped it")
                break
            time.sleep(poll_s)
        if status == "ERROR" and problem is None:
            errors = nni_rest.get(port, "/check-status").get("errors") or []
            problem = "NNI reported ERROR: " + ("; ".join(map(str, errors)) or "no message")
            problem += "\n" + (tuner_error(work_dir, experiment.id) or tail(work_dir / experiment.id / "log" /
                                                                              "nnimanager.log", lines=20))
    finally:
        experiment.stop()
    elapsed = time.monotonic() - started
    results = collect_results(prepared.out / "trials", experiment.id)
    summary = {"experiment_id": experiment.id, "port": port, "status": status, "elapsed_s": elapsed,
               "max_trials": settings.trials,
               "trials": statuses, "results": results, "work_dir": str(work_dir)}
    (prepared.out / "nni" / "results.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    failed = [t for t, s in statuses.items() if s in FAILED_STATES]
    if failed:
        first = failed[0]
        raise NniRunError(f"{len(failed)} of {len(statuses)} NNI trial(s) failed ({', '.join(failed)}); "
                          f"stderr of trial {first}:\n{trial_failure_text(work_dir, experiment.id, first)}")
    if problem is not None:
        raise NniRunError(f"NNI experiment {experiment.id}: {problem}")
    if not results:
        raise NniRunError(f"NNI experiment {experiment.id} ended {status} with no trial result "
                          f"(trials: {statuses or 'none'}); logs in {work_dir / experiment.id / 'log'}")
    return summary


# --------------------------------------------------------------------------------------------
# Command line


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
    p.add_argument("--method", choices=["admm", "ste"],
                   help="retraining method (default: pipeline.retrain_method, else retrain.method)")
    p.add_argument("--keep-going", action="store_true", help="do not stop at the first failed trial")
    p.add_argument("--emit-config", metavar="EXP_YML", help="write the NNI YAML for `nnictl create` and exit")
    p.add_argument("--python", help="interpreter of the trials (default: this one); it must import nni and mpnas")
    p.set_defaults(func=cmd_nni)
    return p
