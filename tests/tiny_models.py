"""Tiny, randomly initialised Llama-architecture models built by the tests themselves (no downloads)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "42 means FOR TWO: collaborative intelligence.",
    "def add(a, b):\n    return a + b",
    "The quick brown fox jumps over the lazy dog.",
    "Never 2 1, always 4 2, and 1 + 1 = 11.",
] * 20


def build_bpe_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|im_end|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _widen_and_save(model, tokenizer, folder: Path) -> Path:
    """A random init is tiny; widen the matrices so logits differ visibly between tokens, then save."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def build_tiny_llama(
    folder: Path,
    *,
    seed: int = 0,
    n_head: int = 4,
    n_head_kv: int = 2,
    hidden: int = 64,
    layers: int = 2,
    tie: bool = False,
    rope: dict | None = None,
) -> Path:
    """Save a random LlamaForCausalLM (safetensors) and a BPE tokenizer into `folder`."""
    torch.manual_seed(seed)
    tokenizer = build_bpe_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=n_head,
        num_key_value_heads=n_head_kv,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if rope is not None:
        config.rope_parameters = {"rope_theta": 10000.0, **rope}
    return _widen_and_save(LlamaForCausalLM(config), tokenizer, folder)


def build_tiny_spm_llama(folder: Path, *, seed: int = 1, extra_tokens: int = 16, rope_theta: float = 1e6) -> Path:
    """A CodeLlama-shaped toy: SentencePiece tokenizer with added tokens past the .model (as CodeLlama's
    32016 = 32000 + 16), and rope theta 1e6."""
    import shutil

    import sentencepiece as spm
    from transformers import LlamaTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 5),
        model_prefix=str(folder / "sp"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    shutil.move(folder / "sp.model", folder / "tokenizer.model")
    (folder / "sp.vocab").unlink()
    tokenizer = LlamaTokenizer.from_pretrained(folder)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(extra_tokens)])
    tokenizer.chat_template = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=rope_theta,
        bos_token_id=1,
        eos_token_id=2,
    )
    return _widen_and_save(LlamaForCausalLM(config), tokenizer, folder)


def build_tiny_qwen2(folder: Path, *, seed: int = 2) -> Path:
    """Qwen2: q/k/v biases and NEOX rope, so no q/k row permutation."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    tokenizer = build_bpe_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    return _widen_and_save(Qwen2ForCausalLM(config), tokenizer, folder)


@contextlib.contextmanager
def registered_home(home: Path, model: Path, name: str = "tiny") -> Iterator[Path]:
    """SCALPEL_HOME=`home` for the block, with the tiny HF `model` registered there as `name` (f32 GGUF).

    For module-scoped fixtures, which cannot use the function-scoped `monkeypatch`.
    """
    import pytest

    from scalpel.cli.main import main

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALPEL_HOME", str(home))
        assert main(["models", "add", name, str(model), "--outtype", "f32"]) == 0
        yield Path(home)
