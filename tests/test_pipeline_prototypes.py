"""``mpnas pipeline`` with prototypes: built once per width, scored on, inherited; a given folder reused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from nas.config.sections import ConfigError
from nas.pipeline.runner import run_pipeline
from nas.pipeline.state import read_rows
from nas.retrain.prototype_store import PrototypeError
from search_spaces.precision import PrecisionMap
from tests.pipeline_helpers import TINY, ran_stages, run_tiny, write_config

RAW: dict[str, Any] = {**TINY, "retrain": {**TINY["retrain"], "init": "inherited"}, "space": {"bits": [1, 2, 4]},
                       "search": {**TINY["search"], "hessian_batches": 1, "hessian_max_iters": 40},
                       "pipeline": {"strategies": ["kl", "hessian"], "budgets": [2], "prototypes": True}}


@pytest.fixture(scope="module")
def proto_run(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> tuple[Path, list[str]]:
    """A tiny pipeline with prototypes (kl and hessian at 2 bits): its folder and progress lines."""
    root = tmp_path_factory.mktemp("proto")
    return root, run_tiny(root, RAW, corpus_dir)


def test_pipeline_builds_prototypes_and_scores_on_them(proto_run: tuple[Path, list[str]], corpus_dir: Path) -> None:
    """pipeline.prototypes builds one prototype per width, kl and hessian score on them, retraining
    inherits them; a rerun is up to date; a changed retrain recipe rebuilds them."""
    tmp_path, lines = proto_run
    config, raw = tmp_path / "tiny.yaml", RAW
    index = json.loads((tmp_path / "run" / "prototypes" / "prototypes.json").read_text())
    assert sorted(index["prototypes"]) == ["1", "2", "4"]
    for strategy in ("kl", "hessian"):
        meta = PrecisionMap.load(tmp_path / "run" / "search" / f"{strategy}_b2" / "precision.yaml").meta
        assert meta["sensitivity"] == "prototype"
    uniform = PrecisionMap.load(tmp_path / "run" / "search" / "uniform_b2" / "precision.yaml")
    assert uniform.meta["strategy"] == "uniform"
    assert "prototypes" in ran_stages(lines)
    rows = {row["strategy"] + str(row["budget"]): row for row in read_rows(tmp_path / "run")}
    for bits in (1, 2, 4):  # each prototype is a point of the report, at its own size
        row = rows[f"prototype{float(bits)}"]
        assert row["avg_bits"] == pytest.approx(bits) and row["test_ppl"] == pytest.approx(
            index["prototypes"][str(bits)]["test_ppl"])
    assert (tmp_path / "run" / "report" / "results.csv").read_text().count("prototype") == 3
    again: list[str] = []
    run_pipeline(config, tmp_path / "run", data=corpus_dir, command="mpnas pipeline tiny.yaml", log=again.append)
    assert ran_stages(again) == set()
    changed = write_config(tmp_path, {**raw, "retrain": {**raw["retrain"], "lr": 0.005}})
    third: list[str] = []
    run_pipeline(changed, tmp_path / "run", data=corpus_dir, command="mpnas pipeline tiny.yaml", log=third.append)
    assert {"prototypes", "search/kl_b2", "search/hessian_b2", "retrain/kl_b2"} <= ran_stages(third)


def test_given_prototype_folder_is_checked_never_rebuilt(proto_run: tuple[Path, list[str]], corpus_dir: Path,
                                                         tmp_path: Path) -> None:
    """A given folder (pipeline.prototypes_dir) is checked, never rebuilt or written to; with
    search_on_prototypes false kl scores the FP weights while retraining still inherits."""
    root, raw = proto_run[0], RAW
    given = root / "run" / "prototypes"
    before = {p.name: p.stat().st_mtime_ns for p in given.iterdir()}
    fp = root / "run" / "fp" / "best.pt"
    reuse = {**raw, "pipeline": {"strategies": ["kl"], "budgets": [2], "include_uniform": False,
                                 "prototypes_dir": str(given), "search_on_prototypes": False}}
    fourth: list[str] = []
    run_pipeline(write_config(tmp_path, reuse), tmp_path / "run2", data=corpus_dir, checkpoint=fp,
                 command="x", log=fourth.append)
    assert not (tmp_path / "run2" / "prototypes").exists()
    assert {p.name: p.stat().st_mtime_ns for p in given.iterdir()} == before
    assert PrecisionMap.load(tmp_path / "run2" / "search" / "kl_b2" / "precision.yaml").meta["sensitivity"] == "fp"
    reused = {row["strategy"] + str(row["budget"]): row for row in read_rows(tmp_path / "run2")}
    assert {"kl2.0", "prototype1.0", "prototype2.0", "prototype4.0"} <= set(reused)
    assert "retrain/kl_b2" in ran_stages(fourth)
    # a folder without a width of the space is refused before the run folder is made
    narrow = {**reuse, "space": {"bits": [1, 2, 3]}}
    with pytest.raises(PrototypeError, match=r"no prototype for width\(s\) \[3\]"):
        run_pipeline(write_config(tmp_path, narrow), tmp_path / "run3", data=corpus_dir, checkpoint=fp, command="x")
    assert not (tmp_path / "run3").exists()
    # and so is one made from another FP checkpoint
    other = tmp_path / "other.pt"
    ckpt = torch.load(fp, weights_only=False)
    name = next(iter(ckpt["model"]))
    ckpt["model"][name] = ckpt["model"][name] + 1e-3
    torch.save(ckpt, other)
    with pytest.raises(PrototypeError, match="another FP checkpoint"):
        run_pipeline(write_config(tmp_path, reuse), tmp_path / "run4", data=corpus_dir, checkpoint=other,
                     command="x")
    assert not (tmp_path / "run4").exists()


def test_inherited_init_needs_pipeline_prototypes(tmp_path: Path, corpus_dir: Path) -> None:
    raw = {**TINY, "retrain": {**TINY["retrain"], "init": "inherited"}}
    with pytest.raises(ConfigError, match="set pipeline.prototypes: true"):
        run_pipeline(write_config(tmp_path, raw), tmp_path / "run", data=corpus_dir, command="x")
    assert not (tmp_path / "run").exists()
