"""One contract every search strategy passes, plus a toy with a known answer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nas.config.sections import SearchSection, parse_config
from nas.core.data import load_corpus
from nas.retrain.loop import train
from nas.search.base import SearchData
from nas.search.strategies import STRATEGIES, get_strategy
from search_spaces.clusters import find_clusters
from search_spaces.models import build_model, restore_model
from search_spaces.precision import PrecisionMap
from search_spaces.space import SearchSpace
from tests.synthetic import write_synthetic_corpus

EXP = {"model": {"type": "lstm", "embed_dim": 16, "hidden_dim": 16, "num_layers": 1},
       "data": {"batch_size": 4, "bptt": 10},
       "train": {"optimizer": "adam", "lr": 0.02, "schedule": "constant", "epochs": 2, "seed": 1}}
FAST = SearchSection(epochs=2.0, kl_tokens=300, hessian_batches=2, hessian_max_iters=30, hessian_tol=0.05)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, object]:
    root = tmp_path_factory.mktemp("strategies")
    corpus = load_corpus(write_synthetic_corpus(root / "corpus"))
    train(parse_config(EXP), corpus, root / "fp", progress=False)
    best = torch.load(root / "fp" / "best.pt", weights_only=True)
    model = restore_model(best)
    return model, corpus


def _data(corpus: object, tmp_path: Path) -> SearchData:
    return SearchData(train=corpus.train, valid=corpus.valid, batch_size=4, length=10, cache_dir=tmp_path)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_contract(name: str, trained: tuple, tmp_path: Path) -> None:
    """A valid map, inside the space, within the budget, the same for the same seed."""
    model, corpus = trained
    space = SearchSpace.from_config({"bits": [1, 2, 4, 8], "keep_fp": ["embedding"]}, {"avg_bits": 7.0}, model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    first = get_strategy(name).search(model, space, _data(corpus, tmp_path), FAST)
    second = get_strategy(name).search(model, space, _data(corpus, tmp_path), FAST)
    first.validate(model)
    assert space.contains(first) and space.fits_budget(first)
    assert first.bits["embedding"] == 32
    assert dict(first.bits) == dict(second.bits)
    assert first.meta["strategy"] == name and first.meta["wall_s"] >= 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the FP model is untouched


def test_score_tables_are_cached_across_budgets(trained: tuple, tmp_path: Path) -> None:
    model, corpus = trained
    maps = []
    for avg in (2.0, 4.0):
        space = SearchSpace.from_config({"bits": [1, 2, 4, 8]}, {"avg_bits": avg}, model)
        maps.append(get_strategy("kl").search(model, space, _data(corpus, tmp_path), FAST))
    assert maps[0].meta["scores_cached"] is False and maps[1].meta["scores_cached"] is True
    assert maps[0].meta["scores"] == maps[1].meta["scores"]
    sizes = {n: c.numel for n, c in find_clusters(model).items()}
    used = [sum(m.bits[n] * sizes[n] for n in sizes) for m in maps]
    assert used[0] < used[1]


@pytest.mark.parametrize("name", ["kl", "hessian", "gumbel"])
def test_sensitive_cluster_gets_more_bits(name: str, trained: tuple, tmp_path: Path) -> None:
    """Two equal-size clusters, room for only one at 8 bits: the sensitive one must get it.

    The output gate's input weights are shrunk 1000x, so quantizing them barely moves the gate;
    the cell gate's input weights carry the signal.
    """
    model, corpus = trained
    model = build_model("lstm", **{k: v for k, v in vars(model.config).items()})
    model.load_state_dict(trained[0].state_dict())
    with torch.no_grad():
        model.layers[0].output_gate.ih.weight.mul_(1e-3)
        model.layers[0].cell_gate.ih.weight.mul_(3.0)
    sensitive, insensitive = "layers.0.cell_gate.ih", "layers.0.output_gate.ih"
    others = [n for n in find_clusters(model) if n not in (sensitive, insensitive)]
    space = SearchSpace.from_config({"bits": [1, 8], "keep_fp": others}, None, model)
    # avg_bits counts the pinned clusters at 32: set the budget to exactly one 8-bit + one 1-bit cluster.
    total, pinned = space.total_params, space.pinned_params
    budget = (32 * pinned + 9 * space.sizes[sensitive]) / total
    space = SearchSpace.from_config({"bits": [1, 8], "keep_fp": others}, {"avg_bits": budget}, model)
    settings = SearchSection(epochs=6.0, kl_tokens=300, hessian_batches=2, hessian_max_iters=50, hessian_tol=0.02)
    result = get_strategy(name).search(model, space, _data(corpus, tmp_path), settings)
    assert (result.bits[sensitive], result.bits[insensitive]) == (8, 1)


def test_hessian_meta_records_the_per_cluster_stop(trained: tuple, tmp_path: Path) -> None:
    """meta.hutchinson: products run, the clusters the cap stopped, and per cluster the trace, its
    standard error, the relative standard error (<= tol unless capped) and the probes it got;
    kept with the cached score table and through the map's YAML."""
    model, corpus = trained
    space = SearchSpace.from_config({"bits": [1, 2, 4, 8]}, {"avg_bits": 2.0}, model)
    settings = SearchSection(hessian_batches=1, hessian_max_iters=150, hessian_tol=0.2)
    found = get_strategy("hessian").search(model, space, _data(corpus, tmp_path), settings)
    h = found.meta["hutchinson"]
    names = set(space.searchable)
    assert h["tol"] == 0.2 and h["max_probes"] == 150
    assert set(h["traces"]) == set(h["std_errors"]) == set(h["rel_errors"]) == set(h["probes"]) == names
    assert h["products"] == max(h["probes"].values()) <= 150
    assert set(h["capped"]) < names  # some clusters met tol (the forget gates' traces are ~0 here)
    for name in names:
        rel, se, trace = h["rel_errors"][name], h["std_errors"][name], h["traces"][name]
        assert rel == pytest.approx(se / abs(trace))
        if name in h["capped"]:
            assert h["probes"][name] == 150 and rel > 0.2
        else:
            assert 30 <= h["probes"][name] < 150 and rel <= 0.2
    again = get_strategy("hessian").search(model, space, _data(corpus, tmp_path), settings)
    assert again.meta["scores_cached"] is True and again.meta["hutchinson"] == h
    found.save(tmp_path / "map.yaml")
    assert PrecisionMap.load(tmp_path / "map.yaml").meta["hutchinson"] == h


@pytest.mark.parametrize("name", sorted(STRATEGIES))
@pytest.mark.parametrize("training", [True, False], ids=["train_mode", "eval_mode"])
def test_search_leaves_train_eval_mode_unchanged(name: str, training: bool, trained: tuple, tmp_path: Path) -> None:
    """A search scores the model in eval mode but hands it back in the mode it got it in (issue 14)."""
    model, corpus = trained
    space = SearchSpace.from_config({"bits": [1, 2, 4, 8]}, {"avg_bits": 4.0}, model)
    model.train(training)
    try:
        get_strategy(name).search(model, space, _data(corpus, tmp_path), FAST)
        assert [m.training for m in model.modules()] == [training] * len(list(model.modules()))
    finally:
        model.train()
