"""ADMM and STE retraining: table membership, residuals, resume, and the CLI path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from nas.cli.main import main
from nas.config.sections import parse_config
from nas.core.checkpoint import load_checkpoint
from nas.core.data import load_corpus
from nas.retrain.run import retrain
from search_spaces.clusters import cluster_weight, find_clusters
from search_spaces.models import build_model, restore_model
from search_spaces.precision import PrecisionMap
from tests.synthetic import train_fp_run

EXP = {"model": {"type": "lstm", "embed_dim": 16, "hidden_dim": 16, "num_layers": 1, "dropout": 0.1},
       "data": {"batch_size": 4, "bptt": 10, "eval_batch_size": 2},
       "train": {"optimizer": "adam", "lr": 0.02, "schedule": "constant", "epochs": 2, "seed": 1},
       "retrain": {"method": "admm", "optimizer": "adam", "lr": 0.005, "schedule": "constant", "epochs": 2, "rho": 10.0,
                   "rho_growth": 2.0, "rho_max": 100.0, "project_every": 5, "seed": 2}}


@pytest.fixture(scope="module")
def fp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return train_fp_run(tmp_path_factory.mktemp("fp"), EXP)


def _model_from(path: Path) -> torch.nn.Module:
    ckpt = load_checkpoint(path)
    model = restore_model(ckpt)
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


@pytest.mark.parametrize("period", [{"project_every": 5}, {"project_every_epochs": 0.5, "rho_growth": 3.0}])
def test_admm_resume_matches_uninterrupted(period: dict, fp_run: tuple[Path, Path], tmp_path: Path) -> None:
    corpus_dir, fp = fp_run
    corpus = load_corpus(corpus_dir)
    precision = PrecisionMap.uniform(_model_from(fp), 2)
    exp = parse_config({**EXP, "retrain": {**EXP["retrain"], **period}})
    retrain(exp, corpus, fp, precision, tmp_path / "straight", progress=False)
    first = retrain(exp, corpus, fp, precision, tmp_path / "resumed", progress=False, stop_after_steps=13)
    assert first["stopped_early"]
    retrain(exp, corpus, fp, precision, tmp_path / "resumed", progress=False, resume=True)
    a = load_checkpoint(tmp_path / "straight" / "best.pt")["model"]
    b = load_checkpoint(tmp_path / "resumed" / "best.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    # stopped mid projection period: the dual state resumes exactly too
    a, b = (load_checkpoint(tmp_path / run / "checkpoint.pt")["hooks"] for run in ("straight", "resumed"))
    assert a["residuals"] == b["residuals"] and a["rho"] == b["rho"]
    for key in ("u", "g_codes", "g_alpha", "alpha"):
        assert all(torch.equal(a[key][n], b[key][n]) for n in a[key]), key


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


def test_admm_proximal_step_is_exact_and_outside_the_optimizer(fp_run: tuple[Path, Path]) -> None:
    """After the optimizer step, W <- (W + eta (G - U)) / (1 + eta) with eta = lr * rho * loss_scale."""
    from nas.retrain.admm import AdmmHooks

    corpus_dir, fp = fp_run
    model = _model_from(fp)
    precision = PrecisionMap.uniform(model, 2)
    hooks = AdmmHooks(model, precision, rho=0.5, project_every=1000)
    torch.manual_seed(3)
    with torch.no_grad():
        for name in hooks.u:
            hooks.u[name].normal_(0, 0.01)
    before = {n: v.detach().clone() for n, v in hooks.q.views(model).items()}
    hooks.after_step(model, 0, lr=0.2, loss_scale=3.0)
    eta = 0.2 * 0.5 * 3.0
    for name, w in hooks.q.views(model).items():
        expected = (before[name] + eta * (hooks.g(name) - hooks.u[name])) / (1 + eta)
        torch.testing.assert_close(w.detach(), expected, rtol=1e-6, atol=1e-7)
    # the penalty it minimises went down
    assert hooks.penalty_value(model) < 0.5 * 0.5 * sum(
        float(((before[n] - hooks.g(n) + hooks.u[n]) ** 2).sum()) for n in before)


def test_admm_with_rho_zero_is_exactly_ste(fp_run: tuple[Path, Path], tmp_path: Path) -> None:
    corpus_dir, fp = fp_run
    corpus = load_corpus(corpus_dir)
    precision = PrecisionMap.uniform(_model_from(fp), 2)
    exp = parse_config({**EXP, "retrain": {**EXP["retrain"], "rho": 0.0, "rho_growth": 2.0}})
    retrain(exp, corpus, fp, precision, tmp_path / "admm", method="admm", progress=False)
    retrain(exp, corpus, fp, precision, tmp_path / "ste", method="ste", progress=False)
    for name in ("checkpoint.pt", "best.pt"):
        a = load_checkpoint(tmp_path / "admm" / name)["model"]
        b = load_checkpoint(tmp_path / "ste" / name)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_rho_is_honoured_by_every_optimizer(optimizer: str, fp_run: tuple[Path, Path], tmp_path: Path) -> None:
    """A larger rho pulls W closer to its table, with Adam as with SGD (Adam used to normalise it away)."""
    corpus_dir, fp = fp_run
    corpus = load_corpus(corpus_dir)
    precision = PrecisionMap.uniform(_model_from(fp), 2)
    final_primal = {}
    for rho in (0.1, 100.0):
        exp = parse_config({**EXP, "retrain": {**EXP["retrain"], "optimizer": optimizer, "rho": rho,
                                               "rho_max": rho, "rho_growth": 1.0}})
        metrics = retrain(exp, corpus, fp, precision, tmp_path / f"{rho}", method="admm", progress=False)
        final_primal[rho] = metrics["admm_residuals"][-1]["primal"]
    assert final_primal[100.0] < 0.5 * final_primal[0.1], final_primal


def test_admm_moves_codes_away_from_the_fp_projection(fp_run: tuple[Path, Path], tmp_path: Path) -> None:
    """The old ADMM froze every code where projecting the FP weights put it; this one must not."""
    from nas.retrain.ste import QuantizedClusters

    corpus_dir, fp = fp_run
    precision = PrecisionMap.uniform(_model_from(fp), 2)
    metrics = retrain(parse_config(EXP), load_corpus(corpus_dir), fp, precision, tmp_path / "admm",
                      method="admm", progress=False)
    assert any(r["codes_changed"] > 0 for r in metrics["admm_residuals"])
    assert metrics["admm_residuals"][-1]["codes_moved"] > 0
    start = _model_from(fp)
    QuantizedClusters(start, precision).hard_project_(start)
    trained = _model_from(tmp_path / "admm" / "best.pt")
    q = QuantizedClusters(trained, precision)
    moved = total = 0
    for name, w in q.views(trained).items():
        w0 = q.views(start)[name]
        codes = q.codes(name, w, q.solve_scale(name, w))
        codes0 = q.codes(name, w0, q.solve_scale(name, w0))
        moved += int((codes != codes0).sum())
        total += codes.numel()
    assert moved / total > 1e-3, moved / total


def test_rho_grows_per_epoch_not_per_projection(fp_run: tuple[Path, Path], tmp_path: Path) -> None:
    corpus_dir, fp = fp_run
    corpus = load_corpus(corpus_dir)
    precision = PrecisionMap.uniform(_model_from(fp), 2)
    rho_at_epoch_end = []
    for every in (3, 6):
        exp = parse_config({**EXP, "retrain": {**EXP["retrain"], "project_every": every, "rho": 0.01,
                                               "rho_growth": 4.0, "rho_max": 10.0, "max_steps_per_epoch": 12}})
        metrics = retrain(exp, corpus, fp, precision, tmp_path / f"p{every}", method="admm", progress=False)
        rows = metrics["admm_residuals"]
        assert rows[-1]["epoch"] == pytest.approx(2.0)
        rho_at_epoch_end.append([r["rho"] for r in rows if r["epoch"] == pytest.approx(1.0)][0])
    # the projection after one epoch uses rho0 * growth^1, however often it projected before
    assert rho_at_epoch_end == pytest.approx([0.04, 0.04])


def test_projection_period_in_epochs(fp_run: tuple[Path, Path], tmp_path: Path) -> None:
    corpus_dir, fp = fp_run
    precision = PrecisionMap.uniform(_model_from(fp), 2)
    exp = parse_config({**EXP, "retrain": {**EXP["retrain"], "project_every_epochs": 0.5,
                                           "max_steps_per_epoch": 10}})
    metrics = retrain(exp, load_corpus(corpus_dir), fp, precision, tmp_path / "e", method="admm", progress=False)
    assert [r["step"] for r in metrics["admm_residuals"]] == [5, 10, 15, 20]


def test_ste_tail_keeps_the_better_of_the_two(fp_run: tuple[Path, Path], tmp_path: Path) -> None:
    corpus_dir, fp = fp_run
    precision = PrecisionMap.uniform(_model_from(fp), 2)
    exp = parse_config({**EXP, "retrain": {**EXP["retrain"], "ste_finetune_steps": 6}})
    metrics = retrain(exp, load_corpus(corpus_dir), fp, precision, tmp_path / "a", method="admm", progress=False)
    assert metrics["admm_residuals"], "the tail must not drop ADMM's residuals"
    tail = metrics["ste_finetune_valid_ppl"]
    assert metrics["valid_ppl"] <= tail + 1e-9
    assert metrics["ste_finetune_kept"] == (metrics["valid_ppl"] == pytest.approx(tail))
    best = load_checkpoint(tmp_path / "a" / "best.pt")
    assert best["valid_ppl"] == pytest.approx(metrics["valid_ppl"], rel=1e-6)


def test_a_harmful_ste_tail_is_discarded(fp_run: tuple[Path, Path], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import nas.retrain.run as retrain_module
    from nas.retrain.ste import SteHooks

    class Wrecking(SteHooks):
        def after_step(self, model, global_step, *, lr, loss_scale):  # noqa: ANN001
            super().after_step(model, global_step, lr=lr, loss_scale=loss_scale)
            with torch.no_grad():
                for view in self.q.views(model).values():
                    view.mul_(-3.0)

    original = retrain_module.make_hooks

    def make_hooks(cfg, precision, method):  # noqa: ANN001
        if method == "ste":
            return lambda model: Wrecking(model, precision, rescale_every=cfg.project_every)
        return original(cfg, precision, method)

    corpus_dir, fp = fp_run
    corpus = load_corpus(corpus_dir)
    precision = PrecisionMap.uniform(_model_from(fp), 2)
    plain = retrain(parse_config(EXP), corpus, fp, precision, tmp_path / "plain", method="admm", progress=False)
    monkeypatch.setattr(retrain_module, "make_hooks", make_hooks)
    exp = parse_config({**EXP, "retrain": {**EXP["retrain"], "ste_finetune_steps": 4}})
    metrics = retrain(exp, corpus, fp, precision, tmp_path / "tail", method="admm", progress=False)
    assert not metrics["ste_finetune_kept"] and metrics["ste_finetune_valid_ppl"] > metrics["valid_ppl"]
    assert metrics["valid_ppl"] == plain["valid_ppl"]
    a = load_checkpoint(tmp_path / "plain" / "best.pt")["model"]
    b = load_checkpoint(tmp_path / "tail" / "best.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


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
    from nas.retrain.ste import QuantizedClusters

    QuantizedClusters(start, precision).hard_project_(start)
    saved = load_checkpoint(tmp_path / "rt" / "best.pt")["model"]
    assert all(torch.equal(saved[k], v) for k, v in start.state_dict().items())


def test_ste_validates_with_the_scales_it_trained_with() -> None:
    """Evaluation projects with the training forward's scales, not ones re-solved on the latents."""
    from nas.retrain.ste import SteHooks
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
    from nas.retrain.ste import QuantizedClusters

    corpus_dir, fp = fp_run
    precision = PrecisionMap.uniform(_model_from(fp), 2, granularity="row")
    retrain(parse_config(EXP), load_corpus(corpus_dir), fp, precision, tmp_path / "ste", method="ste",
            progress=False)
    model = _model_from(tmp_path / "ste" / "best.pt")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    QuantizedClusters(model, precision).hard_project_(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_latent_forward_admm_is_the_papers_w_step(fp_run: tuple[Path, Path], tmp_path: Path) -> None:
    """``admm_forward: latent`` takes the gradient at W (no swap) and still ends on the table."""
    from nas.retrain.admm import AdmmHooks

    corpus_dir, fp = fp_run
    model = _model_from(fp)
    precision = PrecisionMap.uniform(model, 2)
    hooks = AdmmHooks(model, precision, forward="latent")
    before = {n: v.detach().clone() for n, v in hooks.q.views(model).items()}
    hooks.before_forward(model)  # the forward sees the continuous weights, off the table
    assert all(torch.equal(v, before[n]) for n, v in hooks.q.views(model).items())
    with hooks.evaluation(model):  # validation: the closed-form projection of W
        for name, view in hooks.q.views(model).items():
            assert torch.equal(view, hooks.q.project(name, before[name])), name
    corpus = load_corpus(corpus_dir)
    latent = parse_config({**EXP, "retrain": {**EXP["retrain"], "admm_forward": "latent"}})
    metrics = retrain(latent, corpus, fp, precision, tmp_path / "latent", method="admm", progress=False)
    _assert_on_table(_model_from(tmp_path / "latent" / "best.pt"), precision)
    assert metrics["admm_residuals"][-1]["primal"] < metrics["admm_residuals"][0]["primal"]
    with pytest.raises(ValueError, match="admm_forward"):
        parse_config({**EXP, "retrain": {**EXP["retrain"], "admm_forward": "continuous"}})


def test_dual_is_rescaled_when_rho_changes(fp_run: tuple[Path, Path]) -> None:
    """Scaled form: rho * U (the unscaled dual) is unchanged by a change of rho."""
    from nas.retrain.admm import AdmmHooks

    _, fp = fp_run
    model = _model_from(fp)
    hooks = AdmmHooks(model, PrecisionMap.uniform(model, 2), rho=0.5, rho_growth=4.0, rho_max=100.0,
                      project_every=3)
    hooks.begin(steps_per_epoch=6)
    torch.manual_seed(0)
    for name in hooks.u:
        hooks.u[name].normal_(0, 0.01)
    unscaled = {n: 0.5 * u.clone() for n, u in hooks.u.items()}
    views = hooks.q.views(model)
    w = {n: v.detach().clone() for n, v in views.items()}
    hooks.steps = 3  # half an epoch: rho -> 0.5 * 4 ** 0.5 = 1.0, then the dual update U += W - G
    hooks._project(views)
    assert hooks.rho == pytest.approx(1.0)
    for name, u in hooks.u.items():
        torch.testing.assert_close(u - (w[name] - hooks.g(name)), unscaled[name] / 1.0, rtol=1e-5, atol=1e-7)


def test_resume_of_a_finished_run_with_a_tail_changes_nothing(fp_run: tuple[Path, Path], tmp_path: Path) -> None:
    corpus_dir, fp = fp_run
    corpus = load_corpus(corpus_dir)
    precision = PrecisionMap.uniform(_model_from(fp), 2)
    exp = parse_config({**EXP, "retrain": {**EXP["retrain"], "ste_finetune_steps": 6}})
    first = retrain(exp, corpus, fp, precision, tmp_path / "a", method="admm", progress=False)
    saved = load_checkpoint(tmp_path / "a" / "best.pt")["model"]
    again = retrain(exp, corpus, fp, precision, tmp_path / "a", method="admm", progress=False, resume=True)
    assert again == first
    assert all(torch.equal(saved[k], v) for k, v in load_checkpoint(tmp_path / "a" / "best.pt")["model"].items())
    # killed after ADMM finished but before the tail did: the resumed run ends as the uninterrupted one
    (tmp_path / "a" / "metrics.json").unlink()
    resumed = retrain(exp, corpus, fp, precision, tmp_path / "a", method="admm", progress=False, resume=True)
    assert resumed["valid_ppl"] == first["valid_ppl"]
    assert resumed["ste_finetune_kept"] == first["ste_finetune_kept"]
    assert resumed["admm_residuals"] == first["admm_residuals"]
