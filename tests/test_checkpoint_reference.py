"""Reference FP checkpoints (.safetensors): round trip, tied weights, errors, the committed files."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from evaluators.perplexity import perplexity
from nas.cli.main import main as cli_main
from nas.cli.nbest import load_vocabulary
from nas.config.sections import load_config
from nas.core.checkpoint import load_checkpoint, save_checkpoint
from nas.core.data import Corpus, load_corpus
from nas.core.reference import FORMAT_VERSION, is_reference, load_reference, save_reference
from nas.pipeline.stages import checkpoint_hash
from nas.retrain.run import load_fp_checkpoint
from search_spaces.models import build_model, model_config_dict, restore_model
from tests.conftest import REPO, ptb_location

TINY = {"lstm": {"embed_dim": 8, "hidden_dim": 8, "num_layers": 2},
        "lstm_tied": {"embed_dim": 8, "hidden_dim": 8, "num_layers": 1, "tie_weights": True},
        "transformer": {"d_model": 16, "num_layers": 2, "num_heads": 2, "d_ff": 32, "context": 6, "dropout": 0.0}}
REFERENCES = {"lstm": REPO / "benchmarks" / "checkpoints" / "ptb_lstm.safetensors",
              "transformer": REPO / "benchmarks" / "checkpoints" / "ptb_transformer.safetensors"}


def tiny_ckpt(name: str, vocab: list[str] | None = None, seed: int = 0) -> dict:
    """A best.pt-shaped dict of a tiny model of ``name`` (see TINY)."""
    vocab = vocab or ["<eos>", "<unk>", "a", "b", "c", "d", "e"]
    torch.manual_seed(seed)
    model = build_model("transformer" if name == "transformer" else "lstm", vocab_size=len(vocab), **TINY[name])
    return {"model": model.state_dict(), "config": model_config_dict(model), "vocab": vocab, "valid_ppl": 12.5,
            "epoch": 3}


def write(path: Path, ckpt: dict, **extra: object) -> Path:
    return save_reference(path, ckpt, valid_ppl=12.25, test_ppl=11.75, command="python train.py --x 1",
                          revision="0123abc", extra=extra or None)


@pytest.mark.parametrize("name", ["lstm", "lstm_tied", "transformer"])
def test_round_trip_is_exact(tmp_path: Path, name: str) -> None:
    ckpt = tiny_ckpt(name)
    path = write(tmp_path / "ref.safetensors", ckpt, valid_slice_tokens=40, valid_slice_ppl=7.125)
    loaded = load_reference(path)
    assert set(loaded["model"]) == set(ckpt["model"])
    for key, tensor in ckpt["model"].items():
        assert loaded["model"][key].dtype == tensor.dtype
        assert torch.equal(loaded["model"][key], tensor), key
    assert loaded["config"] == ckpt["config"]
    assert loaded["vocab"] == ckpt["vocab"]
    assert (loaded["valid_ppl"], loaded["test_ppl"], loaded["epoch"]) == (12.25, 11.75, 3)
    meta = loaded["meta"]
    assert meta["format"] == "mpnas-reference" and meta["format_version"] == FORMAT_VERSION
    assert meta["command"] == "python train.py --x 1" and meta["revision"] == "0123abc"
    assert meta["created"].endswith("+00:00")
    assert (meta["valid_slice_tokens"], meta["valid_slice_ppl"]) == (40, 7.125)
    config = dict(loaded["config"])
    model = build_model(config.pop("type"), **config)
    model.load_state_dict(loaded["model"])  # strict: every key present, none extra


@pytest.mark.parametrize("name", ["lstm_tied", "transformer"])
def test_tied_weights_are_stored_once_and_restored(tmp_path: Path, name: str) -> None:
    ckpt = tiny_ckpt(name)
    # state_dict() detaches each entry: the tie shows as one storage under two tensor objects
    assert ckpt["model"]["decoder.weight"].data_ptr() == ckpt["model"]["embedding.weight"].data_ptr()
    path = write(tmp_path / "ref.safetensors", ckpt)
    with safe_open(str(path), framework="pt") as handle:
        stored = set(handle.keys())
    assert "embedding.weight" in stored and "decoder.weight" not in stored
    assert stored == set(ckpt["model"]) - {"decoder.weight"}
    # The file holds each float once: 8 bytes of header length, the header, then exactly the distinct tensors.
    distinct = sum(t.numel() * t.element_size() for k, t in ckpt["model"].items() if k != "decoder.weight")
    header = int.from_bytes(path.read_bytes()[:8], "little")
    assert path.stat().st_size == 8 + header + distinct

    loaded = load_reference(path)
    assert loaded["meta"]["aliases"] == {"decoder.weight": "embedding.weight"}
    assert loaded["model"]["decoder.weight"] is loaded["model"]["embedding.weight"]
    model = restore_model(loaded)
    assert model.decoder.weight is model.embedding.weight
    assert torch.equal(model.decoder.weight, ckpt["model"]["embedding.weight"])


def test_untied_lstm_has_no_aliases(tmp_path: Path) -> None:
    ckpt = tiny_ckpt("lstm")
    loaded = load_reference(write(tmp_path / "ref.safetensors", ckpt))
    assert loaded["meta"]["aliases"] == {}
    assert loaded["model"]["decoder.weight"] is not loaded["model"]["embedding.weight"]


def test_load_checkpoint_dispatches_and_load_fp_checkpoint_accepts(tmp_path: Path, tiny_corpus_dir: Path) -> None:
    corpus = load_corpus(tiny_corpus_dir)
    ckpt = tiny_ckpt("transformer", vocab=list(corpus.vocab.words))
    path = write(tmp_path / "ptb_transformer.safetensors", ckpt)
    assert is_reference(path) and not is_reference(tmp_path / "best.pt")
    via_checkpoint = load_checkpoint(path)
    assert via_checkpoint["config"] == ckpt["config"] and via_checkpoint["vocab"] == ckpt["vocab"]
    fp = load_fp_checkpoint(path, corpus)
    assert all(torch.equal(fp["model"][k], v) for k, v in ckpt["model"].items())
    wrong = write(tmp_path / "other.safetensors", tiny_ckpt("lstm"))
    with pytest.raises(ValueError, match="vocabulary differs"):
        load_fp_checkpoint(wrong, corpus)
    # .pt files still go through torch.load; save_checkpoint refuses the .safetensors suffix.
    save_checkpoint(tmp_path / "best.pt", ckpt)
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 3
    with pytest.raises(ValueError, match="save_reference"):
        save_checkpoint(tmp_path / "x.safetensors", ckpt)


def test_cli_evaluate_and_pipeline_hash_accept_a_reference(tmp_path: Path, tiny_corpus_dir: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    corpus = load_corpus(tiny_corpus_dir)
    ckpt = tiny_ckpt("lstm", vocab=list(corpus.vocab.words))
    path = write(tmp_path / "ref.safetensors", ckpt)
    assert cli_main(["evaluate", str(path), "--data", str(tiny_corpus_dir), "--json"]) == 0
    assert "valid: ppl" in capsys.readouterr().out
    # The same weights, config and vocabulary hash alike whichever file holds them.
    save_checkpoint(tmp_path / "best.pt", ckpt)
    assert checkpoint_hash(path) == checkpoint_hash(tmp_path / "best.pt")


def test_reference_serves_as_vocabulary_for_nbest(tmp_path: Path) -> None:
    ckpt = tiny_ckpt("lstm")
    path = write(tmp_path / "ptb_lstm.safetensors", ckpt)
    assert load_vocabulary(path).words == tuple(ckpt["vocab"])


def test_save_is_atomic_and_checks_its_input(tmp_path: Path) -> None:
    ckpt = tiny_ckpt("lstm")
    path = write(tmp_path / "sub" / "ref.safetensors", ckpt)
    assert [p.name for p in path.parent.iterdir()] == ["ref.safetensors"]  # no temporary left behind
    with pytest.raises(ValueError, match="suffix"):
        write(tmp_path / "ref.pt", ckpt)
    with pytest.raises(ValueError, match="'vocab'"):
        write(tmp_path / "novocab.safetensors", {k: v for k, v in ckpt.items() if k != "vocab"})
    with pytest.raises(ValueError, match="replace a standard entry"):
        write(tmp_path / "clash.safetensors", ckpt, command="again")


def test_truncated_file_names_the_path(tmp_path: Path) -> None:
    path = write(tmp_path / "ref.safetensors", tiny_ckpt("transformer"))
    payload = path.read_bytes()
    for size in (len(payload) - 100, 40, 3):
        path.write_bytes(payload[:size])
        with pytest.raises(ValueError, match="ref.safetensors") as info:
            load_checkpoint(path)
        assert str(path) in str(info.value)


def test_corrupted_header_names_the_path(tmp_path: Path) -> None:
    path = write(tmp_path / "ref.safetensors", tiny_ckpt("lstm"))
    payload = bytearray(path.read_bytes())
    payload[8:20] = b"#" * 12  # the JSON header starts at byte 8
    path.write_bytes(bytes(payload))
    with pytest.raises(ValueError, match="not a readable safetensors file") as info:
        load_reference(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("metadata", [None, {"producer": "someone else"}, {"format": "pt"}, {"format": '"pt"'}])
def test_plain_safetensors_is_not_a_reference(tmp_path: Path, metadata: dict | None) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2, 3)}, str(path), metadata=metadata)
    with pytest.raises(ValueError, match="not an mpnas reference") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def rewrite_metadata(path: Path, **changes: str | None) -> None:
    """Rewrite ``path`` with some metadata entries replaced (raw strings) or dropped (None)."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata())
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    for key, value in changes.items():
        if value is None:
            metadata.pop(key)
        else:
            metadata[key] = value
    save_file(tensors, str(path), metadata=metadata)


def test_wrong_version_missing_entries_and_bad_json(tmp_path: Path) -> None:
    path = write(tmp_path / "ref.safetensors", tiny_ckpt("transformer"))
    rewrite_metadata(path, format_version="2")
    with pytest.raises(ValueError, match="format version 2") as info:
        load_reference(path)
    assert str(path) in str(info.value)

    path = write(tmp_path / "ref.safetensors", tiny_ckpt("transformer"))
    rewrite_metadata(path, vocab=None, test_ppl=None)
    with pytest.raises(ValueError, match="lacks vocab, test_ppl") as info:
        load_reference(path)
    assert str(path) in str(info.value)

    path = write(tmp_path / "ref.safetensors", tiny_ckpt("transformer"))
    rewrite_metadata(path, config="{not json")
    with pytest.raises(ValueError, match="'config' is not JSON"):
        load_reference(path)

    path = write(tmp_path / "ref.safetensors", tiny_ckpt("transformer"))
    rewrite_metadata(path, aliases=json.dumps({"decoder.weight": "missing.weight"}))
    with pytest.raises(ValueError, match="missing.weight"):
        load_reference(path)


def test_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_checkpoint(tmp_path / "nope.safetensors")


# --- the committed reference checkpoints -------------------------------------------------------

@functools.cache
def ptb_corpus(folder: Path) -> Corpus:
    return load_corpus(folder)


@pytest.mark.parametrize("model", sorted(REFERENCES))
def test_committed_reference(model: str) -> None:
    path = REFERENCES[model]
    if not path.is_file():
        pytest.skip(f"{path.relative_to(REPO)} not exported yet (benchmarks/export_reference.py)")
    ckpt = load_fp_checkpoint(path)
    meta = ckpt["meta"]
    assert ckpt["config"]["type"] == model
    assert meta["command"].startswith(f"python benchmarks/fp_baselines.py --model {model}")
    assert math.isfinite(ckpt["valid_ppl"]) and math.isfinite(ckpt["test_ppl"])
    net = restore_model(ckpt)
    if model == "transformer":
        assert net.decoder.weight is net.embedding.weight
    assert all(t.dtype == torch.float32 for t in ckpt["model"].values())

    data = ptb_location()
    if data is None:
        return  # the slice check needs PTB (MPNAS_DATA or ../shared/data/ptb)
    corpus = ptb_corpus(data)
    assert tuple(ckpt["vocab"]) == corpus.vocab.words
    data_cfg = load_config(f"ptb_{model}").data
    settings = meta.get("valid_slice_eval") or {"batch_size": data_cfg.eval_batch_size, "bptt": data_cfg.bptt,
                                                "stride": data_cfg.eval_stride}
    tokens = corpus.valid[: meta["valid_slice_tokens"]]
    ppl = perplexity(net, tokens, corpus.vocab.eos_id, device="cpu", **settings)["ppl"]
    assert ppl == pytest.approx(meta["valid_slice_ppl"], rel=1e-4)


def test_a_tie_broken_by_a_clone_is_still_stored_once(tmp_path: Path) -> None:
    """best.pt files of older runs hold the tied decoder as a copy: equal values are stored once."""
    ckpt = tiny_ckpt("transformer")
    ckpt["model"] = {k: v.clone() for k, v in ckpt["model"].items()}
    assert ckpt["model"]["decoder.weight"].data_ptr() != ckpt["model"]["embedding.weight"].data_ptr()
    loaded = load_reference(write(tmp_path / "ref.safetensors", ckpt))
    assert loaded["meta"]["aliases"] == {"decoder.weight": "embedding.weight"}
    assert all(torch.equal(loaded["model"][k], v) for k, v in ckpt["model"].items())
