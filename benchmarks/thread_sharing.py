"""Two training jobs side by side: torch's default threads vs the core-sharing rule (nas/core/threads.py).

    MPNAS_DATA=../shared/data/ptb .venv/bin/python benchmarks/thread_sharing.py --steps 300

Starts two ``mpnas train`` jobs at once on the same machine, first with torch's default threads
(every job takes all usable cores: what ``--threads`` defaulted to before issue 16), then with the
rule (``MPNAS_JOBS=2``: each job takes usable cores // 2), and reports each job's training steps
per minute (from its ``metrics.json``: training time only, validation excluded) and the ratio
rule / default of the medians. The jobs train ``--config`` (default the packaged ``ptb_lstm``)
for ``--steps`` steps of one epoch, on the corpus with valid/test cut to their first 100 lines so
that validation does not dominate. Rows go to ``benchmarks/results/threads.csv``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from nas.config.sections import load_config
from nas.core.atomic import atomic_write_csv
from nas.core.data import resolve_data_dir
from nas.core.threads import resolve_threads, usable_cores

HERE = Path(__file__).resolve().parent
COLUMNS = ["mode", "job", "threads", "usable_cores", "steps", "train_seconds", "steps_per_min"]
THREAD_VARIABLES = ("MPNAS_THREADS", "OMP_NUM_THREADS", "MPNAS_JOBS", "MKL_NUM_THREADS")
log = logging.getLogger("thread_sharing")


def _small_corpus(data: Path, folder: Path) -> Path:
    """The corpus with its full train split and the first 100 lines of valid and test."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.txt").symlink_to(data / "train.txt")
    for split in ("valid", "test"):
        lines = (data / f"{split}.txt").read_text(encoding="utf-8").splitlines(keepends=True)[:100]
        (folder / f"{split}.txt").write_text("".join(lines), encoding="utf-8")
    return folder


def _run_pair(mode: str, config: Path, corpus: Path, work: Path) -> list[dict[str, object]]:
    """Start two jobs at once in ``mode`` (default | rule) and return one row per job."""
    env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
    if mode == "rule":
        env["MPNAS_JOBS"] = "2"
    threads = resolve_threads(None, env=env)
    jobs = []
    for job in range(2):
        out = work / f"{mode}_{job}"
        command = [sys.executable, "-m", "nas.cli.main", "train", str(config), "--data", str(corpus), "--out", str(out),
                   "--no-progress"]
        jobs.append((out, subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                           text=True)))
    rows = []
    for job, (out, process) in enumerate(jobs):
        _, stderr = process.communicate()
        if process.returncode:
            raise RuntimeError(f"{mode} job {job} failed ({process.returncode}):\n{stderr[-2000:]}")
        metrics = json.loads((out / "metrics.json").read_text())
        epoch = metrics["history"][0]
        exp = load_config(str(config))
        step_tokens = exp.data.batch_size * exp.data.bptt
        steps = exp.train.max_steps_per_epoch
        seconds = steps * step_tokens / epoch["tokens_per_s"]
        rows.append({"mode": mode, "job": job, "threads": threads, "usable_cores": usable_cores(), "steps": steps,
                     "train_seconds": f"{seconds:.1f}", "steps_per_min": f"{60 * steps / seconds:.1f}"})
        log.info("%s job %d: %d threads, %.1f steps/min", mode, job, threads, 60 * steps / seconds)
    return rows


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="ptb_lstm", help="experiment YAML or packaged name")
    parser.add_argument("--steps", type=int, default=300, help="training steps per job")
    parser.add_argument("--data")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "threads.csv")
    args = parser.parse_args()
    exp = load_config(args.config)
    raw = exp.to_dict()
    raw["train"] = {**raw["train"], "epochs": 1, "max_steps_per_epoch": args.steps}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        config = work / "threads.yaml"
        config.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
        corpus = _small_corpus(Path(resolve_data_dir(args.data)).resolve(), work / "corpus")
        rows = _run_pair("default", config, corpus, work) + _run_pair("rule", config, corpus, work)
    atomic_write_csv(args.out, COLUMNS, rows)
    median = {m: statistics.median(float(r["steps_per_min"]) for r in rows if r["mode"] == m)
              for m in ("default", "rule")}
    log.info("median steps/min: default %.1f, rule %.1f, ratio rule/default %.2f",
             median["default"], median["rule"], median["rule"] / median["default"])


if __name__ == "__main__":
    main()
