"""Choose and encode the GGUF tensor type of each tensor we write (f32, f16, bf16, q8_0) with gguf's own quantizers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

OUTTYPES = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0}
_NUMPY = {T.F32: np.float32, T.F16: np.float16}


def choose_type(shape: Sequence[int], outtype: str) -> T:
    """Vectors (norms) stay f32, and rows too short for a quantization block fall back to f16,
    as llama.cpp's own converter does."""
    qtype = OUTTYPES[outtype]
    if len(shape) < 2 or qtype == T.F32:
        return T.F32
    if qtype in (T.F16,):
        return qtype
    block, _ = quants.GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block == 0 else T.F16


def encode(data: np.ndarray, qtype: T) -> np.ndarray:
    """f16 sources going to f16 are not widened to f32 and back: a copy-free path for the common case."""
    if qtype in _NUMPY:
        return np.ascontiguousarray(data, dtype=_NUMPY[qtype])
    return quants.quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)


def tensor_info(shape: Sequence[int], qtype: T) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape as GGUFWriter.add_tensor_info wants it, numpy dtype, byte count) before the data exists."""
    shape = tuple(int(s) for s in shape)
    if qtype in _NUMPY:
        dtype = np.dtype(_NUMPY[qtype])
        return shape, dtype, int(np.prod(shape)) * dtype.itemsize
    byte_shape = quants.quant_shape_to_byte_shape(shape, qtype)
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape))
