"""``mpnas pipeline``: the run-folder layout, skipping, partial reruns, kill/resume, config errors."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

import nas.pipeline.stages
from nas.cli.main import main
from nas.config.sections import ConfigError, load_config
from nas.pipeline.runner import run_pipeline, write_report_of
from nas.pipeline.stages import ROW_KEYS
from nas.pipeline.state import PipelineError, read_rows
from search_spaces.packed import load_packed
from search_spaces.precision import PrecisionMap
from tests.pipeline_helpers import TINY, ran_stages, run_tiny, write_config

REPO = Path(__file__).resolve().parents[1]
LABELS = {"kl_b2", "kl_b4", "gumbel_b2", "gumbel_b4", "uniform_b2", "uniform_b4"}
TIMES = ("search_s", "retrain_s")


def _without_times(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in row.items() if k not in TIMES} for row in rows]


def _csv_without_times(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return [{k: v for k, v in row.items() if k not in TIMES} for row in csv.DictReader(handle)]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> tuple[Path, list[str]]:
    """One complete tiny pipeline (kl and gumbel at 2 and 4 bits, plus uniform), and its progress lines."""
    root = tmp_path_factory.mktemp("full")
    return root / "run", run_tiny(root, TINY, corpus_dir)


def _copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def test_full_pipeline_writes_the_run_layout(full_run: tuple[Path, list[str]]) -> None:
    run, lines = full_run
    assert (run / "command.txt").read_text() == "mpnas pipeline tiny.yaml\n"
    assert yaml.safe_load((run / "config.yaml").read_text()) == TINY
    for name in ("fp/best.pt", "fp/metrics.json", "eval/fp.json", "report/results.csv", "report/pareto.png",
                 "report/bits.png", "report/report.html"):
        assert (run / name).is_file(), name
    for label in LABELS:
        assert (run / "search" / label / "precision.yaml").is_file()
        for name in ("best.pt", "metrics.json", "model.mpq"):
            assert (run / "retrain" / label / name).is_file(), f"{label}/{name}"
    state = json.loads((run / "state.json").read_text())
    expected = {"fp", "eval/fp", "report", *(f"{s}/{lb}" for s in ("search", "retrain", "eval") for lb in LABELS)}
    assert set(state) == expected == ran_stages(lines)
    assert all(entry["done"] and entry["seconds"] >= 0 and len(entry["inputs_hash"]) == 64
               for entry in state.values())
    assert lines[0].startswith("[1/21] fp") and lines[-1].startswith("[21/21] report: done in")

    rows = {(r["strategy"], r["budget"]): r for r in read_rows(run)}
    assert len(rows) == 7 and all(tuple(sorted(r)) == tuple(sorted(ROW_KEYS)) for r in rows.values())
    fp = rows[("fp", None)]
    assert fp["model"] == "tiny" and fp["avg_bits"] == 32 and fp["compression"] == 1.0
    assert fp["precision"] is None and fp["packed_bytes"] is None
    for (strategy, budget), row in rows.items():
        if strategy == "fp":
            continue
        label = f"{strategy}_b{budget:g}"
        assert row["precision"] == f"search/{label}/precision.yaml"
        assert row["avg_bits"] <= budget and row["compression"] > 1 and row["wer"] is None
        assert row["packed_bytes"] == (run / "retrain" / label / "model.mpq").stat().st_size
        assert row["search_s"] >= 0 and row["retrain_s"] == state[f"retrain/{label}"]["seconds"]
        model, precision = load_packed(run / "retrain" / label / "model.mpq")
        assert dict(precision.bits) == dict(PrecisionMap.load(run / row["precision"]).bits)
    assert rows[("uniform", 2.0)]["avg_bits"] == 2.0 and rows[("uniform", 4.0)]["avg_bits"] == 4.0
    assert len(_csv_without_times(run / "report" / "results.csv")) == 7


def _refuse(*args: object, **kwargs: object) -> None:
    raise AssertionError("a stage ran that should have been skipped")


def test_rerun_skips_every_stage(full_run: tuple[Path, list[str]], corpus_dir: Path, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    run = _copy(full_run[0], tmp_path)
    before = (run / "state.json").read_text()
    for name in ("train", "retrain", "get_strategy", "perplexity", "export_packed"):
        monkeypatch.setattr(nas.pipeline.stages, name, _refuse)
    monkeypatch.setattr("nas.pipeline.runner.write_report_of", _refuse)
    lines: list[str] = []
    rows = run_pipeline(write_config(tmp_path, TINY), run, data=corpus_dir, log=lines.append)
    assert len(lines) == 21 and all(line.endswith(": up to date") for line in lines)
    assert (run / "state.json").read_text() == before
    assert rows == read_rows(full_run[0])  # seconds too: skipped stages keep the original times


def test_changing_budgets_reruns_only_the_new_points(full_run: tuple[Path, list[str]], corpus_dir: Path,
                                                     tmp_path: Path) -> None:
    run = _copy(full_run[0], tmp_path)
    lines: list[str] = []
    raw = {**TINY, "pipeline": {**TINY["pipeline"], "budgets": [2, 3]}}
    rows = run_pipeline(write_config(tmp_path, raw), run, data=corpus_dir, log=lines.append)
    new = {"kl_b3", "gumbel_b3", "uniform_b3"}
    assert ran_stages(lines) == {f"{s}/{lb}" for s in ("search", "retrain", "eval") for lb in new} | {"report"}
    assert {r["strategy"] + (f"_b{r['budget']:g}" if r["budget"] else "") for r in rows} == \
        {"fp", "kl_b2", "gumbel_b2", "uniform_b2", *new}
    assert not (run / "eval" / "kl_b4.json").exists() and (run / "retrain" / "kl_b4" / "model.mpq").exists()
    old = {(r["strategy"], r["budget"]): r for r in read_rows(full_run[0])}
    assert all(r == old[(r["strategy"], r["budget"])] for r in rows if r["budget"] in (None, 2.0))
    assert len(_csv_without_times(run / "report" / "results.csv")) == 7


def test_changing_one_strategys_settings_reruns_only_its_searches(
        full_run: tuple[Path, list[str]], corpus_dir: Path, tmp_path: Path) -> None:
    run = _copy(full_run[0], tmp_path)
    raw = {**TINY, "search": {**TINY["search"], "kl_tokens": 150}}  # a kl setting: gumbel must not rerun
    lines: list[str] = []
    run_pipeline(write_config(tmp_path, raw), run, data=corpus_dir, log=lines.append)
    searches = {name for name in ran_stages(lines) if name.startswith("search/")}
    assert searches == {"search/kl_b2", "search/kl_b4"}
    # whether or not the new maps differ, the rows carry the new searches' times
    state = json.loads((run / "state.json").read_text())
    rows = {(r["strategy"], r["budget"]): r for r in read_rows(run)}
    assert rows[("kl", 2.0)]["search_s"] == state["search/kl_b2"]["seconds"]
    assert rows[("gumbel", 2.0)]["search_s"] == state["search/gumbel_b2"]["seconds"]


def test_changing_retraining_reruns_retrain_and_later(full_run: tuple[Path, list[str]], corpus_dir: Path,
                                                      tmp_path: Path) -> None:
    run = _copy(full_run[0], tmp_path)
    lines: list[str] = []
    raw = {**TINY, "retrain": {**TINY["retrain"], "lr": 0.005}, "pipeline": {"strategies": ["kl"], "budgets": [2]}}
    run_pipeline(write_config(tmp_path, raw), run, data=corpus_dir, log=lines.append, report=False)
    assert ran_stages(lines) == {"retrain/kl_b2", "retrain/uniform_b2", "eval/kl_b2", "eval/uniform_b2"}
    assert sorted(p.stem for p in (run / "eval").glob("*.json")) == ["fp", "kl_b2", "uniform_b2"]


def test_given_checkpoint_replaces_fp_training(full_run: tuple[Path, list[str]], corpus_dir: Path,
                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(nas.pipeline.stages, "train", _refuse)  # FP training must not run; retraining does its own
    fp = full_run[0] / "fp" / "best.pt"
    run = tmp_path / "run"
    rows = run_pipeline(write_config(tmp_path, TINY), run, data=corpus_dir, checkpoint=fp,
                        strategies=["uniform"], budgets=[4.0], include_uniform=False, report=False, log=lambda _: None)
    source = json.loads((run / "fp" / "source.json").read_text())
    assert source["path"] == str(fp.resolve()) and len(source["sha256"]) == 64
    assert not (run / "fp" / "best.pt").exists()
    assert [r["strategy"] for r in rows] == ["fp", "uniform"]
    assert rows[0] == read_rows(full_run[0])[0]
    assert yaml.safe_load((run / "config.yaml").read_text())["pipeline"]["strategies"] == ["uniform"]


# --- killed and restarted --------------------------------------------------------------------

KILL = {**TINY, "retrain": {**TINY["retrain"], "max_steps_per_epoch": 40},
        "pipeline": {"strategies": ["kl"], "budgets": [2]}}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    run_pipeline(write_config(root, KILL), root / "run", data=corpus_dir, log=lambda _: None)
    return root / "run"


def _pipeline_cmd(config: Path, run: Path, corpus: Path) -> list[str]:
    return [sys.executable, "-m", "nas.cli.main", "pipeline", str(config), "--out", str(run), "--data", str(corpus),
            "--threads", "1"]


@pytest.mark.slow  # two subprocess runs each: about 10 s
@pytest.mark.parametrize(("sig", "trigger"), [(signal.SIGTERM, "fp/best.pt"),
                                              (signal.SIGKILL, "retrain/kl_b2/best.pt")])
def test_killed_pipeline_resumes_to_the_same_results(sig: signal.Signals, trigger: str, uninterrupted: Path,
                                                     corpus_dir: Path, tmp_path: Path) -> None:
    """Killed once an artifact of a training stage appears (that stage is half done), then restarted."""
    config, run = write_config(tmp_path, KILL), tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_pipeline_cmd(config, run, corpus_dir), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (run / trigger).exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == (128 + sig if sig == signal.SIGTERM else -sig), out
    assert not (run / "report" / "results.csv").exists()
    state = json.loads((run / "state.json").read_text())
    assert any(not entry["done"] for entry in state.values())  # killed inside a stage

    again = subprocess.run(_pipeline_cmd(config, run, corpus_dir), cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "(resuming)" in again.stdout
    assert again.stdout.strip().splitlines()[-1] == f"report: {run / 'report' / 'report.html'}"
    assert _without_times(read_rows(run)) == _without_times(read_rows(uninterrupted))
    assert _csv_without_times(run / "report" / "results.csv") == \
        _csv_without_times(uninterrupted / "report" / "results.csv")


# --- errors and the command line -------------------------------------------------------------

@pytest.mark.parametrize(("section", "key"), [
    ({"strategies": ["kl", "nope"]}, "pipeline.strategies[1]"),
    ({"strategies": []}, "pipeline.strategies"),
    ({"budgets": [2, -1]}, "pipeline.budgets[1]"),
    ({"budgets": [2, 2.0]}, "pipeline.budgets[1]"),
    ({"budgets": "2"}, "pipeline.budgets"),
    ({"retrain_method": "sgd"}, "pipeline.retrain_method"),
    ({"include_uniform": "yes"}, "pipeline.include_uniform"),
    ({"colour": 1}, "pipeline.colour"),
])
def test_bad_pipeline_section_names_file_and_key(section: dict[str, Any], key: str, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, {**TINY, "pipeline": section})
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert str(config) in str(info.value) and key in str(info.value)
    assert main(["pipeline", str(config), "--out", str(tmp_path / "run")]) == 2
    assert key in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_missing_report_module_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "evaluators.report", None)  # import fails
    with pytest.raises(PipelineError, match=r"evaluators\.report\.write_report.*rows are in"):
        write_report_of(tmp_path, tmp_path / "report")


def test_quickstart_runs_the_pipeline_on_quick(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[tuple[str, str]] = []

    def fake(config: str, args: Any, default_out: Path) -> Path:
        calls.append((config, args.out))
        return Path(args.out)

    monkeypatch.setattr("nas.cli.main.run_from_args", fake)
    assert main(["quickstart", "--out", str(tmp_path / "qs")]) == 0
    assert calls == [("quick", str(tmp_path / "qs"))]
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith(str(tmp_path / "qs" / "report" / "report.html"))
    quick = load_config("quick")
    assert quick.pipeline.strategies == ["kl", "gumbel"] and quick.pipeline.budgets == [2.0, 4.0]


def test_stages_one_by_one_with_a_given_map(full_run: tuple[Path, list[str]], corpus_dir: Path,
                                            tmp_path: Path) -> None:
    """What an NNI trial does: a map chosen elsewhere, retrained and evaluated into its own folder."""
    from nas.core.data import load_corpus
    from nas.pipeline.runner import Pipeline
    from nas.pipeline.stages import Point, load_model

    fp = full_run[0] / "fp" / "best.pt"
    pipe = Pipeline(load_config(write_config(tmp_path, TINY)), tmp_path / "trial", load_corpus(corpus_dir),
                    checkpoint=fp, log=lambda _: None)
    point = Point("nni", 8.0)
    pipe.fp()
    pipe.given_map(point, PrecisionMap.uniform(load_model(fp), 8))
    pipe.retrain(point)
    pipe.evaluate(point)
    (row,) = read_rows(tmp_path / "trial")
    assert row["strategy"] == "nni" and row["budget"] == 8.0 and row["avg_bits"] == 8.0
    assert row["precision"] == "search/nni_b8/precision.yaml"
    assert set(json.loads((tmp_path / "trial" / "state.json").read_text())) == {
        "fp", "search/nni_b8", "retrain/nni_b8", "eval/nni_b8"}


# --- checked before any training (issue 14) ---------------------------------------------------

@pytest.mark.parametrize(("change", "key"), [
    ({"space": {"bits": [1, 2, 4, 8], "overrides": [{"match": "layers.*.forget_gat.*", "bits": [4]}]}},
     "space.overrides[0].match"),
    ({"space": {"bits": [1, 2], "keep_fp": ["decodr"]}}, "space.keep_fp[0]"),
    ({"space": {"bits": [1, 2, 4], "colour": "red"}}, "space.colour"),
    ({"space": {"bits": [2, 4, 8]}, "pipeline": {"strategies": ["kl"], "budgets": [4, 1.5]}}, "pipeline.budgets[1]"),
    ({"budget": {"avg_bits": 1.0}, "space": {"bits": [2, 4]}}, "budget.avg_bits"),
    ({"search": {"kl_tokens": -5}}, "search.kl_tokens"),
    ({"search": {"arch_fraction": 2}}, "search.arch_fraction"),
    ({"search": {"tau_start": 0.5, "tau_end": 5.0}}, "search.tau_end"),
    ({"search": {"hessian_max_iters": 3}, "pipeline": {"strategies": ["hessian"]}}, "search.hessian_max_iters"),
    ({"retrain": {**TINY["retrain"], "epochs": 0}}, "retrain.epochs"),
    ({"retrain": {**TINY["retrain"], "admm_forward": "latent", "learn_scales": True},
      "pipeline": {"strategies": ["kl"], "retrain_method": "admm"}}, "'retrain.learn_scales' = True"),
    ({"space": {"bits": [16, 32]}, "pipeline": {"strategies": ["kl"], "budgets": [16], "prototypes": True}},
     "pipeline.prototypes"),
])
def test_bad_space_or_setting_exits_2_before_any_training(change: dict[str, Any], key: str, corpus_dir: Path,
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`mpnas pipeline` checks the config and the space, on the untrained model, within seconds."""
    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the pipeline started training before it checked the config")

    monkeypatch.setattr("nas.pipeline.runner.train_fp", no_training)
    config = write_config(tmp_path, {**TINY, **change})
    start = time.perf_counter()
    assert main(["pipeline", str(config), "--out", str(tmp_path / "run"), "--data", str(corpus_dir)]) == 2
    assert time.perf_counter() - start < 5
    err = capsys.readouterr().err
    assert err.startswith("mpnas: error: ") and str(config) in err and key in err, err
    assert not (tmp_path / "run").exists()


def test_bad_space_is_checked_on_the_given_checkpoint(full_run: tuple[Path, list[str]], corpus_dir: Path,
                                                      tmp_path: Path) -> None:
    from search_spaces.space_parsing import SpaceError

    raw = {**TINY, "space": {"bits": [1, 2, 4], "overrides": [{"match": "embeding", "bits": [4]}]}}
    with pytest.raises(SpaceError, match=r"space\.overrides\[0\]\.match: 'embeding' matches no cluster; did you "
                       "mean embedding"):
        run_pipeline(write_config(tmp_path, raw), tmp_path / "run", data=corpus_dir,
                     checkpoint=full_run[0] / "fp" / "best.pt", command="x")
    assert not (tmp_path / "run").exists()


def test_the_command_exits_2_within_5_seconds(corpus_dir: Path, tmp_path: Path) -> None:
    """The acceptance check of issue 14, as a user runs it: a typo in space.overrides."""
    raw = {**TINY, "train": {**TINY["train"], "epochs": 50, "max_steps_per_epoch": None},
           "space": {"bits": [1, 2, 4, 8], "overrides": [{"match": "layers.0.forget_gate.hhh", "bits": [8]}]}}
    config = write_config(tmp_path, raw)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "nas.cli", "pipeline", str(config), "--out", str(tmp_path / "run"),
                           "--data", str(corpus_dir)], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    seconds = time.monotonic() - start
    assert done.returncode == 2, done.stderr
    assert "space.overrides[0].match" in done.stderr and "did you mean layers.0.forget_gate.hh" in done.stderr
    assert seconds < 5, f"{seconds:.1f} s"
    assert not (tmp_path / "run").exists()
