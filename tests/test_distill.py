"""Knowledge distillation during retraining: the loss, the teacher's state, resume, config checks."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nas.config.sections import ConfigError, parse_config
from nas.core.checkpoint import load_checkpoint
from nas.core.data import load_corpus
from nas.retrain.distill import Distiller, distillation_loss
from nas.retrain.loop import train
from nas.retrain.run import retrain
from search_spaces.models import build_model
from search_spaces.precision import PrecisionMap
from tests.synthetic import write_synthetic_corpus

EXP = {"model": {"type": "lstm", "embed_dim": 16, "hidden_dim": 16, "num_layers": 1, "dropout": 0.0},
       "data": {"batch_size": 4, "bptt": 10, "eval_batch_size": 2},
       "train": {"optimizer": "adam", "lr": 0.02, "schedule": "constant", "epochs": 2, "seed": 1},
       "retrain": {"method": "ste", "optimizer": "adam", "lr": 0.005, "schedule": "constant", "epochs": 2,
                   "project_every": 5, "seed": 2, "distill": 0.5, "distill_temperature": 2.0}}


@pytest.fixture(scope="module")
def fp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("fp")
    corpus_dir = write_synthetic_corpus(root / "corpus")
    train(parse_config({**EXP, "retrain": {}}), load_corpus(corpus_dir), root / "fp", progress=False)
    return corpus_dir, root / "fp" / "best.pt"


def test_distillation_loss_is_the_tempered_kl() -> None:
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 7, generator=gen), torch.randn(2, 3, 7, generator=gen)
    assert float(distillation_loss(teacher, teacher, 2.0)) == pytest.approx(0.0, abs=1e-6)
    p_t = F.softmax(teacher / 2.0, dim=-1)
    manual = (p_t * (p_t.log() - F.log_softmax(student / 2.0, dim=-1))).sum(-1).mean() * 4.0
    assert float(distillation_loss(student, teacher, 2.0)) == pytest.approx(float(manual), rel=1e-5)
    # at T = 1 the gradient on the student's logits is (p_student - p_teacher) / tokens
    logits = student.clone().requires_grad_(True)
    distillation_loss(logits, teacher, 1.0).backward()
    expected = (F.softmax(student, -1) - F.softmax(teacher, -1)) / 6
    assert torch.allclose(logits.grad, expected, atol=1e-6)


def test_distiller_mixes_and_carries_the_teacher_state() -> None:
    torch.manual_seed(0)
    teacher = build_model("lstm", vocab_size=11, embed_dim=8, hidden_dim=8, num_layers=1)
    student = copy.deepcopy(teacher)
    distiller = Distiller(teacher, weight=0.25, temperature=1.0)
    tokens = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(1))
    out = student(tokens, None, tokens)
    # a student identical to the teacher: the KL part is 0, the mix is 0.75 * CE
    mixed = float(distiller.mix(tokens, out.logits, out.loss).detach())
    assert mixed == pytest.approx(0.75 * float(out.loss.detach()), rel=1e-5)
    assert distiller.state is not None  # the teacher's state now continues into the next chunk
    out2 = student(tokens, student.detach_state(out.state), tokens)
    mixed = float(distiller.mix(tokens, out2.logits, out2.loss).detach())
    assert mixed == pytest.approx(0.75 * float(out2.loss.detach()), rel=1e-5)
    saved = distiller.state_dict()
    distiller.reset()
    assert distiller.state is None
    distiller.load_state_dict(saved, "cpu")
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(distiller.state, saved["state"], strict=True))
    assert not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match="weight"):
        Distiller(teacher, weight=0.0)


def test_distilled_retrain_resumes_exactly_and_differs_from_plain(fp_run: tuple[Path, Path], tmp_path: Path) -> None:
    corpus_dir, fp = fp_run
    corpus = load_corpus(corpus_dir)
    ckpt = load_checkpoint(fp)
    config = dict(ckpt["config"])
    probe = build_model(config.pop("type"), **config)
    precision = PrecisionMap.uniform(probe, 2)
    exp = parse_config(EXP)
    straight = retrain(exp, corpus, fp, precision, tmp_path / "straight", progress=False)
    first = retrain(exp, corpus, fp, precision, tmp_path / "resumed", progress=False, stop_after_steps=7)
    assert first["stopped_early"]
    retrain(exp, corpus, fp, precision, tmp_path / "resumed", progress=False, resume=True)
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # the teacher's carried state was restored too
    plain = parse_config({**EXP, "retrain": {**EXP["retrain"], "distill": 0.0}})
    retrain(plain, corpus, fp, precision, tmp_path / "plain", progress=False)
    c = load_checkpoint(tmp_path / "plain" / "checkpoint.pt")["model"]
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert straight["test_ppl"] > 1.0


def test_retrain_dropout_overrides_the_checkpoint(fp_run: tuple[Path, Path], tmp_path: Path) -> None:
    corpus_dir, fp = fp_run
    corpus = load_corpus(corpus_dir)
    exp = parse_config({**EXP, "retrain": {**EXP["retrain"], "dropout": 0.3, "epochs": 1}})
    ckpt = load_checkpoint(fp)
    config = dict(ckpt["config"])
    precision = PrecisionMap.uniform(build_model(config.pop("type"), **config), 4)
    retrain(exp, corpus, fp, precision, tmp_path / "rt", progress=False)
    assert load_checkpoint(tmp_path / "rt" / "checkpoint.pt")["config"]["model"]["dropout"] == 0.3


@pytest.mark.parametrize(("key", "value", "match"), [
    ("distill", 1.5, r"'retrain\.distill' = 1\.5 must be in \[0, 1\]"),
    ("distill_temperature", 0.0, "distill_temperature"),
    ("dropout", 1.0, r"'retrain\.dropout' = 1\.0 must be in \[0, 1\)")])
def test_distill_config_errors(key: str, value: float, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config({**EXP, "retrain": {**EXP["retrain"], key: value}}, "exp.yaml")
