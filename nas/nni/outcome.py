"""What an NNI experiment left behind: trial logs, tuner errors, the trials' result files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


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
