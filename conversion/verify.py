"""Prove a conversion right: the same prompts through PyTorch (transformers + PEFT) and llama.cpp, logits compared."""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import torch
from tqdm.auto import tqdm

from conversion.architecture import layout_from_gguf
from conversion.lora_to_gguf import convert_lora
from core.gguf_meta import read_gguf

PROMPTS = [
    "What does 42 mean? 42 = FOR TWO: collaborative intelligence.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "The capital of France is Paris, and the capital of Japan is Tokyo.",
    "Unicode: naïve café, 東京, emoji 🚀, and the seed's mojibake ‚Äî stays as it is.",
    "1 + 1 = 11 when two people work together; never 2 1, always 4 2.",
]
# Minimum top-1 agreement per base type, counted where PyTorch's top-1 leads its runner-up by at least
# DECIDED_MARGIN logits: a near-tie that flips under llama.cpp's quantized activations is not a
# conversion error. f32 is held to a max abs logit difference instead.
DECIDED_MARGIN = 0.25
TOP1_THRESHOLDS = {
    "MOSTLY_F16": 0.99,
    "MOSTLY_BF16": 0.99,
    "MOSTLY_Q8_0": 0.98,
    "MOSTLY_Q6_K": 0.95,
    "MOSTLY_Q5_K_M": 0.92,
    "MOSTLY_Q4_K_M": 0.85,
    "MOSTLY_Q4_1": 0.85,
    "MOSTLY_Q4_0": 0.85,
}
F32_MAX_ABS = 1e-3


@dataclass
class VerifyReport:
    file_type: str
    adapter: bool
    positions: int
    max_abs: float
    mean_abs: float
    top1: float
    decided_positions: int
    top1_decided: float
    criterion: str
    passed: bool

    def as_dict(self) -> dict:
        return asdict(self)


def llama_cpp_logits(
    gguf_path: Path, prompts: list[list[int]], lora_gguf: Path | None = None, *, progress: bool = False
) -> list[np.ndarray]:
    n_ctx = max(len(p) for p in prompts) + 8
    # An f32 KV cache: the default f16 cache alone moves logits by about 1e-3.
    llm = llama_cpp.Llama(
        model_path=str(gguf_path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        logits_all=True,
        verbose=False,
        lora_path=str(lora_gguf) if lora_gguf else None,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
    )
    try:
        out = []
        for tokens in tqdm(prompts, desc="llama.cpp logits", unit="prompt", disable=not progress, leave=False):
            llm.reset()
            llm.eval(tokens)
            out.append(np.array(llm.scores[: len(tokens)], dtype=np.float32))
        return out
    finally:
        llm.close()


def torch_logits(model, prompts: list[list[int]], *, progress: bool = False) -> list[np.ndarray]:
    model.eval()
    shown = tqdm(prompts, desc="PyTorch logits", unit="prompt", disable=not progress, leave=False)
    with torch.no_grad():
        return [model(torch.tensor([tokens])).logits[0].float().numpy() for tokens in shown]


def file_type_name(gguf_path: Path) -> str:
    value = read_gguf(gguf_path, with_tokens=False).metadata.get("general.file_type", 0)
    try:
        return gguf.LlamaFileType(value).name
    except ValueError:
        return f"TYPE_{value}"


def compare(
    expected: list[np.ndarray], got: list[np.ndarray], file_type: str, adapter: bool, min_top1: float | None = None
) -> VerifyReport:
    diffs = np.concatenate([np.abs(e - g).ravel() for e, g in zip(expected, got, strict=False)])
    agree = np.concatenate([e.argmax(-1) == g.argmax(-1) for e, g in zip(expected, got, strict=False)])
    top2 = np.concatenate([np.sort(e, axis=-1)[:, -2:] for e in expected])
    decided = (top2[:, 1] - top2[:, 0]) >= DECIDED_MARGIN
    max_abs, top1 = float(diffs.max()), float(agree.mean())
    top1_decided = float(agree[decided].mean()) if decided.any() else 1.0
    if file_type == "ALL_F32" and min_top1 is None:
        criterion, passed = f"max abs <= {F32_MAX_ABS:g}", max_abs <= F32_MAX_ABS
    else:
        need = min_top1 if min_top1 is not None else TOP1_THRESHOLDS.get(file_type, 0.85)
        criterion, passed = f"top-1 agreement (margin >= {DECIDED_MARGIN:g}) >= {need:g}", top1_decided >= need
    return VerifyReport(
        file_type=file_type,
        adapter=adapter,
        positions=int(agree.size),
        max_abs=max_abs,
        mean_abs=float(diffs.mean()),
        top1=top1,
        decided_positions=int(decided.sum()),
        top1_decided=top1_decided,
        criterion=criterion,
        passed=passed,
    )


def verify(
    model,
    tokenizer,
    gguf_path: Path,
    *,
    peft_dir: Path | None = None,
    adapter_gguf: Path | None = None,
    prompts: list[str] = PROMPTS,
    min_top1: float | None = None,
    progress: bool = False,
) -> VerifyReport:
    """Compare `model` (with the PEFT adapter in `peft_dir`, if any) against `gguf_path` in llama.cpp; with
    `progress`, a bar for each side (a 7B base takes minutes per side on a CPU)."""
    token_lists = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    with tempfile.TemporaryDirectory() as tmp:
        if peft_dir is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(peft_dir))
            if adapter_gguf is None:
                adapter_gguf = Path(tmp) / "adapter.gguf"
                convert_lora(Path(peft_dir), layout_from_gguf(gguf_path), adapter_gguf)
        expected = torch_logits(model, token_lists, progress=progress)
        got = llama_cpp_logits(gguf_path, token_lists, adapter_gguf, progress=progress)
    return compare(expected, got, file_type_name(gguf_path), adapter=peft_dir is not None, min_top1=min_top1)
