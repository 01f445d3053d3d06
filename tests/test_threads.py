"""Thread defaults that share cores (issue 16, item 4): the rule of nas/core/threads.py and where it applies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import nas.core.threads
from nas.cli.main import main
from nas.core.threads import resolve_threads, threads_per_job
from tests.synthetic import write_synthetic_corpus

TINY = {"model": {"type": "lstm", "embed_dim": 8, "hidden_dim": 8, "num_layers": 1},
        "data": {"batch_size": 4, "bptt": 8, "eval_batch_size": 2},
        "train": {"optimizer": "adam", "lr": 0.02, "schedule": "constant", "epochs": 1, "max_steps_per_epoch": 2},
        "space": {"bits": [1, 2, 4]},
        "budget": {"avg_bits": 2.0}}


@pytest.fixture
def eight_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """An 8-core machine with none of the thread variables set."""
    monkeypatch.setattr(nas.core.threads, "usable_cores", lambda: 8)
    for name in ("MPNAS_THREADS", "OMP_NUM_THREADS", "MPNAS_JOBS"):
        monkeypatch.delenv(name, raising=False)


def test_share_of_the_cores() -> None:
    assert threads_per_job(1, cores=8) == 8
    assert threads_per_job(3, cores=8) == 2
    assert threads_per_job(16, cores=8) == 1  # never 0
    with pytest.raises(ValueError, match="jobs must be >= 1"):
        threads_per_job(0, cores=8)


def test_rule_order() -> None:
    assert resolve_threads(3, jobs=4, env={"MPNAS_THREADS": "5"}, cores=8) == 3  # --threads wins
    assert resolve_threads(None, jobs=4, env={"MPNAS_THREADS": "5", "OMP_NUM_THREADS": "6"}, cores=8) == 5
    assert resolve_threads(None, jobs=4, env={"OMP_NUM_THREADS": "6"}, cores=8) == 6
    assert resolve_threads(None, jobs=4, env={}, cores=8) == 2
    assert resolve_threads(None, env={"MPNAS_JOBS": "2"}, cores=8) == 4
    assert resolve_threads(None, env={}, cores=8) == 8  # one job alone: all usable cores


@pytest.mark.parametrize(("env", "requested", "message"), [
    ({"MPNAS_THREADS": "zero"}, None, "MPNAS_THREADS='zero': expected a positive integer"),
    ({"MPNAS_JOBS": "0"}, None, "MPNAS_JOBS='0': expected a positive integer"),
    ({}, 0, "--threads 0: expected a positive integer"),
])
def test_bad_values_name_the_variable(env: dict[str, str], requested: int | None, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        resolve_threads(requested, env=env, cores=8)


def test_usable_cores_is_at_most_torch_default() -> None:
    assert 1 <= nas.core.threads.usable_cores() <= nas.core.threads._TORCH_DEFAULT_THREADS


def test_cli_applies_the_rule(eight_cores: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """`mpnas train` beside another job (MPNAS_JOBS=2) takes half the cores; --threads overrides."""
    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    monkeypatch.setenv("MPNAS_JOBS", "2")
    missing = str(tmp_path / "missing.yaml")
    assert main(["train", missing]) == 2  # fails on the config, after the threads are set
    assert main(["train", missing, "--threads", "3"]) == 2
    assert calls == [4, 3]


def test_nni_trials_get_cores_over_concurrency(eight_cores: None, tmp_path: Path) -> None:
    """Without --threads each of 4 concurrent NNI trials gets 8 // 4 = 2 threads, written into the trial spec."""
    corpus = write_synthetic_corpus(tmp_path / "corpus")
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({**TINY, "nni": {"concurrency": 4}}, sort_keys=False))
    out = tmp_path / "out"
    args = ["nni", str(config), "--out", str(out), "--data", str(corpus), "--emit-config", str(tmp_path / "e.yml")]
    assert main(args) == 0
    assert json.loads((out / "nni" / "spec.json").read_text())["threads"] == 2
    assert main([*args, "--threads", "1"]) == 0
    assert json.loads((out / "nni" / "spec.json").read_text())["threads"] == 1
