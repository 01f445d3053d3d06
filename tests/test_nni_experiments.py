"""``mpnas nni`` against a real NNI 3.0: experiments on localhost (each with its own HOME, so NNI's
registry ``~/nni-experiments`` stays in the test folder): a 2-trial run of the launcher, ``nnictl
create`` on an emitted YAML, a failing trial, and the scale-out examples. They skip where NNI is
missing; run them in the NNI venv::

    .venv-nni/bin/python -m pytest -q tests/test_nni_launcher.py tests/test_nni_experiments.py
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from nas.nni.launcher import PROJECT_ROOT
from nas.nni.outcome import collect_results
from tests.nni_fixtures import _config, needs_nni

# --------------------------------------------------------------------------------------------
# NNI: real experiments on localhost


def _env(home: Path) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    return {**{k: v for k, v in os.environ.items() if not k.startswith("NNI_")}, "HOME": str(home),
            "OMP_NUM_THREADS": "1"}


def _mpnas(args: list[str], env: dict[str, str], timeout: int = 400) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nas.cli.main", *args], cwd=PROJECT_ROOT, env=env, capture_output=True,
                          text=True, check=False, timeout=timeout)


@needs_nni
def test_two_trial_experiment_on_localhost(nni_fp: dict[str, Path], tmp_path: Path) -> None:
    from evaluators.report import write_report

    out = tmp_path / "out"
    done = _mpnas(["nni", str(_config(tmp_path)), "--mode", "bits", "--tuner", "TPE", "--trials", "2",
                   "--concurrency", "2", "--max-seconds", "300", "--seed", "1", "--out", str(out),
                   "--checkpoint", str(nni_fp["checkpoint"]), "--data", str(nni_fp["corpus"]), "--threads", "1"],
                  _env(tmp_path / "home"))
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert f"mpnas report {out.resolve()}/trials/* --out" in done.stdout
    summary = json.loads((out / "nni" / "results.json").read_text())
    assert summary["status"] == "DONE" and sorted(summary["trials"].values()) == ["SUCCEEDED", "SUCCEEDED"]
    trials = sorted(summary["trials"])
    assert sorted(p.name for p in (out / "trials").iterdir()) == trials
    report = write_report(sorted((out / "trials").iterdir()), tmp_path / "report")
    with report.files["results.csv"].open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(r["run"] for r in rows) == trials and {r["strategy"] for r in rows} == {"nni_tpe"}
    for record in summary["results"]:  # each trial evaluated the map it was given
        run = out / "trials" / record["trial_id"]
        bits = yaml.safe_load((run / "search" / f"nni_{record['trial_id']}" / "precision.yaml").read_text())["bits"]
        assert all(bits[k] == v for k, v in record["parameters"].items()) and len(record["parameters"]) == 10
        assert record["result"]["default"] >= record["result"]["ppl"] > 1


@needs_nni
def test_nnictl_runs_the_emitted_config(nni_fp: dict[str, Path], tmp_path: Path) -> None:
    from nni.experiment import rest

    out, target, env = tmp_path / "out", tmp_path / "exp.yml", _env(tmp_path / "home")
    done = _mpnas(["nni", str(_config(tmp_path)), "--mode", "hparams", "--tuner", "Random", "--trials", "2",
                   "--max-seconds", "300", "--out", str(out), "--checkpoint", str(nni_fp["checkpoint"]),
                   "--data", str(nni_fp["corpus"]), "--threads", "1", "--emit-config", str(target)], env)
    assert done.returncode == 0, done.stderr
    nnictl = str(Path(sys.executable).parent / "nnictl")
    from nas.nni.launcher import free_port

    port = free_port()
    created = subprocess.run([nnictl, "create", "--config", str(target), "--port", str(port)], env=env,
                             capture_output=True, text=True, check=False, timeout=120)
    assert created.returncode == 0, created.stdout + created.stderr
    exp_id = rest.get(port, "/experiment")["id"]
    try:
        deadline = time.monotonic() + 300
        while rest.get(port, "/check-status")["status"] not in ("DONE", "STOPPED", "ERROR"):
            assert time.monotonic() < deadline, "nnictl experiment did not finish in 300 s"
            time.sleep(1)
        jobs = rest.get(port, "/trial-jobs")
        assert sorted(j["status"] for j in jobs) == ["SUCCEEDED", "SUCCEEDED"], jobs
    finally:
        subprocess.run([nnictl, "stop", exp_id], env=env, capture_output=True, text=True, check=False, timeout=120)
    results = collect_results(out / "trials")
    assert sorted(r["trial_id"] for r in results) == sorted(j["trialJobId"] for j in jobs)
    for record in results:
        assert record["result"]["label"] == "gumbel_b2"
        assert (out / "trials" / record["trial_id"] / "eval" / "gumbel_b2.json").is_file()


@needs_nni
def test_a_failing_trial_fails_the_launcher_with_its_stderr(nni_fp: dict[str, Path], tmp_path: Path) -> None:
    # a broken checkpoint is now refused before NNI starts (exit 2); a trial that fails while it
    # runs is what reaches NNI: here its retraining diverges
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    common = ["--mode", "hparams", "--trials", "2", "--max-seconds", "300", "--data", str(nni_fp["corpus"]),
              "--threads", "1"]
    early = _mpnas(["nni", str(_config(tmp_path)), *common, "--out", str(tmp_path / "early"), "--checkpoint",
                    str(broken)], _env(tmp_path / "home"))
    assert early.returncode == 2 and "not a readable mpnas checkpoint" in early.stderr
    out = tmp_path / "out"
    exploding = tmp_path / "exploding-python"  # the trials' interpreter: fails with a message on stderr
    exploding.write_text("#!/bin/sh\necho 'trial exploded: no such module' >&2\nexit 3\n")
    exploding.chmod(0o755)
    done = _mpnas(["nni", str(_config(tmp_path)), *common, "--out", str(out), "--checkpoint", str(nni_fp["checkpoint"]),
                   "--python", str(exploding)], _env(tmp_path / "home"))
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "NNI trial(s) failed" in done.stderr and "trial.stderr" in done.stderr
    assert "trial exploded: no such module" in done.stderr
    summary = json.loads((out / "nni" / "results.json").read_text())
    assert "FAILED" in summary["trials"].values()
    # the experiment was stopped: no NNI manager is left on its port
    from nni.experiment import rest

    with pytest.raises(Exception):  # noqa: B017 - connection refused, whatever requests calls it
        rest.get(summary["port"], "/check-status")


@needs_nni
def test_scale_out_examples_load(tmp_path: Path) -> None:
    """The remote and Kubernetes YAML of docs/scale-out.md pass NNI's own validation (paths made local)."""
    from nni.experiment import ExperimentConfig

    text = (PROJECT_ROOT / "docs" / "scale-out.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "experimentName" in b]
    assert sorted(b["trainingService"]["platform"] for b in blocks) == ["frameworkcontroller", "remote"]
    (tmp_path / "space.json").write_text(json.dumps({"x": {"_type": "choice", "_value": [1]}}))
    (tmp_path / "key").write_text("not a key")
    for raw in blocks:
        raw.update(searchSpaceFile=str(tmp_path / "space.json"), trialCodeDirectory=str(tmp_path),
                   experimentWorkingDirectory=str(tmp_path / "work"))
        for machine in raw["trainingService"].get("machineList", []):
            machine["sshKeyFile"] = str(tmp_path / "key")
        ExperimentConfig(**raw).validate()
