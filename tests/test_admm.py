"""ADMM and STE retraining: table membership, residuals, resume, and the CLI path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from nas.checkpoint import load_checkpoint
from nas.cli import main
from nas.config import parse_config
from nas.data import load_corpus
from nas.retrain import retrain
from nas.train import train
from search_spaces.models import build_model
from search_spaces.precision import PrecisionMap, cluster_weight, find_clusters
from tests.synthetic import write_synthetic_corpus

EXP = {"model": {"type": "lstm", "embed_dim": 16, "hidden_dim": 16, "num_layers": 1, "dropout": 0.1},
       "data": {"batch_size": 4, "bptt": 10, "eval_batch_size": 2},
       "train": {"optimizer": "adam", "lr": 0.02, "schedule": "constant", "epochs": 2, "seed": 1},
       "retrain": {"optimizer": "adam", "lr": 0.005, "schedule": "constant", "epochs": 2, "rho": 0.01,
                   "rho_growth": 1.5, "rho_max": 10.0, "project_every": 5, "seed": 2}}


@pytest.fixture(scope="module")
def fp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fp")
    corpus_dir = write_synthetic_corpus(root / "corpus")
    train(parse_config(EXP), load_corpus(corpus_dir), root / "fp", progress=False)
    return corpus_dir, root / "fp" / "best.pt"


def _model_from(path: Path) -> torch.nn.Module:
    ckpt = load_checkpoint(path)
    config = dict(ckpt["config"])
    model = build_model(config.pop("type"), **config)
    model.load_state_dict(ckpt["model"])
    return model


def _assert_on_table(model: torch.nn.Module, precision: PrecisionMap) -> None:
    for name, cluster in find_clusters(model).items():
        bits = precision.bits[name]
        values = cluster_weight(model, cluster).detach().unique()
        assert values.numel() <= (2 if bits == 1 else 2**bits - 1), name
        alpha = values.abs().max() / (1 if bits == 1 else 2 ** (bits - 1) - 1)
        ratios = values / alpha
        assert torch.allclose(ratios, ratios.round(), atol=1e-4), name


@pytest.mark.parametrize("method", ["admm", "ste"])
def test_retrain_ends_on_the_table(method: str, fp_run: tuple[Path, Path], tmp_path: Path) -> None:
    corpus_dir, fp = fp_run
    model = _model_from(fp)
    precision = PrecisionMap.uniform(model, 2)
    metrics = retrain(parse_config(EXP), load_corpus(corpus_dir), fp, precision, tmp_path / method,
                      method=method, progress=False)
    _assert_on_table(_model_from(tmp_path / method / "best.pt"), precision)
    assert metrics["avg_bits"] == pytest.approx(2.0)
    assert metrics["compression"] > 8
    assert (tmp_path / method / "precision.yaml").is_file()
    if method == "admm":
        residuals = metrics["admm_residuals"]
        assert len(residuals) >= 4
        # rho grows, W is pulled onto its table: the primal residual shrinks
        assert residuals[-1]["rho"] > residuals[0]["rho"]
        assert residuals[-1]["primal"] < residuals[0]["primal"]


def test_admm_beats_plain_projection(fp_run: tuple[Path, Path], tmp_path: Path) -> None:
    """Retraining recovers part of what 1-bit projection of the FP model loses."""
    from evaluators.perplexity import perplexity
    from search_spaces.apply import quantize_

    corpus_dir, fp = fp_run
    corpus = load_corpus(corpus_dir)
    projected = _model_from(fp)
    precision = PrecisionMap.uniform(projected, 1)
    quantize_(projected, precision)
    baseline = perplexity(projected, corpus.valid, corpus.vocab.eos_id)["ppl"]
    metrics = retrain(parse_config(EXP), corpus, fp, precision, tmp_path / "admm", progress=False)
    assert metrics["valid_ppl"] < baseline


def test_admm_resume_matches_uninterrupted(fp_run: tuple[Path, Path], tmp_path: Path) -> None:
    corpus_dir, fp = fp_run
    corpus = load_corpus(corpus_dir)
    precision = PrecisionMap.uniform(_model_from(fp), 2)
    exp = parse_config(EXP)
    retrain(exp, corpus, fp, precision, tmp_path / "straight", progress=False)
    first = retrain(exp, corpus, fp, precision, tmp_path / "resumed", progress=False, stop_after_steps=13)
    assert first["stopped_early"]
    retrain(exp, corpus, fp, precision, tmp_path / "resumed", progress=False, resume=True)
    a = load_checkpoint(tmp_path / "straight" / "best.pt")["model"]
    b = load_checkpoint(tmp_path / "resumed" / "best.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cli_retrain_export_evaluate(fp_run: tuple[Path, Path], tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    corpus_dir, fp = fp_run
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(EXP))
    out = tmp_path / "rt"
    assert main(["retrain", str(config), "--precision", "uniform:4", "--checkpoint", str(fp), "--out", str(out),
                 "--data", str(corpus_dir), "--no-progress"]) == 0
    assert main(["export", str(out / "best.pt"), "--out", str(tmp_path / "m.mpq")]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "m.mpq"), "--data", str(corpus_dir)]) == 0
    packed_out = capsys.readouterr().out
    assert main(["evaluate", str(out / "best.pt"), "--data", str(corpus_dir)]) == 0
    ckpt_out = capsys.readouterr().out
    # same perplexity from the checkpoint and from the packed file
    assert packed_out.splitlines()[:2] == ckpt_out.splitlines()[:2]
    assert "on disk" in packed_out and "average bits 4.00" in packed_out


def test_bad_precision_spec_exits_2(fp_run: tuple[Path, Path], tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    corpus_dir, fp = fp_run
    bad = tmp_path / "map.yaml"
    bad.write_text(yaml.safe_dump(PrecisionMap({"nonexistent": 4}).to_dict()))
    rc = main(["retrain", "quick", "--precision", str(bad), "--checkpoint", str(fp), "--data", str(corpus_dir),
               "--out", str(tmp_path / "x")])
    assert rc == 2
    assert "nonexistent" in capsys.readouterr().err


def test_admm_pull_escapes_gradient_clipping(fp_run: tuple[Path, Path], tmp_path: Path) -> None:
    """A tight clip must not throttle ADMM: the penalty gradient is added after clipping.

    Before the fix, clipping the summed gradient let a large ||W - G + U|| shrink both the pull
    and the loss gradient, and on PTB the primal residual grew instead of shrinking.
    """
    from nas.admm import AdmmHooks

    corpus_dir, fp = fp_run
    model = _model_from(fp)
    precision = PrecisionMap.uniform(model, 2)
    hooks = AdmmHooks(model, precision, rho=1.0, rho_growth=1.0, rho_max=1.0, project_every=1000)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-6)  # what nas.train does first
    hooks.after_clip(model, loss_scale=3.0)
    for name, cluster in hooks.q.clusters.items():
        w = cluster_weight(model, cluster).detach()
        grad = cluster_weight(model, cluster).grad if cluster.rows is None else None
        expected = 3.0 * (w - hooks.g[name])  # U = 0 before the first projection
        assert grad is not None and torch.allclose(grad, expected), name
    assert hooks.penalty_value(model) > 0

    exp = parse_config({**EXP, "retrain": {**EXP["retrain"], "clip": 1e-3, "optimizer": "sgd", "lr": 0.05,
                                           "rho": 1.0, "rho_growth": 1.0, "rho_max": 1.0}})
    metrics = retrain(exp, load_corpus(corpus_dir), fp, precision, tmp_path / "clipped", progress=False)
    primal = [r["primal"] for r in metrics["admm_residuals"]]
    assert primal[-1] < 0.5 * primal[0], primal


def test_retrain_keeps_the_projected_start_when_training_hurts(fp_run: tuple[Path, Path], tmp_path: Path) -> None:
    """Best-on-valid includes step 0: a harmful retraining returns the projected FP weights."""
    corpus_dir, fp = fp_run
    precision = PrecisionMap.uniform(_model_from(fp), 8)
    harmful = parse_config({**EXP, "retrain": {**EXP["retrain"], "optimizer": "sgd", "lr": 50.0, "clip": 0.0,
                                               "epochs": 1}})
    metrics = retrain(harmful, load_corpus(corpus_dir), fp, precision, tmp_path / "rt", method="ste",
                      progress=False)
    assert metrics["kept_start"] and metrics["valid_ppl"] == pytest.approx(metrics["start_valid_ppl"])
    start = _model_from(fp)
    from nas.admm import _QuantizedClusters

    _QuantizedClusters(start, precision).hard_project_(start)
    saved = load_checkpoint(tmp_path / "rt" / "best.pt")["model"]
    assert all(torch.equal(saved[k], v) for k, v in start.state_dict().items())


def test_ste_validates_with_the_scales_it_trained_with() -> None:
    """Evaluation projects with the training forward's scales, not ones re-solved on the latents."""
    from nas.admm import SteHooks
    from search_spaces.quant import quantize_codes

    torch.manual_seed(0)
    model = build_model("lstm", vocab_size=50, embed_dim=8, hidden_dim=8, num_layers=1)
    precision = PrecisionMap.uniform(model, 2, granularity="row")
    hooks = SteHooks(model, precision, rescale_every=100)
    hooks.before_forward(model)
    trained = {k: v.clone() for k, v in hooks.alpha.items()}
    hooks.before_step(model)  # latent weights back
    with torch.no_grad():  # a training step that moves the latents: re-solved scales would differ
        for view in hooks.q.views(model).values():
            view.mul_(1.7)
    latent = {n: v.detach().clone() for n, v in hooks.q.views(model).items()}
    with hooks.evaluation(model):
        for name, view in hooks.q.views(model).items():
            expected = quantize_codes(latent[name], 2, trained[name]).float() * trained[name]
            assert torch.equal(view, expected), name
            assert not torch.equal(view, hooks.q.project(name, latent[name])), name
    assert all(torch.equal(v, latent[n]) for n, v in hooks.q.views(model).items())  # latents restored


def test_ste_best_weights_are_a_fixed_point_of_the_projection(fp_run: tuple[Path, Path], tmp_path: Path) -> None:
    from nas.admm import _QuantizedClusters

    corpus_dir, fp = fp_run
    precision = PrecisionMap.uniform(_model_from(fp), 2, granularity="row")
    retrain(parse_config(EXP), load_corpus(corpus_dir), fp, precision, tmp_path / "ste", method="ste",
            progress=False)
    model = _model_from(tmp_path / "ste" / "best.pt")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _QuantizedClusters(model, precision).hard_project_(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
