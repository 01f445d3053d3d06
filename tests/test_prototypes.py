"""Uniform-precision prototypes (issue 13 item 1): build, cache, resume, load, refuse stale files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from nas.cli.main import main
from nas.config.sections import parse_config
from nas.core.checkpoint import load_checkpoint
from nas.core.data import load_corpus
from nas.pipeline.prototypes import build_prototypes
from nas.pipeline.stages import load_model
from nas.retrain.prototype_store import INDEX, PrototypeError, load_prototypes, prototype_file, prototype_weights
from nas.retrain.run import retrain
from search_spaces.clusters import cluster_weight, find_clusters
from search_spaces.precision import PrecisionMap
from tests.synthetic import train_fp_run

EXP = {"model": {"type": "lstm", "embed_dim": 12, "hidden_dim": 12, "num_layers": 1},
       "data": {"batch_size": 4, "bptt": 8, "eval_batch_size": 2},
       "train": {"optimizer": "adam", "lr": 0.02, "schedule": "constant", "epochs": 1, "seed": 1},
       "retrain": {"method": "ste", "optimizer": "adam", "lr": 0.005, "schedule": "constant", "epochs": 1,
                   "max_steps_per_epoch": 12, "project_every": 5, "seed": 2},
       "space": {"bits": [1, 2, 4]}}


@pytest.fixture(scope="module")
def fp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return train_fp_run(tmp_path_factory.mktemp("fp"), EXP)


def test_build_load_and_cache(fp_run: tuple[Path, Path], tmp_path: Path) -> None:
    corpus_dir, fp = fp_run
    exp, corpus = parse_config(EXP), load_corpus(corpus_dir)
    index = build_prototypes(exp, corpus, fp, [4, 2], tmp_path / "p")
    assert sorted(index["prototypes"]) == ["2", "4"]
    models = load_prototypes(tmp_path / "p")
    reference = load_model(fp)
    weights = prototype_weights(models, reference)
    for b, model in models.items():
        for name, cluster in find_clusters(model).items():  # every cluster on a b-bit table
            assert cluster_weight(model, cluster).detach().unique().numel() <= 2**b - 1, (b, name)
        # the packed prototype is the retrained best.pt (exactly: best.pt is on its table)
        best = load_model(tmp_path / "p" / f"{b}bit" / "best.pt")
        for name, cluster in find_clusters(best).items():
            assert torch.equal(cluster_weight(best, cluster).detach(), weights[b][name]), (b, name)
    # a second call with the same inputs retrains nothing and leaves the files alone
    stamps = {b: prototype_file(tmp_path / "p", b).stat().st_mtime_ns for b in (2, 4)}
    again = build_prototypes(exp, corpus, fp, [2, 4], tmp_path / "p")
    assert again == index
    assert stamps == {b: prototype_file(tmp_path / "p", b).stat().st_mtime_ns for b in (2, 4)}
    # another recipe is another prototype
    changed = parse_config({**EXP, "retrain": {**EXP["retrain"], "lr": 0.001}})
    build_prototypes(changed, corpus, fp, [2], tmp_path / "p")
    assert prototype_file(tmp_path / "p", 2).stat().st_mtime_ns != stamps[2]


def test_an_interrupted_width_resumes_exactly(fp_run: tuple[Path, Path], tmp_path: Path) -> None:
    corpus_dir, fp = fp_run
    exp, corpus = parse_config(EXP), load_corpus(corpus_dir)
    build_prototypes(exp, corpus, fp, [2], tmp_path / "straight")
    precision = PrecisionMap.uniform(load_model(fp), 2).with_meta({"prototype_bits": 2, "method": "ste"})
    stopped = retrain(exp, corpus, fp, precision, tmp_path / "resumed" / "2bit", method="ste", progress=False,
                      stop_after_steps=7)
    assert stopped["stopped_early"]
    build_prototypes(exp, corpus, fp, [2], tmp_path / "resumed")
    a, b = (load_checkpoint(tmp_path / run / "2bit" / "best.pt")["model"] for run in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert prototype_file(tmp_path / "straight", 2).read_bytes() == prototype_file(tmp_path / "resumed", 2).read_bytes()


def test_stale_or_missing_prototypes_are_refused(fp_run: tuple[Path, Path], tmp_path: Path) -> None:
    corpus_dir, fp = fp_run
    build_prototypes(parse_config(EXP), load_corpus(corpus_dir), fp, [2], tmp_path / "p")
    with pytest.raises(PrototypeError, match=r"no prototype for \[4\]"):
        load_prototypes(tmp_path / "p", [2, 4])
    packed = prototype_file(tmp_path / "p", 2)
    packed.write_bytes(packed.read_bytes()[:-1] + b"\0")
    with pytest.raises(PrototypeError, match="sha256 differs"):
        load_prototypes(tmp_path / "p")
    (tmp_path / "p" / INDEX).write_text("{")
    with pytest.raises(PrototypeError, match="not valid JSON"):
        load_prototypes(tmp_path / "p")
    with pytest.raises(PrototypeError, match="prototype widths \\[32\\]"):
        build_prototypes(parse_config(EXP), load_corpus(corpus_dir), fp, [32], tmp_path / "q")


def test_cli_builds_the_config_widths(fp_run: tuple[Path, Path], tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    corpus_dir, fp = fp_run
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({**EXP, "space": {"bits": [1, 2, 32]}}))
    assert main(["prototypes", str(config), "--checkpoint", str(fp), "--data", str(corpus_dir), "--out",
                 str(tmp_path / "p"), "--no-progress", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "1-bit: valid ppl" in printed and "2-bit: valid ppl" in printed
    assert sorted(json.loads((tmp_path / "p" / INDEX).read_text())["prototypes"]) == ["1", "2"]
    # --max-steps caps each width's retraining and is part of its inputs: the capped 2-bit
    # prototype replaces the full one, the 1-bit one (not asked for) stays
    before = json.loads((tmp_path / "p" / INDEX).read_text())["prototypes"]
    assert main(["prototypes", str(config), "--checkpoint", str(fp), "--data", str(corpus_dir), "--out",
                 str(tmp_path / "p"), "--bits", "2", "--max-steps", "3", "--no-progress", "--threads", "1"]) == 0
    after = json.loads((tmp_path / "p" / INDEX).read_text())["prototypes"]
    assert json.loads((tmp_path / "p" / "2bit" / "metrics.json").read_text())["steps"] == 3
    assert after["1"] == before["1"] and after["2"]["inputs"] != before["2"]["inputs"]
    assert main(["prototypes", str(config), "--checkpoint", str(fp), "--data", str(corpus_dir), "--out",
                 str(tmp_path / "p"), "--max-steps", "0"]) == 2


def test_inherited_init_starts_every_cluster_from_its_prototype(fp_run: tuple[Path, Path], tmp_path: Path) -> None:
    """A mixed map retrained with init: inherited starts each b-bit cluster exactly on the b-bit
    prototype's weights (on their table: the first projection keeps them), biases from FP."""
    from nas.retrain.run import inherited_state
    from nas.retrain.ste import SteHooks

    corpus_dir, fp = fp_run
    exp, corpus = parse_config(EXP), load_corpus(corpus_dir)
    build_prototypes(exp, corpus, fp, [2, 4], tmp_path / "p")
    model = load_model(fp)
    names = list(find_clusters(model))
    mixed = PrecisionMap({n: (2 if i % 2 else 4) for i, n in enumerate(names)}, "matrix")
    ckpt = load_checkpoint(fp)
    state = inherited_state(fp, ckpt, mixed, tmp_path / "p")
    protos = prototype_weights(load_prototypes(tmp_path / "p"), model)
    model.load_state_dict(state)
    for name, cluster in find_clusters(model).items():
        view = cluster_weight(model, cluster).detach()
        assert torch.equal(view, protos[mixed.bits[name]][name]), name
        projected = SteHooks(model, mixed).q.project(name, view)
        torch.testing.assert_close(projected, view, rtol=0, atol=1e-7)  # on its table
    assert torch.equal(state["decoder.bias"], ckpt["model"]["decoder.bias"])
    inherited = parse_config({**EXP, "retrain": {**EXP["retrain"], "init": "inherited"}})
    metrics = retrain(inherited, corpus, fp, mixed, tmp_path / "r", progress=False, prototypes=tmp_path / "p")
    assert metrics["valid_ppl"] > 0
    with pytest.raises(ValueError, match="no prototype folder was given"):
        retrain(inherited, corpus, fp, mixed, tmp_path / "r2", progress=False)
    with pytest.raises(PrototypeError, match=r"no prototype for \[1\]"):
        inherited_state(fp, ckpt, PrecisionMap.uniform(model, 1), tmp_path / "p")


def test_retrain_checks_the_map_before_reading_prototypes(fp_run: tuple[Path, Path], tmp_path: Path) -> None:
    """A map naming a cluster the model lacks is a user error before anything is read or trained
    (it was a KeyError out of inherited_state; issue 14)."""
    from search_spaces.precision import PrecisionMapError

    corpus_dir, fp = fp_run
    corpus = load_corpus(corpus_dir)
    build_prototypes(parse_config(EXP), corpus, fp, [2], tmp_path / "p")
    bits = dict(PrecisionMap.uniform(load_model(fp), 2).bits)
    bits["embeding"] = bits.pop("embedding")
    inherited = parse_config({**EXP, "retrain": {**EXP["retrain"], "init": "inherited"}})
    with pytest.raises(PrecisionMapError, match=r"unknown clusters \(not in the model\): embeding"):
        retrain(inherited, corpus, fp, PrecisionMap(bits, "matrix"), tmp_path / "r", progress=False,
                prototypes=tmp_path / "p")
    assert not (tmp_path / "r").exists()


def test_inherited_init_refuses_prototypes_of_another_checkpoint(fp_run: tuple[Path, Path], tmp_path: Path) -> None:
    from nas.retrain.run import inherited_state

    corpus_dir, fp = fp_run
    build_prototypes(parse_config(EXP), load_corpus(corpus_dir), fp, [2], tmp_path / "p")
    other = tmp_path / "other.pt"
    other.write_bytes(fp.read_bytes() + b"")  # same content: accepted
    model = load_model(fp)
    inherited_state(other, load_checkpoint(other), PrecisionMap.uniform(model, 2), tmp_path / "p")
    ckpt = load_checkpoint(fp)
    ckpt["model"] = {k: v + 0.01 for k, v in ckpt["model"].items()}
    torch.save(ckpt, other)
    with pytest.raises(PrototypeError, match="made from another FP checkpoint"):
        inherited_state(other, load_checkpoint(other), PrecisionMap.uniform(model, 2), tmp_path / "p")


@pytest.mark.parametrize("strategy", ["kl", "hessian"])
def test_search_on_prototypes(strategy: str, fp_run: tuple[Path, Path], tmp_path: Path) -> None:
    """`mpnas search --prototypes` rates widths by the prototypes: other scores, its own cache, meta says so."""
    corpus_dir, fp = fp_run
    build_prototypes(parse_config(EXP), load_corpus(corpus_dir), fp, [1, 2, 4], tmp_path / "p")
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({**EXP, "budget": {"avg_bits": 2.0},
                                      "search": {"kl_tokens": 200, "hessian_batches": 1, "hessian_max_iters": 40}}))
    common = ["search", str(config), "--checkpoint", str(fp), "--data", str(corpus_dir), "--strategy", strategy,
              "--cache", str(tmp_path / "cache"), "--threads", "1"]
    assert main([*common, "--out", str(tmp_path / "fp.yaml")]) == 0
    assert main([*common, "--out", str(tmp_path / "proto.yaml"), "--prototypes", str(tmp_path / "p")]) == 0
    fp_map, proto_map = PrecisionMap.load(tmp_path / "fp.yaml"), PrecisionMap.load(tmp_path / "proto.yaml")
    assert fp_map.meta["sensitivity"] == "fp" and proto_map.meta["sensitivity"] == "prototype"
    assert not proto_map.meta["scores_cached"]  # not the FP-mode table from the cache
    assert proto_map.meta["scores"] != fp_map.meta["scores"]
    assert len(list((tmp_path / "cache").glob(f"scores_{strategy}_*.json"))) == 2


def test_hessian_traces_are_shared_by_both_modes(fp_run: tuple[Path, Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The FP model's traces do not depend on the prototypes: the second mode reuses them (same
    scores as a run without the cache), and other batches (hessian_batches) compute new ones."""
    import nas.search.table_strategies

    corpus_dir, fp = fp_run
    build_prototypes(parse_config(EXP), load_corpus(corpus_dir), fp, [1, 2, 4], tmp_path / "p")
    calls: list[int] = []
    real = nas.search.table_strategies.hutchinson_traces
    monkeypatch.setattr(nas.search.table_strategies, "hutchinson_traces",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    config = tmp_path / "exp.yaml"

    def search(out: str, *extra: str, batches: int = 1) -> PrecisionMap:
        config.write_text(yaml.safe_dump({**EXP, "budget": {"avg_bits": 2.0},
                                          "search": {"hessian_batches": batches, "hessian_max_iters": 40}}))
        assert main(["search", str(config), "--checkpoint", str(fp), "--data", str(corpus_dir), "--strategy",
                     "hessian", "--threads", "1", "--out", str(tmp_path / out), *extra]) == 0
        return PrecisionMap.load(tmp_path / out)

    cache = ["--cache", str(tmp_path / "cache")]
    search("fp.yaml", *cache)
    proto = search("proto.yaml", *cache, "--prototypes", str(tmp_path / "p"))
    assert len(calls) == 1 and len(list((tmp_path / "cache").glob("traces_hessian_*.json"))) == 1
    fresh = search("fresh.yaml", "--cache", str(tmp_path / "other"), "--prototypes", str(tmp_path / "p"))
    assert len(calls) == 2 and fresh.meta["scores"] == proto.meta["scores"]
    assert fresh.meta["hutchinson"] == proto.meta["hutchinson"]
    search("two.yaml", *cache, batches=2)
    assert len(calls) == 3 and len(list((tmp_path / "cache").glob("traces_hessian_*.json"))) == 2


def test_supernet_over_prototypes_mixes_the_prototype_weights() -> None:
    """Prototype mode: W_mix = sum_b pi_b P_b with constant P_b (W itself only as the 32-bit candidate)."""
    from nas.search.gumbel import GumbelSupernet
    from search_spaces.models import build_model

    torch.manual_seed(0)
    model = build_model("lstm", vocab_size=20, embed_dim=6, hidden_dim=6, num_layers=1)
    clusters = find_clusters(model)
    protos = {b: {n: torch.randn(c.shape) for n, c in clusters.items()} for b in (1, 2)}
    candidates = {n: (1, 2) for n in clusters}
    candidates["decoder"] = (1, 2, 32)
    net = GumbelSupernet(model, candidates, prototypes=protos)
    with torch.no_grad():
        for logits in net.arch_parameters():
            logits.copy_(torch.randn(logits.shape))
    mixed = net.mixed_weights(1.0, None)
    for name, cluster in clusters.items():
        pi = net.logits[net._key(name)].softmax(0)
        parts = [protos[1][name], protos[2][name]] + ([cluster_weight(model, cluster)] if name == "decoder" else [])
        expected = sum(p * t for p, t in zip(pi, parts, strict=True))
        key = f"{cluster.module}.{cluster.param}"
        torch.testing.assert_close(mixed[key], expected)
    tokens = torch.randint(0, 20, (5, 2))
    net(tokens, None, tokens).loss.backward()
    assert model.embedding.weight.grad is None  # only prototypes: no gradient to the latent weight
    assert model.decoder.weight.grad is not None  # its 32-bit candidate is the live weight
    assert all(p.grad is not None for p in net.arch_parameters())
    with pytest.raises(ValueError, match="no 4-bit prototype for cluster"):
        GumbelSupernet(model, {n: (2, 4) for n in clusters}, prototypes=protos)


def test_gumbel_search_on_prototypes(fp_run: tuple[Path, Path], tmp_path: Path) -> None:
    corpus_dir, fp = fp_run
    build_prototypes(parse_config(EXP), load_corpus(corpus_dir), fp, [1, 2, 4], tmp_path / "p")
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump({**EXP, "budget": {"avg_bits": 2.0}, "search": {"epochs": 0.2}}))
    assert main(["search", str(config), "--checkpoint", str(fp), "--data", str(corpus_dir), "--strategy", "gumbel",
                 "--out", str(tmp_path / "g.yaml"), "--prototypes", str(tmp_path / "p"), "--threads", "1"]) == 0
    found = PrecisionMap.load(tmp_path / "g.yaml")
    assert found.meta["supernet"] == "prototype"
    assert set(found.bits.values()) <= {1, 2, 4}
