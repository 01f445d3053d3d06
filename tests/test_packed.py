"""Packed export: real bit widths, bit-identical reload, size bound, clear errors on bad files."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evaluators.perplexity import perplexity
from search_spaces.clusters import find_clusters
from search_spaces.models import build_model
from search_spaces.packed import export_packed, load_packed
from search_spaces.packed_format import PackedFileError, pack_codes, unpack_codes
from search_spaces.precision import PrecisionMap
from search_spaces.quant import qmax
from search_spaces.size import model_size


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 8, 16])
def test_pack_unpack_round_trip_at_real_width(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    count = 1001
    if bits == 1:
        codes = torch.randint(0, 2, (count,), generator=gen) * 2 - 1
    else:
        codes = torch.randint(-qmax(bits), qmax(bits) + 1, (count,), generator=gen)
    blob = pack_codes(codes, bits)
    assert len(blob) == (count * bits + 7) // 8
    assert torch.equal(unpack_codes(blob, bits, count), codes)


def _mixed_map(model: torch.nn.Module) -> PrecisionMap:
    cycle = [1, 2, 3, 4, 5, 6, 8, 16, 32]
    names = list(find_clusters(model))
    return PrecisionMap({name: cycle[i % len(cycle)] for i, name in enumerate(names)})


MODELS = {
    "lstm": dict(kind="lstm", vocab_size=300, embed_dim=24, hidden_dim=24, num_layers=2),
    "lstm_tied": dict(kind="lstm", vocab_size=300, embed_dim=24, hidden_dim=24, num_layers=2, tie_weights=True),
    "transformer": dict(kind="transformer", vocab_size=300, d_model=24, num_layers=2, num_heads=2, d_ff=48,
                        context=16, dropout=0.0),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("granularity", ["matrix", "row"])
def test_reload_is_bit_identical_and_small(name: str, granularity: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    spec = dict(MODELS[name])
    model = build_model(spec.pop("kind"), **spec)
    base = _mixed_map(model)
    precision = PrecisionMap(dict(base.bits), granularity=granularity)
    path = tmp_path / "model.mpq"
    export_packed(model, precision, path)
    loaded, loaded_map = load_packed(path)
    assert dict(loaded_map.bits) == dict(precision.bits) and loaded_map.granularity == granularity
    for key, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], tensor), key
    stream = torch.randint(0, 300, (200,))
    assert perplexity(loaded, stream, 0)["ppl"] == perplexity(model, stream, 0)["ppl"]
    theoretical = model_size(model, precision)["theoretical_bytes"]
    assert path.stat().st_size <= theoretical * 1.01 + 16 * 1024


def test_uniform_two_bit_file_is_about_sixteen_times_smaller(tmp_path: Path) -> None:
    model = build_model("lstm", vocab_size=2000, embed_dim=64, hidden_dim=64, num_layers=2)
    fp_bytes = 4 * sum(p.numel() for p in model.parameters())
    export_packed(model, PrecisionMap.uniform(model, 2), tmp_path / "m.mpq")
    ratio = fp_bytes / (tmp_path / "m.mpq").stat().st_size
    assert 12 < ratio < 16  # 2-bit weights; FP32 biases, scales and the header cost a little


def _packed(tmp_path: Path) -> Path:
    model = build_model("lstm", vocab_size=100, embed_dim=8, hidden_dim=8, num_layers=1)
    path = tmp_path / "m.mpq"
    export_packed(model, PrecisionMap.uniform(model, 3), path)
    return path


def test_truncated_file_is_a_clear_error(tmp_path: Path) -> None:
    path = _packed(tmp_path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(PackedFileError, match=r"m\.mpq: truncated"):
        load_packed(path)
    path.write_bytes(path.read_bytes()[:30])
    with pytest.raises(PackedFileError, match=r"m\.mpq: truncated"):
        load_packed(path)


def test_corrupted_payload_and_magic_are_clear_errors(tmp_path: Path) -> None:
    path = _packed(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(PackedFileError, match="CRC32 mismatch"):
        load_packed(path)
    path.write_bytes(b"PK\x03\x04 definitely a zip")
    with pytest.raises(PackedFileError, match="not an mpnas packed file"):
        load_packed(path)
    with pytest.raises(PackedFileError, match="cannot read"):
        load_packed(tmp_path / "absent.mpq")
