"""``mpnas report``: rows from run folders, results.csv, the two PNGs, report.html, errors and the CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from evaluators.report import COLUMNS, cluster_order, collect_rows, load_maps, write_report
from nas.cli.main import main
from search_spaces.models import build_model
from search_spaces.precision import PrecisionMap

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(strategy: str, budget: float | None, size: int, ppl: float, **extra: object) -> dict[str, object]:
    row: dict[str, object] = {
        "model": "ptb_lstm", "strategy": strategy, "budget": budget, "avg_bits": budget or 32.0,
        "theoretical_bytes": size, "packed_bytes": size + 100, "compression": 4_000_000 / size,
        "valid_ppl": ppl + 3.0, "test_ppl": ppl, "wer": None, "search_s": 1.5, "retrain_s": None,
    }
    row.update(extra)
    return row


def _make_run(root: Path, name: str, rows: dict[str, dict[str, object]], maps: dict[str, PrecisionMap]) -> Path:
    run = root / name
    (run / "eval").mkdir(parents=True)
    (run / "config.yaml").write_text(f"# config of {name}\nmodel: {{type: lstm}}\nnote: '<b>&</b>'\n")
    (run / "command.txt").write_text(f"mpnas pipeline {name}.yaml --out runs/{name}\n")
    for label, row in rows.items():
        (run / "eval" / f"{label}.json").write_text(json.dumps(row))
    for label, pmap in maps.items():
        pmap.save(run / "search" / label / "precision.yaml")
    return run


@pytest.fixture()
def runs(tmp_path: Path) -> list[Path]:
    model = build_model("lstm", vocab_size=20, embed_dim=8, hidden_dim=8, num_layers=1)
    names = list(PrecisionMap.uniform(model, 2).bits)
    mixed = {n: (1 if "gate" in n else 4) for n in names}
    searched = _make_run(tmp_path, "searched", {
        "fp": _row("fp", None, 4_000_000, 100.0, precision=None),
        "kl_4": _row("kl", 4.0, 500_000, 104.0, precision="search/kl_4/precision.yaml", extra_key=[1, 2]),
        "kl_2": _row("kl", 2.0, 250_000, 112.5, precision="search/kl_2/precision.yaml"),
    }, {"kl_4": PrecisionMap.uniform(model, 4), "kl_2": PrecisionMap(mixed, meta={"strategy": "kl"})})
    baseline = _make_run(tmp_path, "baselines", {
        "uniform_4": _row("uniform", 4.0, 500_000, 104.0),  # same point as kl@4: not on the front twice
        "uniform_2": _row("uniform", 2.0, 250_000, 130.25, wer=12.5),
        "random_2": _row("random", 2.0, 260_000, 140.0),  # dominated
    }, {"uniform_4": PrecisionMap.uniform(model, 4), "uniform_2": PrecisionMap.uniform(model, 2)})
    return [searched, baseline]


def test_collect_rows_adds_run_and_drops_unknown_keys(runs: list[Path]) -> None:
    rows = collect_rows(runs)
    assert [(r["run"], r["label"]) for r in rows] == [
        ("searched", "fp"), ("searched", "kl_2"), ("searched", "kl_4"),
        ("baselines", "random_2"), ("baselines", "uniform_2"), ("baselines", "uniform_4")]
    assert "extra_key" not in rows[2] and rows[2]["precision"] == "search/kl_4/precision.yaml"
    assert isinstance(rows[0]["theoretical_bytes"], int) and rows[0]["budget"] is None


def test_write_report_outputs(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    report = write_report(runs, out)
    assert sorted(p.name for p in out.iterdir()) == ["bits.png", "pareto.png", "report.html", "results.csv"]
    assert set(report.files.values()) == set(out.iterdir())

    with (out / "results.csv").open(newline="") as handle:
        table = list(csv.reader(handle))
    assert tuple(table[0]) == COLUMNS
    assert table[0][-1] == "run" and len(COLUMNS) == 13
    assert [(r[1], r[2], r[-1]) for r in table[1:]] == [
        ("fp", "", "searched"), ("kl", "2.0", "searched"), ("kl", "4.0", "searched"),
        ("random", "2.0", "baselines"), ("uniform", "2.0", "baselines"), ("uniform", "4.0", "baselines")]
    uniform_2 = dict(zip(COLUMNS, table[5], strict=True))
    assert uniform_2["test_ppl"] == "130.25" and uniform_2["wer"] == "12.5" and uniform_2["retrain_s"] == ""
    assert uniform_2["theoretical_bytes"] == "250000" and uniform_2["packed_bytes"] == "250100"

    front = [(r["strategy"], r["budget"]) for r in report.fronts["ptb_lstm"]]
    assert front == [("kl", 2.0), ("kl", 4.0), ("fp", None)]

    for name in ("pareto.png", "bits.png"):
        assert (out / name).read_bytes().startswith(PNG_MAGIC)

    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,iVBORw0KGgo') == 2  # base64 of the PNG magic
    assert "<td>130.25</td>" in page and "<td>baselines</td>" in page
    assert "mpnas pipeline searched.yaml --out runs/searched" in page
    assert "note: &#x27;&lt;b&gt;&amp;&lt;/b&gt;&#x27;" in page and "<b>&</b>" not in page


def test_report_is_deterministic(runs: list[Path], tmp_path: Path) -> None:
    write_report(runs, tmp_path / "a")
    write_report(runs, tmp_path / "b")
    for name in ("results.csv", "report.html", "pareto.png", "bits.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_bits_maps_keep_model_order_and_label_by_strategy_budget(runs: list[Path], tmp_path: Path) -> None:
    maps = load_maps(collect_rows(runs))
    assert [label for label, _ in maps] == ["kl@2", "kl@4", "uniform@2", "uniform@4"]
    assert cluster_order(maps)[:3] == ["embedding", "layers.0.input_gate.ih", "layers.0.input_gate.hh"]
    reversed_map = PrecisionMap(dict(reversed(list(maps[0][1].bits.items()))))
    assert cluster_order([("r", reversed_map), *maps])[0] == "decoder"  # file order, not sorted


def test_missing_eval_folder_is_an_error(runs: list[Path], tmp_path: Path) -> None:
    empty = tmp_path / "no_eval"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no_eval: no eval/ folder"):
        collect_rows([runs[0], empty])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        collect_rows([tmp_path / "absent"])


@pytest.mark.parametrize(("change", "message"), [
    ({"test_ppl": "abc"}, "key 'test_ppl' must be a number, got 'abc'"),
    ({"theoretical_bytes": 1.5}, "key 'theoretical_bytes' must be an integer"),
    ({"budget": True}, "key 'budget' must be a number or null"),
    ({"model": None}, "key 'model' must be a string"),
    ({"precision": 3}, "key 'precision' must be a path"),
])
def test_malformed_row_names_file_and_key(runs: list[Path], change: dict[str, object], message: str) -> None:
    path = runs[1] / "eval" / "uniform_2.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    with pytest.raises(ValueError, match=message) as info:
        collect_rows(runs)
    assert str(path) in str(info.value)


def test_missing_key_bad_json_and_missing_map(runs: list[Path], tmp_path: Path) -> None:
    path = runs[1] / "eval" / "uniform_2.json"
    row = json.loads(path.read_text())
    del row["valid_ppl"]
    path.write_text(json.dumps(row))
    with pytest.raises(ValueError, match="uniform_2.json: missing key 'valid_ppl' \\(expected a number\\)"):
        collect_rows(runs)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="uniform_2.json: not valid JSON"):
        collect_rows(runs)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        collect_rows(runs)
    path.unlink()
    (runs[0] / "search" / "kl_2" / "precision.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="kl_2/precision.yaml"):
        write_report(runs, tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written before the inputs are known good


def test_cli_report(runs: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli_report"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out / 'results.csv'}" in printed and f"wrote {out / 'report.html'}" in printed
    front_lines = [line for line in printed.splitlines() if "searched/" in line or "baselines/" in line]
    assert [line.split()[-1] for line in front_lines] == ["searched/kl_2", "searched/kl_4", "searched/fp"]
    assert main(["report", str(tmp_path / "absent"), "--out", str(out)]) == 2
    assert "absent" in capsys.readouterr().err
