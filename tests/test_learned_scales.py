"""Learned scales (LSQ) in STE and ADMM retraining: the gradient, that scales learn, resume, config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from nas.config.sections import ConfigError, parse_config
from nas.core.checkpoint import load_checkpoint
from nas.core.data import load_corpus
from nas.retrain.admm import AdmmHooks
from nas.retrain.run import retrain
from nas.retrain.ste import SteHooks
from search_spaces.models import build_model
from search_spaces.precision import PrecisionMap
from search_spaces.quant import qmax
from tests.synthetic import train_fp_run

EXP = {"model": {"type": "lstm", "embed_dim": 16, "hidden_dim": 16, "num_layers": 1},
       "data": {"batch_size": 4, "bptt": 10, "eval_batch_size": 2},
       "train": {"optimizer": "adam", "lr": 0.02, "schedule": "constant", "epochs": 2, "seed": 1},
       "retrain": {"method": "ste", "optimizer": "adam", "lr": 0.005, "schedule": "constant", "epochs": 2,
                   "project_every": 5, "seed": 2, "learn_scales": True, "scale_lr": 0.01}}


@pytest.fixture(scope="module")
def fp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return train_fp_run(tmp_path_factory.mktemp("fp"), EXP)


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("lstm", vocab_size=30, embed_dim=12, hidden_dim=12, num_layers=1)


@pytest.mark.parametrize(("bits", "granularity"), [(2, "matrix"), (1, "matrix"), (4, "row")])
def test_scale_gradient_is_lsq(bits: int, granularity: str) -> None:
    """The hooks' d loss / d log alpha equals autograd through alpha * clip(round_ste(W/alpha)) (LSQ)."""
    model = _model()
    precision = PrecisionMap.uniform(model, bits, granularity=granularity)
    hooks = SteHooks(model, precision, learn_scales=True)
    hooks.before_forward(model)
    tokens = torch.randint(0, 30, (6, 3))
    model(tokens, None, tokens).loss.backward()
    latent, alpha = dict(hooks.latent), dict(hooks.alpha)
    grads = hooks.q.grads(model)
    hooks._scale_gradients(model)
    for name, grad in grads.items():
        a = alpha[name].clone().requires_grad_(True)
        v = latent[name] / a
        rounded = torch.where(v >= 0, 1.0, -1.0) if bits == 1 else v.round()
        straight = v + (rounded - v).detach()  # rounding passed straight through
        m = qmax(bits)
        table = torch.where(v.abs() <= m, straight, straight.detach().clamp(-m, m))  # clipped: its level
        (expected,) = torch.autograd.grad((a * table * grad).sum(), a)
        torch.testing.assert_close(hooks.log_alpha[name].grad, expected * alpha[name], rtol=1e-4, atol=1e-7)


def test_scales_are_learned_not_resolved(fp_run: tuple[Path, Path], tmp_path: Path) -> None:
    """With learn_scales the scales leave the least-squares solution, and the weights end on the learned table."""
    corpus_dir, fp = fp_run
    corpus = load_corpus(corpus_dir)
    ckpt = load_checkpoint(fp)
    config = dict(ckpt["config"])
    model = build_model(config.pop("type"), **config)
    precision = PrecisionMap.uniform(model, 2)
    model.load_state_dict(ckpt["model"])
    ste = SteHooks(model, precision)
    start = {name: ste.q.solve_scale(name, view) for name, view in ste.q.views(model).items()}
    # no re-solve in the whole run: without learning the scales would stay at `start`
    exp = parse_config({**EXP, "retrain": {**EXP["retrain"], "project_every": 10**6}})
    retrain(exp, corpus, fp, precision, tmp_path / "lsq", progress=False)
    learned = load_checkpoint(tmp_path / "lsq" / "checkpoint.pt")["hooks"]["alpha"]
    moved = sum(not torch.allclose(learned[name], start[name], rtol=1e-3) for name in start)
    assert moved == len(start)
    model.load_state_dict(load_checkpoint(tmp_path / "lsq" / "best.pt")["model"])
    for name, view in ste.q.views(model).items():
        assert view.detach().unique().numel() <= 3, name  # best.pt is on a 2-bit table


def test_resume_with_learned_scales_is_exact(fp_run: tuple[Path, Path], tmp_path: Path) -> None:
    corpus_dir, fp = fp_run
    corpus = load_corpus(corpus_dir)
    precision = PrecisionMap.uniform(build_model("lstm", vocab_size=len(corpus.vocab), embed_dim=16, hidden_dim=16,
                                                 num_layers=1), 2)
    exp = parse_config({**EXP, "retrain": {**EXP["retrain"], "method": "admm", "rho": 0.5, "rho_max": 1.0}})
    retrain(exp, corpus, fp, precision, tmp_path / "straight", progress=False)
    stopped = retrain(exp, corpus, fp, precision, tmp_path / "resumed", progress=False, stop_after_steps=13)
    assert stopped["stopped_early"]
    retrain(exp, corpus, fp, precision, tmp_path / "resumed", progress=False, resume=True)
    a, b = (load_checkpoint(tmp_path / run / "checkpoint.pt") for run in ("straight", "resumed"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    for key in ("alpha", "log_alpha", "g_alpha", "u"):
        assert all(torch.equal(a["hooks"][key][n], b["hooks"][key][n]) for n in a["hooks"][key]), key


def test_admm_projects_on_the_learned_table() -> None:
    model = _model()
    precision = PrecisionMap.uniform(model, 2)
    hooks = AdmmHooks(model, precision, rho=0.1, project_every=2, learn_scales=True, scale_lr=0.05)
    hooks.begin(steps_per_epoch=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(4):
        hooks.before_forward(model)
        tokens = torch.randint(0, 30, (6, 3))
        optimizer.zero_grad()
        model(tokens, None, tokens).loss.backward()
        hooks.before_step(model)
        optimizer.step()
        hooks.after_step(model, step, lr=0.1, loss_scale=1.0)
    for name in hooks.g_alpha:
        assert torch.equal(hooks.g_alpha[name], hooks.alpha[name])


@pytest.mark.parametrize(("retrain_keys", "message"), [
    ({"scale_lr": 0.0}, "'retrain.scale_lr' = 0.0 must be > 0"),
    ({"method": "admm", "admm_forward": "latent", "learn_scales": True},
     "'retrain.learn_scales' = True must be false with method admm and admm_forward latent"),
])
def test_bad_learned_scale_settings(retrain_keys: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({**EXP, "retrain": {**EXP["retrain"], **retrain_keys}})


@pytest.mark.parametrize("bits", [2, 1])
def test_clipped_ste_zeroes_the_gradient_outside_the_table(bits: int) -> None:
    """ste_clip: weights with |W/alpha| > qmax get no gradient; the others keep theirs exactly."""
    model, twin = _model(), _model()
    precision = PrecisionMap.uniform(model, bits)
    grads = {}
    for net, clip in ((model, True), (twin, False)):
        hooks = SteHooks(net, precision, ste_clip=clip)
        hooks.before_forward(net)
        tokens = torch.randint(0, 30, (6, 3), generator=torch.Generator().manual_seed(0))
        net(tokens, None, tokens).loss.backward()
        latent, alpha = dict(hooks.latent), dict(hooks.alpha)
        hooks.before_step(net)
        grads[clip] = {n: g.clone() for n, g in hooks.q.grads(net).items()}
    outside_total = 0
    for name in grads[True]:
        outside = (latent[name] / alpha[name]).abs() > qmax(bits)
        outside_total += int(outside.sum())
        assert torch.all(grads[True][name][outside] == 0), name
        assert torch.equal(grads[True][name][~outside], grads[False][name][~outside]), name
    assert outside_total > 0  # the test exercises clipping
