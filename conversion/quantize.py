"""Quantize a GGUF base with llama.cpp's own quantizer, for the k-quants we do not write ourselves."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import llama_cpp

from core.atomic import temporary_path
from core.errors import ScalpelError

LLAMA_QUANTS = {
    "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
    "q4_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M,
    "q5_k_m": llama_cpp.LLAMA_FTYPE_MOSTLY_Q5_K_M,
    "q6_k": llama_cpp.LLAMA_FTYPE_MOSTLY_Q6_K,
    "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
}


def quantize(src: Path, dst: Path, kind: str, *, threads: int | None = None) -> Path:
    """Write `dst` (atomically) as `kind` from an f32/f16/bf16 GGUF `src`."""
    if kind not in LLAMA_QUANTS:
        raise ScalpelError(f"unknown quantization {kind!r}; choose from {sorted(LLAMA_QUANTS)}", param="outtype")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_QUANTS[kind]
    params.nthread = threads or os.cpu_count() or 1
    with temporary_path(Path(dst)) as tmp:
        status = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if status != 0 or not tmp.is_file():
            raise ScalpelError(
                f"llama.cpp could not quantize {src} to {kind} (status {status})",
                param=str(src),
                code="quantize_failed",
            )
    return Path(dst)
