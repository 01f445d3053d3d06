"""N-best rescoring: batched LM scores, weight tuning, rank prior, and the ``--nbest`` command."""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from evaluators.nbest import NBestList
from evaluators.perplexity import perplexity
from evaluators.rescore import (
    asr_scores,
    evaluate_nbest,
    lm_logprobs,
    rescore,
    score_sentences,
    tune_weights,
)
from evaluators.wer import corpus_wer
from nas.cli.common import load_any_model
from nas.cli.nbest import build_parser, main, run_nbest
from nas.core.checkpoint import save_checkpoint
from nas.core.data import EOS, UNK, Vocabulary
from search_spaces.models import LMOutput, build_model, model_config_dict
from search_spaces.packed import export_packed
from search_spaces.precision import PrecisionMap

SUBJECTS = ["the cat", "a dog", "my friend"]
VERBS = ["sees", "likes", "chases"]
OBJECTS = ["the ball", "a tree", "some food"]
WORDS = (EOS, UNK, *sorted({w for phrase in SUBJECTS + VERBS + OBJECTS for w in phrase.split()}), "and")
VOCAB = Vocabulary(WORDS)
TINY = {"lstm": {"embed_dim": 8, "hidden_dim": 8, "num_layers": 2},
        "transformer": {"d_model": 16, "num_layers": 2, "num_heads": 2, "d_ff": 32, "context": 6, "dropout": 0.0}}


def tiny_model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(kind, vocab_size=len(VOCAB), **TINY[kind])


def random_sentences(count: int, seed: int = 0, longest: int = 15) -> list[list[str]]:
    rng = random.Random(seed)
    return [[rng.choice(WORDS[2:]) for _ in range(rng.randint(0, longest))] for _ in range(count)]


@pytest.mark.parametrize("kind", ["lstm", "transformer"])
def test_batched_scores_equal_one_at_a_time_and_perplexity(kind: str) -> None:
    model = tiny_model(kind)
    # lengths 0..15 and the Transformer context 6: long sentences need sliding windows
    sentences = random_sentences(40)
    sentences += [sentences[3], sentences[3], list(sentences[5])]  # repeats are scored once
    batched = score_sentences(model, sentences, VOCAB, batch_size=7, stride=2)
    assert batched.sentences == 43 and batched.unique == len({tuple(s) for s in sentences}) < 41
    single = [lm_logprobs(model, [s], VOCAB, batch_size=1, stride=2) for s in sentences]
    for got, (want,) in zip(batched.logprobs, single, strict=True):
        assert got == pytest.approx(want, abs=1e-4)
    assert lm_logprobs(model, sentences, VOCAB, stride=2) == pytest.approx(batched.logprobs, abs=1e-4)
    # independent reference: the perplexity evaluator on the sentence as a stream after <eos>
    for sentence, got in zip(sentences, batched.logprobs, strict=True):
        stream = VOCAB.encode([sentence + [EOS]])
        ppl = perplexity(model, stream, VOCAB.eos_id, batch_size=1, stride=2)
        assert got == pytest.approx(-ppl["loss"] * ppl["tokens"], abs=1e-4)
    assert model.training  # the training flag is restored


def test_oov_words_score_as_unk_and_are_counted() -> None:
    model = tiny_model("lstm")
    scores = score_sentences(model, [["the", "zebra", "cat"], ["the", UNK, "cat"], ["qq", "rr"]], VOCAB)
    assert scores.logprobs[0] == scores.logprobs[1]
    assert (scores.words, scores.unk_words) == (8, 3)
    assert scores.unk_rate == pytest.approx(3 / 8)
    no_unk = Vocabulary(tuple(w for w in WORDS if w != UNK) + ("<pad>",))
    with pytest.raises(ValueError, match="zebra"):
        lm_logprobs(model, [["zebra"]], no_unk)


class BigramLM(nn.Module):
    """A hand-built bigram LM: next-word log-probabilities looked up from counted text."""

    def __init__(self, vocab: Vocabulary, sentences: list[list[str]]) -> None:
        super().__init__()
        counts = torch.full((len(vocab), len(vocab)), 0.01)
        index = vocab.index
        for sentence in sentences:
            ids = [vocab.eos_id, *(index[w] for w in sentence), vocab.eos_id]
            for a, b in itertools.pairwise(ids):
                counts[a, b] += 1
        self.table = nn.Parameter((counts / counts.sum(1, keepdim=True)).log())
        self.config = SimpleNamespace(context=64, vocab_size=len(vocab))

    def forward(self, tokens: torch.Tensor, state: object = None, targets: object = None) -> LMOutput:
        return LMOutput(self.table[tokens], None, None)


def grammar_sentence(rng: random.Random) -> list[str]:
    return f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}".split()


def synthetic_nbest(count: int, seed: int = 1) -> list[NBestList]:
    """The reference is always one of 4 hypotheses; the others have a word replaced, dropped or added."""
    rng = random.Random(seed)
    lists = []
    for u in range(count):
        ref = grammar_sentence(rng)
        hyps = []
        for how in ("swap", "drop", "add"):
            hyp = list(ref)
            k = rng.randrange(len(hyp))
            if how == "swap":
                hyp[k] = rng.choice([w for w in WORDS[2:] if w != hyp[k]])
            elif how == "drop":
                del hyp[k]
            else:
                hyp.insert(k, rng.choice(WORDS[2:]))
            hyps.append(" ".join(hyp))
        hyps.insert(rng.choice([0, 1, 2, 3, 3]), " ".join(ref))
        lists.append(NBestList(f"u{u}", hyps, " ".join(ref)))
    return lists


def test_a_good_lm_beats_the_first_best() -> None:
    rng = random.Random(0)
    lm = BigramLM(VOCAB, [grammar_sentence(rng) for _ in range(500)])
    lists = synthetic_nbest(60)
    result = evaluate_nbest(lm, VOCAB, lists, dev_count=30)
    assert result["dev_count"] == 30 and result["test_count"] == 30
    one_best, tuned, oracle = (result[k]["test"]["wer"] for k in ("one_best", "lm", "oracle"))
    assert oracle == 0.0
    assert tuned < 0.5 * one_best
    assert result["lm"]["lm_weight"] > 0
    # without an LM the rank prior keeps the first hypothesis
    assert result["no_lm"]["lm_weight"] == 0.0 and result["no_lm"]["test"]["wer"] == one_best
    assert result["hyps"] == 240 and result["unk_words"] == 0 and result["hyps_per_s"] > 0
    per_utt = result["lm"]["per_utt"]
    assert sum(c.errors for c in per_utt[30:]) == result["lm"]["test"]["errors"]


def brute_force(lists: list[NBestList], lm_scores: list[list[float]], weights: list[float],
                penalties: list[float]) -> tuple[float, float]:
    best = None
    for w, p in itertools.product(weights, penalties):
        chosen = rescore(lists, lm_scores, w, p)
        total, _ = corpus_wer((nb.reference, nb.hypotheses[k]) for nb, k in zip(lists, chosen, strict=True))
        key = (total.wer, w, abs(p), p)
        if best is None or key < best:
            best = key
    assert best is not None
    return best[1], best[3]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tuning_picks_the_lowest_dev_wer_deterministically(seed: int) -> None:
    rng = random.Random(seed)
    lists = [NBestList(nb.utt_id, nb.hypotheses, nb.reference, sorted((rng.uniform(-3, 0) for _ in nb.hypotheses),
                                                                        reverse=True))
             for nb in synthetic_nbest(25, seed=seed)]
    lm_scores = [[rng.uniform(-20, -5) for _ in nb.hypotheses] for nb in lists]
    weights, penalties = [0.0, 2.0, 0.05, 0.5, 0.1], [0.5, -0.5, 0.0, 1.0, -2.0, 0.1]
    picked = tune_weights(lists, lm_scores, weights, penalties)
    assert picked == brute_force(lists, lm_scores, weights, penalties)
    assert tune_weights(lists, lm_scores, weights[::-1], penalties[::-1]) == picked


def test_tuning_ties_go_to_the_smallest_weight_and_penalty() -> None:
    lists = synthetic_nbest(10)
    flat = [[-5.0] * len(nb.hypotheses) for nb in lists]  # an LM that cannot tell them apart
    # the rank prior (1 per rank) dominates every grid point: all tie
    assert tune_weights(lists, flat, [0.3, 0.2, 0.1], [0.01, -0.01, 0.02]) == (0.1, -0.01)
    with pytest.raises(ValueError, match="no dev lists"):
        tune_weights([], [], [0.1, 0.2], [0.0])
    assert tune_weights([], [], [0.1], [0.0]) == (0.1, 0.0)


def test_rank_prior_for_lists_without_scores() -> None:
    nb = NBestList("u", ["a b", "a c", "a d"], "a c")
    assert asr_scores(nb) == [0.0, -1.0, -2.0]
    assert asr_scores(nb, rank_weight=0.5) == [0.0, -0.5, -1.0]
    lm = [[-10.0, -9.5, -9.0]]  # the LM prefers later hypotheses by 0.5 nats per rank
    assert rescore([nb], lm, 1.0, 0.0) == [0]  # one rank outweighs 0.5 nats
    assert rescore([nb], lm, 3.0, 0.0) == [2]
    assert rescore([nb], lm, 1.0, 0.0, rank_weight=0.1) == [2]
    # scored lists use their scores; Kaldi costs combine as -(am + w * lm)
    assert asr_scores(NBestList("s", ["a", "b"], "a", scores=[-0.2, -0.1])) == [-0.2, -0.1]
    kaldi = NBestList("k", ["a", "b"], "a", am_scores=[10.0, 9.0], lm_scores=[1.0, 3.0])
    assert asr_scores(kaldi) == [-11.0, -12.0]
    assert asr_scores(kaldi, old_lm_weight=0.25) == [-10.25, -9.75]


def test_zero_weights_return_the_first_best() -> None:
    rng = random.Random(3)
    lists = synthetic_nbest(20)
    lm_scores = [[rng.uniform(-20, -5) for _ in nb.hypotheses] for nb in lists]
    scored = [NBestList(nb.utt_id, nb.hypotheses, nb.reference, [-0.1, -0.1, -0.3, -0.4]) for nb in lists]
    kaldi = [NBestList(nb.utt_id, nb.hypotheses, nb.reference, am_scores=[5.0, 6.0, 6.0, 7.0]) for nb in lists]
    for variant in (lists, scored, kaldi):
        assert rescore(variant, lm_scores, 0.0, 0.0) == [0] * 20


def save_model(path: Path, model: nn.Module, vocab: tuple[str, ...] | None = VOCAB.words) -> Path:
    state = {"model": model.state_dict(), "config": model_config_dict(model)}
    if vocab is not None:
        state["vocab"] = list(vocab)
    save_checkpoint(path, state)
    return path


def write_jsonl(path: Path, lists: list[NBestList]) -> Path:
    lines = [json.dumps({"id": nb.utt_id, "hyps": nb.hypotheses, "ref": nb.reference}) for nb in lists]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_run_nbest_end_to_end_with_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = save_model(tmp_path / "a" / "best.pt", tiny_model("lstm"))
    b = save_model(tmp_path / "b" / "best.pt", tiny_model("transformer", seed=1))
    nbest = write_jsonl(tmp_path / "lists.jsonl", synthetic_nbest(12))
    argv = [str(a), "--nbest", str(nbest), "--compare", str(b), "--dev-count", "6",
            "--lm-weights", "0", "0.5,1", "--ins-penalties=-0.5,0,0.5", "--json"]
    assert run_nbest(build_parser().parse_args(argv), load_any_model) == 0
    out = capsys.readouterr().out
    assert "dev 6, test 6" in out and "test WER" in out and "p-value" in out
    data = json.loads(out.strip().splitlines()[-1])
    assert data["format"] == "jsonl" and set(data["models"]) == {str(a), str(b)}
    lm = data["models"][str(a)]["lm"]
    assert lm["lm_weight"] in (0.0, 0.5, 1.0) and lm["ins_penalty"] in (-0.5, 0.0, 0.5)
    assert lm["test"]["utterances"] == 6 and "per_utt" not in lm
    assert 0.0 <= data["mapsswe"]["p_value"] <= 1.0 and data["mapsswe"]["part"] == "test"


def test_packed_model_needs_a_vocabulary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = tiny_model("lstm")
    ckpt = save_model(tmp_path / "best.pt", model)
    packed = tmp_path / "model.mpq"
    export_packed(model, PrecisionMap.uniform(model, 4), packed)
    nbest = write_jsonl(tmp_path / "lists.jsonl", synthetic_nbest(6))
    assert main([str(packed), "--nbest", str(nbest)]) == 2
    err = capsys.readouterr().err
    assert str(packed) in err and "--vocab" in err
    words = tmp_path / "words.txt"
    words.write_text("\n".join(VOCAB.words) + "\n")
    for source in (ckpt, words):
        assert main([str(packed), "--nbest", str(nbest), "--vocab", str(source), "--lm-weights", "0.1"]) == 0
    assert "test WER" in capsys.readouterr().out
    short = tmp_path / "short.txt"
    short.write_text(f"{EOS}\nthe\n")
    with pytest.raises(ValueError, match="output words"):
        run_nbest(build_parser().parse_args([str(packed), "--nbest", str(nbest), "--vocab", str(short)]),
                  load_any_model)


def test_malformed_inputs_name_the_file(tmp_path: Path) -> None:
    ckpt = save_model(tmp_path / "best.pt", tiny_model("lstm"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "u1", "hyps": ["a"], "ref": "a"}\n{"id": "u2"}\n')
    no_ref = write_jsonl(tmp_path / "noref.jsonl", [NBestList("u1", ["the cat"], None)])
    array = tmp_path / "lists.json"
    array.write_text('[{"input": ["the cat"], "output": 3}]')
    for path, what in ((bad, "line 2"), (no_ref, "reference"), (array, "record 0")):
        with pytest.raises(ValueError, match="reference|line|record") as info:
            run_nbest(build_parser().parse_args([str(ckpt), "--nbest", str(path)]), load_any_model)
        assert str(path) in str(info.value) and what in str(info.value)
    dup = tmp_path / "dup.txt"
    dup.write_text(f"{EOS}\nthe\nthe\n")
    with pytest.raises(ValueError, match="line 3: duplicate"):
        good = write_jsonl(tmp_path / "good.jsonl", synthetic_nbest(4))
        run_nbest(build_parser().parse_args([str(ckpt), "--nbest", str(good), "--vocab", str(dup)]),
                  load_any_model)
