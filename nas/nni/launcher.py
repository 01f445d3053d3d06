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

import dataclasses
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

from nas.config.sections import ConfigError, ExperimentConfig
from nas.core.threads import resolve_threads
from nas.nni.outcome import collect_results, tail, trial_failure_text, tuner_error
from nas.nni.space import (
    SPEC_VERSION,
    NniSettings,
    bits_space,
    config_budget,
    hparams_space,
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


def run_experiment(prepared: Prepared, settings: NniSettings, *, port: int | None = None, keep_going: bool = False,
                   poll_s: float = 1.0, log: Any = None) -> dict[str, Any]:
    """Start the NNI experiment, wait for it, always stop it; raise NniRunError on failure.

    Returns a summary: experiment id, port, trial statuses, results (see :func:`collect_results`).
    ``log`` receives the progress lines (default: this module's logger, at INFO).
    """
    log = log or logger.info
    from nni.experiment import Experiment, ExperimentConfig

    config = ExperimentConfig(**prepared.config)
    work_dir = Path(prepared.config["experimentWorkingDirectory"])
    experiment = Experiment(config)
    port = port or free_port()
    started = time.monotonic()
    deadline = started + settings.max_seconds + GRACE_S
    experiment.start(port)
    try:
        log(f"NNI experiment {experiment.id}: {settings.tuner}, {settings.trials} trials, {settings.mode} mode, "
            f"web UI http://127.0.0.1:{port} (the manager listens on all interfaces)")
        status, statuses, problem = _watch(experiment, port, work_dir, settings, deadline, keep_going=keep_going,
                                           poll_s=poll_s)
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


def _watch(experiment: Any, port: int, work_dir: Path, settings: NniSettings, deadline: float, *, keep_going: bool,
           poll_s: float) -> tuple[str, dict[str, str], str | None]:
    """Poll a started experiment until it ends, a trial fails, the tuner errs or the deadline passes.

    Returns its last status, the trials' statuses and what went wrong (None if nothing did).
    """
    from nni.experiment import rest as nni_rest

    status, statuses, problem = "INITIALIZED", {}, None
    while True:
        status = nni_rest.get(port, "/check-status").get("status", "UNKNOWN")
        statuses = {j.trialJobId: j.status for j in experiment.list_trial_jobs()}
        if any(s in FAILED_STATES for s in statuses.values()) and not keep_going:
            break
        if (problem := tuner_error(work_dir, experiment.id)) is not None or status in FINAL_STATES:
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
    return status, statuses, problem
