"""``mpnas nni``: NNI experiments over search settings (hparams mode) or bit widths (bits mode).

The pure tests run in the main venv without NNI: settings, search spaces, the objective, the
emitted YAML, both trial modes run standalone, and that ``import nas.cli.main`` does not import nni.
Real experiments on localhost: tests/test_nni_experiments.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from evaluators.report import parse_row
from nas.cli.main import main
from nas.config.sections import ConfigError, parse_config
from nas.nni.launcher import PROJECT_ROOT, experiment_dict, tuner_config
from nas.nni.outcome import collect_results, trial_failure_text, tuner_error
from nas.nni.space import (
    DEFAULT_GUMBEL_SPACE,
    DIVERGED_OBJECTIVE,
    NniSettings,
    bits_space,
    default_hparams_space,
    hparams_space,
    load_settings,
    objective,
)
from nas.nni.trial import derive_config, pick_row
from tests.nni_fixtures import HAS_NNI, TINY, _config

# --------------------------------------------------------------------------------------------
# pure: no NNI needed


def test_importing_the_cli_does_not_import_nni() -> None:
    code = ("import sys, nas.cli.main, nas.nni.launcher, nas.nni.space, nas.nni.trial; "
            "bad = sorted(m for m in sys.modules if m == 'nni' or m.startswith('nni.')); "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def test_settings_from_the_nni_section_and_the_command_line() -> None:
    exp = parse_config({**TINY, "nni": {"tuner": "Random", "trials": 4, "penalty": 5, "seed": 3}}, "exp.yaml")
    settings = load_settings(exp)
    assert (settings.tuner, settings.trials, settings.penalty, settings.seed) == ("Random", 4, 5.0, 3)
    assert (settings.mode, settings.concurrency, settings.objective) == ("hparams", 1, "valid_ppl")
    settings = load_settings(exp, {"tuner": "Evolution", "trials": None, "mode": "bits"})
    assert (settings.tuner, settings.trials, settings.mode) == ("Evolution", 4, "bits")
    assert load_settings(parse_config(TINY)) == NniSettings()


@pytest.mark.parametrize(("section", "message"), [
    ({"tunr": "TPE"}, "unknown key 'nni.tunr'"),
    ({"tuner": "GP"}, "'nni.tuner' = 'GP' must be one of"),
    ({"trials": 0}, "'nni.trials' = 0 must be >= 1"),
    ({"trials": "many"}, "'nni.trials' = 'many' has the wrong type"),
    ({"objective": "wer"}, "'nni.objective' = 'wer' must be one of"),
    ({"space": [1, 2]}, "'nni.space' = [1, 2] must be a mapping"),
])
def test_bad_settings_name_the_key(section: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        load_settings(parse_config({**TINY, "nni": section}, "exp.yaml"))
    assert "exp.yaml" in str(info.value)


def test_nni_section_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match="section 'nni' must be a mapping"):
        parse_config({**TINY, "nni": [1]}, "exp.yaml")


def test_default_hparams_space_tunes_gumbel_at_the_config_budget() -> None:
    exp = parse_config({**TINY, "budget": {"avg_bits": 3.0}})
    space = hparams_space(exp, NniSettings())
    assert space == default_hparams_space(exp)
    assert space["strategy"] == {"_type": "choice", "_value": ["gumbel"]}
    assert space["budget"] == {"_type": "choice", "_value": [3.0]}
    assert set(DEFAULT_GUMBEL_SPACE) <= set(space) and {"lambda_kp", "lambda_lr", "tau_start", "tau_end",
                                                         "arch_lr"} <= set(space)


def test_custom_hparams_space() -> None:
    custom = {"strategy": {"_type": "choice", "_value": ["kl", "hessian"]},
              "budget": {"_type": "choice", "_value": [1.5, 2]},
              "epochs": {"_type": "choice", "_value": [0.5, 1.0]},
              "retrain.lr": {"_type": "loguniform", "_value": [0.001, 0.1]}}
    exp = parse_config({**TINY, "nni": {"space": custom}})
    assert hparams_space(exp, load_settings(exp)) == custom


@pytest.mark.parametrize(("space", "message"), [
    ({"lambda_kpp": {"_type": "uniform", "_value": [1, 2]}}, "'nni.space.lambda_kpp' is not a tunable key"),
    ({"retrain.rhoo": {"_type": "uniform", "_value": [1, 2]}}, "'nni.space.retrain.rhoo' is not a tunable key"),
    ({"search.strategy": {"_type": "choice", "_value": ["kl"]}}, "is not a tunable key"),
    ({"tau_end": {"_type": "beta", "_value": [1, 2]}}, "'nni.space.tau_end._type' = 'beta'"),
    ({"tau_end": {"_type": "uniform"}}, "must be {_type: ..., _value: [...]}"),
    ({"tau_end": {"_type": "uniform", "_value": []}}, "must be a non-empty list"),
    ({"tau_end": {"_type": "uniform", "_value": ["a", "b"]}}, "must hold numbers"),
    ({"strategy": {"_type": "choice", "_value": ["gumbel", "darts"]}}, "'nni.space.strategy' must be a choice"),
    ({"budget": {"_type": "uniform", "_value": [1, 4]}}, "'nni.space.budget' must be a choice"),
    ({"budget": {"_type": "choice", "_value": [0, 2]}}, "average bits in (0, 32]"),
    ({}, "'nni.space' is empty"),
])
def test_bad_hparams_space_names_the_key(space: dict[str, Any], message: str) -> None:
    exp = parse_config({**TINY, "nni": {"space": space}}, "exp.yaml")
    with pytest.raises(ConfigError, match=re.escape(message)):
        hparams_space(exp, load_settings(exp))


@pytest.mark.parametrize(("space", "message"), [
    ({"arch_fraction": {"_type": "uniform", "_value": [0.05, 2.0]}},
     "'nni.space.arch_fraction._value' = [0.05, 2.0]: 2.0 is not a valid 'search.arch_fraction' (must be in (0, 1))"),
    ({"retrain.epochs": {"_type": "choice", "_value": [0, 1]}},
     "'nni.space.retrain.epochs._value' = [0, 1]: 0 is not a valid 'retrain.epochs' (must be >= 1)"),
    ({"hessian_max_iters": {"_type": "randint", "_value": [3, 100]}}, "3 is not a valid 'search.hessian_max_iters'"),
    ({"kl_tokens": {"_type": "qloguniform", "_value": [-5, 1000, 1]}}, "-5 is not a valid 'search.kl_tokens'"),
    ({"retrain.distill": {"_type": "uniform", "_value": [0.0, 1.5]}}, "1.5 is not a valid 'retrain.distill'"),
    ({"retrain.optimizer": {"_type": "choice", "_value": ["adam", "rmsprop"]}},
     "'rmsprop' is not a valid 'retrain.optimizer' (must be one of ('sgd', 'adam', 'adamw'))"),
    ({"rescale_every": {"_type": "uniform", "_value": [10, 50]}},
     "'nni.space.rescale_every._type' = 'uniform': 'search.rescale_every' is an integer"),
    ({"tau_end": {"_type": "quniform", "_value": [0.1, 1.0]}}, "quniform takes 3 numbers"),
])
def test_tuned_values_must_fit_their_keys(space: dict[str, Any], message: str) -> None:
    """Every value a trial can get is checked against its key's range before NNI starts (issue 14)."""
    exp = parse_config({**TINY, "nni": {"space": space}}, "exp.yaml")
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        hparams_space(exp, load_settings(exp))
    assert str(info.value).startswith("exp.yaml: ")


@pytest.mark.parametrize(("sections", "message"), [
    ({"space": {"bits": [1, 2, 4], "overrides": [{"match": "layers.*.forget_gat.*", "bits": [4]}]}},
     "space.overrides[0].match: 'layers.*.forget_gat.*' matches no cluster"),
    ({"space": {"bits": [2, 4]}, "nni": {"space": {"budget": {"_type": "choice", "_value": [3.0, 1.0]}}}},
     "(the budget of 'nni.space.budget._value[1]')"),
    ({"space": {"bits": [2, 4]}, "budget": {"avg_bits": 1.0}}, "budget.avg_bits: 1 bits is infeasible"),
    ({"retrain": {**TINY["retrain"], "init": "inherited"}}, "set pipeline.prototypes: true"),
])
def test_hparams_mode_checks_the_space_on_the_model_before_nni(sections: dict[str, Any], message: str,
                                                               tiny_corpus_dir: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """What every trial's pipeline would reject after FP training is rejected by the launcher (issue 14)."""
    config = _config(tmp_path, **sections)
    out = tmp_path / "out"
    assert main(["nni", str(config), "--data", str(tiny_corpus_dir), "--out", str(out),
                 "--emit-config", str(tmp_path / "exp.yml")]) == 2
    err = capsys.readouterr().err
    assert str(config) in err and message in err, err
    assert not (out / "nni").exists()


def test_bits_space_is_the_search_space_in_nni_form(nni_fp: dict[str, Path]) -> None:
    from nas.nni.space import model_from_checkpoint
    from search_spaces.space import SearchSpace

    exp = parse_config({**TINY, "space": {"bits": [1, 2, 4], "keep_fp": ["decoder"],
                                          "overrides": [{"match": "embedding", "bits": [4]}]},
                       "budget": {"avg_bits": 12.0}})
    space = bits_space(exp, nni_fp["checkpoint"])
    expected = SearchSpace.from_config(exp.space, exp.budget, model_from_checkpoint(nni_fp["checkpoint"]))
    assert space == expected.to_nni()
    assert "decoder" not in space and "embedding" not in space  # no choice left: not tuned
    assert space["layers.0.forget_gate.hh"] == {"_type": "choice", "_value": [1, 2, 4]}
    with pytest.raises(ConfigError, match="bits mode needs a 'budget' section"):
        bits_space(parse_config({**TINY, "budget": None}), nni_fp["checkpoint"])


def test_objective() -> None:
    assert objective(100.0, 2.0, 2.0, 10.0) == 100.0  # at the budget
    assert objective(100.0, 1.5, 2.0, 10.0) == 100.0  # under it: no bonus
    assert objective(100.0, 2.2, 2.0, 10.0) == pytest.approx(200.0)  # 10% over: x2 at penalty 10
    assert objective(100.0, 2.2, 2.0, 0.0) == 100.0
    assert objective(100.0, 9.0, None, 10.0) == 100.0  # no budget, no penalty
    assert objective(math.inf, 2.0, 2.0, 10.0) == DIVERGED_OBJECTIVE
    assert objective(math.nan, 2.0, 2.0, 10.0) == DIVERGED_OBJECTIVE
    assert objective(1e7, 200.0, 2.0, 10.0) == DIVERGED_OBJECTIVE  # capped: NNI stores finite numbers


def test_tuner_arguments_minimise() -> None:
    assert tuner_config(NniSettings(tuner="TPE", seed=4)) == {"name": "TPE", "classArgs": {"optimize_mode": "minimize",
                                                                                           "seed": 4}}
    assert tuner_config(NniSettings(tuner="Random")) == {"name": "Random", "classArgs": {}}
    assert tuner_config(NniSettings(tuner="Evolution", population_size=8, seed=1)) == {
        "name": "Evolution", "classArgs": {"optimize_mode": "minimize", "population_size": 8}}


@pytest.mark.parametrize("mode", ["hparams", "bits"])
def test_emit_config(mode: str, nni_fp: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, nni={"concurrency": 2, "max_seconds": 600})
    out, target = tmp_path / "out", tmp_path / "exp.yml"
    assert main(["nni", str(config), "--mode", mode, "--tuner", "Evolution", "--trials", "6", "--out", str(out),
                 "--checkpoint", str(nni_fp["checkpoint"]), "--data", str(nni_fp["corpus"]),
                 "--emit-config", str(target), "--python", "/opt/venv-nni/bin/python"]) == 0
    printed = capsys.readouterr().out
    assert f"nnictl create --config {target}" in printed and f"mpnas report {out.resolve()}/trials/*" in printed
    emitted = yaml.safe_load(target.read_text())
    spec_path = out.resolve() / "nni" / "spec.json"
    assert emitted["trialCommand"] == f"/opt/venv-nni/bin/python -m nas.nni.trial --spec {spec_path}"
    assert emitted["trialCodeDirectory"] == str(PROJECT_ROOT) and Path(emitted["trialCodeDirectory"]).is_absolute()
    assert (emitted["trialConcurrency"], emitted["maxTrialNumber"], emitted["maxExperimentDuration"]) == (2, 6, "600s")
    assert emitted["experimentWorkingDirectory"] == str(out.resolve() / "nni" / "experiments")
    assert emitted["tuner"] == {"name": "Evolution", "classArgs": {"optimize_mode": "minimize", "population_size": 16}}
    assert emitted["trainingService"] == {"platform": "local"}
    assert emitted["searchSpace"] == json.loads((out / "nni" / "search_space.json").read_text())
    if mode == "bits":
        assert len(emitted["searchSpace"]) == 10
        assert all(v["_value"] == [1, 2, 4] for v in emitted["searchSpace"].values())
    else:
        assert set(emitted["searchSpace"]) == {"strategy", "budget", *DEFAULT_GUMBEL_SPACE}
    spec = json.loads(spec_path.read_text())
    assert spec["mode"] == mode and spec["model_name"] == "tiny" and spec["out"] == str(out.resolve() / "trials")
    assert spec["checkpoint"] == str(nni_fp["checkpoint"].resolve()) and spec["data"] == str(nni_fp["corpus"].resolve())
    assert Path(spec["config"]).read_text() == config.read_text()
    if HAS_NNI:  # NNI itself accepts the file
        from nni.experiment import ExperimentConfig

        ExperimentConfig.load(str(target)).validate()


def test_emit_config_errors(nni_fp: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path)
    assert main(["nni", str(config), "--mode", "bits", "--data", str(nni_fp["corpus"]), "--emit-config", "x.yml"]) == 2
    assert "bits mode needs --checkpoint" in capsys.readouterr().err
    assert main(["nni", str(config), "--checkpoint", str(tmp_path / "absent.pt"), "--data", str(nni_fp["corpus"]),
                 "--emit-config", "x.yml"]) == 2
    assert "absent.pt: no such file" in capsys.readouterr().err
    bad = _config(tmp_path, nni={"space": {"lambda": {"_type": "uniform", "_value": [1, 2]}}})
    assert main(["nni", str(bad), "--data", str(nni_fp["corpus"]), "--emit-config", "x.yml"]) == 2
    assert "'nni.space.lambda' is not a tunable key" in capsys.readouterr().err


@pytest.mark.skipif(HAS_NNI, reason="checks the message shown where NNI is missing")
def test_running_without_nni_says_how_to_install(nni_fp: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nni", str(_config(tmp_path)), "--data", str(nni_fp["corpus"]), "--out", str(tmp_path / "o")]) == 2
    assert "mpnas nni needs NNI 3.0" in capsys.readouterr().err


def test_derive_config_applies_the_parameters() -> None:
    raw = {**TINY, "search": {"epochs": 0.05, "strategy": "kl"}, "pipeline": {"strategies": ["kl", "gumbel"],
                                                                               "budgets": [2.0, 3.0]}}
    params = {"strategy": "gumbel", "budget": 3, "lambda_kp": 3.5, "rescale_every": 20.0, "retrain.lr": 0.01,
              "retrain.epochs": 2.0}
    derived = derive_config(raw, params, default_budget=2.0)
    assert derived["search"] == {"epochs": 0.05, "strategy": "gumbel", "lambda_kp": 3.5, "rescale_every": 20}
    assert isinstance(derived["search"]["rescale_every"], int) and isinstance(derived["retrain"]["epochs"], int)
    assert derived["retrain"]["lr"] == 0.01
    assert derived["pipeline"] == {"strategies": ["gumbel"], "budgets": [3.0], "include_uniform": False}
    assert raw["search"]["strategy"] == "kl"  # the input is untouched
    parse_config(derived)  # a valid experiment file
    kept = derive_config(raw, {}, default_budget=2.5)
    assert kept["pipeline"]["strategies"] == ["kl"] and kept["pipeline"]["budgets"] == [2.5]
    with pytest.raises(KeyError):
        derive_config(raw, {"nonsense": 1}, 2.0)


def test_pick_row() -> None:
    rows = {"fp": {"strategy": "fp"}, "gumbel_b2": {"strategy": "gumbel"}}
    assert pick_row(rows, "gumbel") == ("gumbel_b2", rows["gumbel_b2"])
    with pytest.raises(RuntimeError, match="no eval row for strategy 'kl'"):
        pick_row(rows, "kl")


def test_failure_and_tuner_logs(tmp_path: Path) -> None:
    trial = tmp_path / "exp1" / "environments" / "local-env" / "trials" / "AbCdE"
    trial.mkdir(parents=True)
    (trial / "trial.stderr").write_text("\n".join(f"line {i}" for i in range(100)) + "\nValueError: broken\n")
    text = trial_failure_text(tmp_path, "exp1", "AbCdE")
    assert "trial.stderr" in text and "ValueError: broken" in text and "line 0\n" not in text
    assert "no log folder" in trial_failure_text(tmp_path, "exp1", "zzzzz")
    assert tuner_error(tmp_path, "exp1") is None
    (tmp_path / "exp1" / "log").mkdir()
    (tmp_path / "exp1" / "log" / "dispatcher.log").write_text("INFO start\nTraceback (most recent call last):\n"
                                                               "KeyError: 'default'\n")
    assert tuner_error(tmp_path, "exp1").endswith("Traceback (most recent call last):\nKeyError: 'default'")


def _standalone_trial(nni_fp: dict[str, Path], tmp_path: Path, mode: str, params: dict[str, Any]) -> Path:
    """Emit an experiment, then run one trial outside NNI (what a trial does, minus the tuner)."""
    out = tmp_path / "out"
    assert main(["nni", str(_config(tmp_path)), "--mode", mode, "--out", str(out), "--checkpoint",
                 str(nni_fp["checkpoint"]), "--data", str(nni_fp["corpus"]), "--threads", "1",
                 "--emit-config", str(tmp_path / "exp.yml")]) == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNI_")}
    done = subprocess.run([sys.executable, "-m", "nas.nni.trial", "--spec", str(out / "nni" / "spec.json"),
                           "--params", json.dumps(params)], cwd=PROJECT_ROOT, env=env, capture_output=True,
                          text=True, check=False, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run,) = (out / "trials").iterdir()
    return run


def test_bits_trial_standalone(nni_fp: dict[str, Path], tmp_path: Path) -> None:
    params = {"layers.0.forget_gate.hh": 4, "decoder": 1}
    run = _standalone_trial(nni_fp, tmp_path, "bits", params)
    record = json.loads((run / "nni_trial.json").read_text())
    label = f"nni_{run.name}"
    assert record["parameters"] == params and record["result"]["label"] == label
    row = json.loads((run / "eval" / f"{label}.json").read_text())
    parsed = parse_row(row, label)
    assert parsed["strategy"] == "nni_tpe" and parsed["model"] == "tiny" and parsed["budget"] == 2.0
    assert row["precision"] == f"search/{label}/precision.yaml"
    bits = yaml.safe_load((run / row["precision"]).read_text())["bits"]
    assert bits["layers.0.forget_gate.hh"] == 4 and bits["decoder"] == 1 and bits["embedding"] == 2  # rest: 2 bits
    result = record["result"]
    assert result["default"] == pytest.approx(objective(row["valid_ppl"], row["avg_bits"], 2.0, 10.0))
    assert result["ppl"] == row["valid_ppl"] and result["size_bytes"] == row["theoretical_bytes"]
    assert row["packed_bytes"] == (run / "retrain" / label / "model.mpq").stat().st_size
    assert (run / "config.yaml").is_file() and "nas.nni.trial" in (run / "command.txt").read_text()
    assert not (run / "retrain" / label / "checkpoint.pt").exists()


def test_hparams_trial_standalone_runs_the_pipeline(nni_fp: dict[str, Path], tmp_path: Path) -> None:
    run = _standalone_trial(nni_fp, tmp_path, "hparams", {"lambda_kp": 3.0, "tau_end": 0.3})
    record = json.loads((run / "nni_trial.json").read_text())
    assert record["result"]["label"] == "gumbel_b2"
    row = json.loads((run / "eval" / "gumbel_b2.json").read_text())
    assert parse_row(row, "gumbel_b2")["strategy"] == "gumbel"
    assert record["result"]["default"] == pytest.approx(objective(row["valid_ppl"], row["avg_bits"], 2.0, 10.0))
    assert "pipeline" in (run / "command.txt").read_text()
    derived = yaml.safe_load((run / "config.yaml").read_text())
    assert derived["search"]["lambda_kp"] == 3.0 and derived["search"]["tau_end"] == 0.3
    assert collect_results(run.parent)[0]["trial_id"] == run.name


def test_experiment_dict_is_nni_v2(tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    config = experiment_dict(NniSettings(trials=3), {"x": {"_type": "choice", "_value": [1]}}, spec, tmp_path / "w",
                             "name", python="/usr/bin/python3")
    assert config["trialCommand"] == f"/usr/bin/python3 -m nas.nni.trial --spec {spec}"
    assert set(config) == {"experimentName", "searchSpace", "trialCommand", "trialCodeDirectory", "trialConcurrency",
                           "maxTrialNumber", "maxExperimentDuration", "experimentWorkingDirectory", "tuner",
                           "trainingService"}
