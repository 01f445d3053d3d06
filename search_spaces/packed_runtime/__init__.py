"""Run a packed model from its packed low-bit weights: ``load_packed(path, keep_packed=True)``.

The quantized tensors of a ``.mpq`` file stay bit-packed in memory at their real width
(:class:`PackedTensor`); linear layers and LSTM gates dequantize a block of rows at a time inside
their matmuls, embeddings decode only the rows they look up, and float32 leftovers stay as they
are. The logits are those of the unpacked model (see ``tests/test_packed_inference.py`` for the
tolerance). Such a model is inference-only.
"""

from search_spaces.packed_runtime.build import (
                                                fill_packed,
                                                load_packed_model,
                                                packed_model_size,
                                                packed_tensors,
                                                resident_weight_bytes,
)
from search_spaces.packed_runtime.lstm import PackedLSTMLayer, PackedTorchLSTM
from search_spaces.packed_runtime.modules import (
                                                PackedEmbedding,
                                                PackedLinear,
                                                PackedModelError,
                                                PackedOptions,
                                                pack_parameter,
)
from search_spaces.packed_runtime.reader import PackedContents, read_packed_contents
from search_spaces.packed_runtime.tensor import PackedPiece, PackedTensor

__all__ = ["PackedContents", "PackedEmbedding", "PackedLSTMLayer", "PackedLinear", "PackedModelError", "PackedOptions",
           "PackedPiece", "PackedTensor", "PackedTorchLSTM", "fill_packed", "load_packed_model", "pack_parameter",
           "packed_model_size", "packed_tensors", "read_packed_contents", "resident_weight_bytes"]
