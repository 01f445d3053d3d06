"""Rescoring straight from packed low-bit weights: ``load_packed(path, keep_packed=True)``.

Tolerances: the mpnas LSTM and Transformer (and the plain Transformer, whose modules read the same
dequantized weights) give logits bit-identical to the unpacked model (``torch.equal``): the packed
layers compute each output feature with the same float32 ``addmm`` on the same dequantized values.
A plain ``nn.LSTM`` runs torch's fused kernel when unpacked, which sums in its own order, so there
the packed logits agree to ``max|diff| <= 1e-5 * max|logit|``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from search_spaces.clusters import find_clusters
from search_spaces.models import build_model
from search_spaces.packed import export_packed, load_packed
from search_spaces.packed_format import PackedFileError, read_packed_header
from search_spaces.packed_runtime import (
    PackedEmbedding,
    PackedLinear,
    PackedModelError,
    PackedOptions,
    packed_tensors,
    resident_weight_bytes,
)
from search_spaces.precision import PrecisionMap
from tests.plain_lms import VOCAB, PlainLSTM, PlainTransformer, token_stream

CYCLE = [1, 3, 5, 8, 2, 4, 6, 16, 32]  # every width, 1/3/5/8 first so that small models get them all
MODELS = {  # embed_dim 20: rows of 20 codes at 1, 3 and 5 bits do not fill whole bytes (re-laid out)
    "lstm": dict(kind="lstm", vocab_size=300, embed_dim=20, hidden_dim=24, num_layers=2),
    "lstm_tied": dict(kind="lstm", vocab_size=300, embed_dim=24, hidden_dim=24, num_layers=2, tie_weights=True),
    "transformer": dict(kind="transformer", vocab_size=300, d_model=24, num_layers=2, num_heads=2, d_ff=48,
                        context=16, dropout=0.0),
}
SMALL_BLOCKS = PackedOptions(block_bytes=4 * 24 * 5)  # 16 rows (the least) of 24 floats: many blocks


def _mixed_map(model: torch.nn.Module, granularity: str = "matrix", leftover_bits: int = 32) -> PrecisionMap:
    names = list(find_clusters(model))
    return PrecisionMap({n: CYCLE[i % len(CYCLE)] for i, n in enumerate(names)}, granularity=granularity,
                        leftover_bits=leftover_bits)


def _export(name: str, tmp_path: Path, granularity: str = "matrix", leftover_bits: int = 32
            ) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    spec = dict(MODELS[name])
    model = build_model(spec.pop("kind"), **spec)
    path = tmp_path / f"{name}.mpq"
    export_packed(model, _mixed_map(model, granularity, leftover_bits), path)  # quantizes `model` in place
    return model.eval(), path


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("granularity,leftover_bits", [("matrix", 32), ("row", 8)])
@pytest.mark.parametrize("options", [None, SMALL_BLOCKS, PackedOptions(block_bytes=4 * 24 * 7, recurrent="blocks")],
                         ids=["default", "small_blocks", "recurrent_blocks"])
def test_packed_logits_equal_the_unpacked_model(name: str, granularity: str, leftover_bits: int,
                                                options: PackedOptions | None, tmp_path: Path) -> None:
    model, path = _export(name, tmp_path, granularity, leftover_bits)
    unpacked, _ = load_packed(path)
    packed, precision = load_packed(path, keep_packed=True, options=options)
    assert precision == load_packed(path)[1]
    assert {p.bits for t in packed_tensors(packed) for p in t.pieces} >= {1, 3, 5, 8}
    tokens = torch.randint(0, 300, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = unpacked.eval()(tokens).logits
        assert torch.equal(model(tokens).logits, expected)
        out = packed(tokens)
        assert torch.equal(out.logits, expected)
        if out.state is not None:  # the carried LSTM state too
            again = packed(tokens, out.state).logits
            assert torch.equal(again, unpacked(tokens, unpacked(tokens).state).logits)


def test_packed_tensors_hold_the_files_code_bytes_and_no_float_copy(tmp_path: Path) -> None:
    model, path = _export("transformer", tmp_path)  # d_model 24: every row fills whole bytes
    header, _ = read_packed_header(path)
    code_bytes = sum(p["nbytes"] for t in header["tensors"] for p in t["pieces"] if p["kind"] == "codes")
    packed, _ = load_packed(path, keep_packed=True)
    tensors = packed_tensors(packed)
    assert sum(t.code_bytes() for t in tensors) == code_bytes
    assert len(tensors) == sum(1 for t in header["tensors"] if any(p["kind"] == "codes" for p in t["pieces"]))
    # tied embedding and decoder share one packed tensor
    assert packed.decoder.weight_packed is packed.embedding.weight_packed
    assert isinstance(packed.decoder, PackedLinear) and isinstance(packed.embedding, PackedEmbedding)
    # what stays float32 is only what the file stores as float32 (or affine leftovers)
    fp_values = sum(p.numel() for p in [*packed.parameters(), *packed.buffers()])
    stored_fp = sum(p["nbytes"] // 4 for t in header["tensors"] for p in t["pieces"] if p["kind"] == "fp32")
    assert fp_values + sum(t.resident_bytes() - t.code_bytes() for t in tensors) // 4 >= stored_fp
    assert resident_weight_bytes(packed) <= header["payload_bytes"] + 4 * len(tensors)


def test_rows_that_do_not_fill_bytes_cost_less_than_a_byte_per_row(tmp_path: Path) -> None:
    _, path = _export("lstm", tmp_path)
    header, _ = read_packed_header(path)
    pieces = [p for t in header["tensors"] for p in t["pieces"] if p["kind"] == "codes"]
    rows = sum(p["rows"][1] - p["rows"][0] for p in pieces)
    packed, _ = load_packed(path, keep_packed=True)
    held = sum(t.code_bytes() for t in packed_tensors(packed))
    assert sum(p["nbytes"] for p in pieces) <= held < sum(p["nbytes"] for p in pieces) + rows


def test_embedding_decodes_only_looked_up_rows_and_linear_one_block_at_a_time(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import search_spaces.packed_runtime.tensor as tensor_module

    _, path = _export("lstm_tied", tmp_path)  # a 1-bit table of 300 rows, tied to the decoder
    packed, _ = load_packed(path, keep_packed=True, options=SMALL_BLOCKS)
    assert isinstance(packed.decoder, PackedLinear) and packed.decoder.weight_packed.pieces[0].bits == 1
    decoded: list[int] = []
    real = tensor_module.decode_rows

    def spy(data: torch.Tensor, *args: object) -> torch.Tensor:
        decoded.append(data.shape[0])
        return real(data, *args)

    monkeypatch.setattr(tensor_module, "decode_rows", spy)
    tokens = torch.tensor([[5, 7, 5, 299]])
    with torch.no_grad():
        vectors = packed.embedding(tokens)
    assert decoded == [4]  # 4 lookups of a 300-row table
    assert torch.equal(vectors, load_packed(path)[0].embedding(tokens))
    decoded.clear()
    with torch.no_grad():
        packed.decoder(torch.randn(2, 24))
    assert max(decoded) < SMALL_BLOCKS.block_rows(24) + 16 and sum(decoded) == 300 and len(decoded) > 5


def test_corrupted_or_truncated_file_raises_before_a_model_is_built(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import search_spaces.packed_runtime.build as build_module

    _, path = _export("transformer", tmp_path)
    raw = path.read_bytes()

    def no_model(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("a model was built from a bad file")

    monkeypatch.setattr(build_module, "model_from_config", no_model)
    flipped = bytearray(raw)
    flipped[-100] ^= 0x01
    cases = {"corrupted": bytes(flipped), "truncated": raw[:-7], "no header": raw[:30], "not packed": b"x" * 40,
             "padded": raw + b"\0"}
    for label, blob in cases.items():
        bad = tmp_path / f"{label}.mpq"
        bad.write_bytes(blob)
        with pytest.raises(PackedFileError, match=str(bad.name)):
            load_packed(bad, keep_packed=True)


def test_packed_model_is_inference_only(tmp_path: Path) -> None:
    _, path = _export("lstm", tmp_path)
    packed, _ = load_packed(path, keep_packed=True)
    assert not packed.training and not any(p.requires_grad for p in packed.parameters())
    with pytest.raises(PackedModelError, match="inference-only"):
        packed.train()
    packed.eval()  # still fine


def _plain_logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    out = model(tokens)
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("kind", ["lstm", "transformer"])
@pytest.mark.parametrize("meta", [False, True], ids=["skeleton", "meta_skeleton"])
def test_plain_torch_lms_packed_logits(kind: str, meta: bool, tmp_path: Path) -> None:
    cls = PlainLSTM if kind == "lstm" else PlainTransformer
    model = cls(seed=0).eval()
    clusters = list(find_clusters(model))
    if kind == "lstm":  # the fused gate matrices are row-slice clusters
        assert "lstm.weight_ih_l0.forget_gate" in clusters
    else:
        assert "encoder.layers.0.self_attn.in_proj.k" in clusters
    precision = PrecisionMap({n: CYCLE[i % len(CYCLE)] for i, n in enumerate(clusters)}, leftover_bits=8)
    path = tmp_path / "plain.mpq"
    export_packed(model, precision, path)
    if meta:
        with torch.device("meta"):
            skeleton = cls(seed=3)
    else:
        skeleton = cls(seed=3)
    packed, loaded_map = load_packed(path, model=skeleton, keep_packed=True, options=SMALL_BLOCKS)
    assert packed is skeleton and loaded_map == precision
    tokens = token_stream(40, seed=2).view(2, 20) % VOCAB
    with torch.no_grad():
        expected = _plain_logits(model, tokens)
        got = _plain_logits(packed, tokens)
    if kind == "transformer":
        assert torch.equal(got, expected)
    else:  # torch's fused LSTM kernel vs the same math written out: rounding only
        assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()
        state = model(tokens)[1]
        with torch.no_grad():
            got_state = packed(tokens)[1]
        for a, b in zip(state, got_state, strict=True):
            assert a.shape == b.shape and (a - b).abs().max() <= 1e-5


def test_cli_evaluate_keep_packed_gives_the_same_perplexity(tiny_corpus_dir: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from nas.cli.main import main
    from nas.core.data import load_corpus

    vocab = len(load_corpus(tiny_corpus_dir).vocab.words)
    torch.manual_seed(0)
    model = build_model("lstm", vocab_size=vocab, embed_dim=16, hidden_dim=16, num_layers=1)
    path = tmp_path / "m.mpq"
    export_packed(model, _mixed_map(model), path)
    results = []
    for extra in ([], ["--keep-packed"]):
        assert main(["evaluate", str(path), "--data", str(tiny_corpus_dir), "--json", *extra]) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    plain, packed = results
    assert packed["test"] == plain["test"] and packed["valid"] == plain["valid"]
    assert packed["size"] == plain["size"]
    bad = tmp_path / "bad.mpq"
    bad.write_bytes(path.read_bytes()[:-5])
    assert main(["evaluate", str(bad), "--data", str(tiny_corpus_dir), "--keep-packed"]) == 2
    assert "truncated" in capsys.readouterr().err
