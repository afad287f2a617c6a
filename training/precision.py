"""Which precision training runs in, and the bf16 set-up that makes bf16 pay off on a CPU as on a GPU.

A LoRA trains a few thousand fp32 weights on top of a frozen base. In bf16 the base itself is held in bf16
(so no weight is cast again at every step), the LoRA weights and the optimizer stay in fp32 (PEFT's
autocast_adapter_dtype), and the matrix products run in bf16 under autocast: on a CPU with AMX they are 3 to 8
times faster than in fp32 (bench/precision.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# The attention implementation a bf16 base runs with on a CPU (register_fp32_attention).
FP32_ATTENTION = "scalpel_sdpa_fp32"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 matrix products in hardware (AMX or AVX512-BF16), where bf16 training is
    faster than fp32; elsewhere PyTorch emulates bf16 and fp32 is the faster choice."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


# The narrowest model `auto` trains in bf16 on a CPU. AMX multiplies 16 x 32 tiles: a model 576 wide (the default
# base) trains 1.7-2x faster in bf16, while on a toy model a few dozen wide the products are too small to gain, and
# bf16's rounding is large beside its weights.
MIN_BF16_WIDTH = 256


def choose_precision(requested: str, width: int | None = None) -> str:
    """`auto` follows the device the Trainer picks (cuda, then mps, then cpu): bf16 on GPUs and on CPUs that compute
    it in hardware (for a model at least MIN_BF16_WIDTH wide, when `width`, its hidden size, is known), fp16 on older
    GPUs, fp32 elsewhere."""
    if requested != "auto":
        return requested
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if torch.backends.mps.is_available():
        return "fp32"
    wide = width is None or width >= MIN_BF16_WIDTH
    return "bf16" if cpu_has_native_bf16() and wide else "fp32"


def for_base(requested: str, gguf_file) -> str:
    """choose_precision for a base served from `gguf_file`: its width is read only when `auto` needs it."""
    return choose_precision(requested, model_width(gguf_file) if requested == "auto" else None)


def model_width(gguf_file) -> int | None:
    """A base's hidden size, from the metadata of the GGUF it is served from; None when it does not say."""
    from core.gguf_meta import read_gguf

    metadata = read_gguf(gguf_file, with_tokens=False).metadata
    width = metadata.get(f"{metadata.get('general.architecture', '')}.embedding_length")
    return int(width) if isinstance(width, int) else None


def base_dtype(precision: str) -> torch.dtype:
    """The dtype the frozen base is loaded in: bf16 when training in bf16, else fp32 (fp16 training keeps fp32
    master weights through the Trainer's scaler)."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def _sdpa_in_fp32(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    dtype = query.dtype
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(
            module, query.float(), key.float(), value.float(), attention_mask, **kwargs
        )
    return out.to(dtype), weights


def register_fp32_attention() -> str:
    """Register transformers' SDPA attention computed in fp32 (with SDPA's own masks) under FP32_ATTENTION.

    Written here because no library offers it: on a CPU, PyTorch's flash-attention backward is about three times
    slower in bf16 than in fp32 (4.5 against 1.4 ms a layer for a batch of four 70-token rows, measured with
    torch.profiler on the AMX Xeon), so a bf16 base computes its attention, a small part of the products, in fp32.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FP32_ATTENTION, _sdpa_in_fp32)
    AttentionMaskInterface.register(FP32_ATTENTION, sdpa_mask)
    return FP32_ATTENTION


def prepare_base(model, precision: str) -> None:
    """Set a base loaded for `precision` up for training: on a CPU, a bf16 base computes attention in fp32."""
    if precision == "bf16" and not torch.cuda.is_available() and not torch.backends.mps.is_available():
        model.set_attn_implementation(register_fp32_attention())


@contextlib.contextmanager
def without_input_casts(model, precision: str) -> Iterator[None]:
    """Around a whole run on a bf16 base: PEFT's cast of each LoRA input to the adapter's fp32 is off (autocast would
    cast it back to bf16 for the product: two copies of every activation for nothing). The forward passes still
    need autocast (`autocast`, the Trainer's own): this context is not one, because autocast keeps its bf16 copies
    of the fp32 LoRA weights until the outermost autocast context ends, and a run inside one would train on the
    copies made at its first step."""
    if precision != "bf16":
        yield
        return
    from peft.helpers import disable_input_dtype_casting

    with disable_input_dtype_casting(model):
        yield


def autocast(model) -> contextlib.AbstractContextManager:
    """Around one forward pass outside the Trainer (which has its own): bf16 autocast when the base is held in
    bf16, else nothing."""
    bf16 = any(p.dtype == torch.bfloat16 for p in model.parameters())
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(next(model.parameters()).device.type, dtype=torch.bfloat16)
