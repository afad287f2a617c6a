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


_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|DIGITS| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# The byte-level pre-tokenizers llama.cpp knows by name, as tokenizer.json spells them.
PRE_TOKENIZERS = {
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    "smollm": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    ),
    "llama-bpe": lambda: _split_then_bytes(r"\p{N}{1,3}"),
    "deepseek-coder": lambda: _deepseek_coder(),
    "qwen2": lambda: _split_then_bytes(r"\p{N}"),
}


def _split_then_bytes(digits: str):
    from tokenizers import Regex

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT.replace("DIGITS", digits)), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _deepseek_coder():
    from tokenizers import Regex

    from conversion.vocab import DEEPSEEK_CODER_SPLITS

    splits = [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in DEEPSEEK_CODER_SPLITS]
    return pre_tokenizers.Sequence(
        [
            *splits,
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def build_bpe_tokenizer(vocab_size: int = 320, pre: str = "gpt-2") -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
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
        for name, p in model.named_parameters():
            if p.ndim == 2 or name.endswith(".bias"):  # biases too, or Qwen2's zero-initialised ones test nothing
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
    pre: str = "gpt-2",
) -> Path:
    """Save a random LlamaForCausalLM (safetensors) and a BPE tokenizer into `folder`."""
    torch.manual_seed(seed)
    tokenizer = build_bpe_tokenizer(pre=pre)
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


def build_tiny_spm_llama(
    folder: Path,
    *,
    seed: int = 1,
    extra_tokens: int = 16,
    rope_theta: float = 1e6,
    json_only: bool = False,
    mistral: bool = False,
    tie: bool = False,
) -> Path:
    """A CodeLlama-shaped toy: SentencePiece tokenizer with added tokens past the .model (as CodeLlama's
    32016 = 32000 + 16), and rope theta 1e6.

    `json_only` leaves only tokenizer.json, as transformers 5 saves a Llama-2/CodeLlama tokenizer (BPE,
    Metaspace, byte fallback); `mistral` saves a MistralForCausalLM with a sliding window instead."""
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
    shape = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        rope_theta=rope_theta,
        tie_word_embeddings=tie,
        bos_token_id=1,
        eos_token_id=2,
    )
    if mistral:
        from transformers import MistralConfig, MistralForCausalLM

        model = MistralForCausalLM(MistralConfig(num_key_value_heads=2, sliding_window=128, **shape))
    else:
        model = LlamaForCausalLM(LlamaConfig(num_key_value_heads=4, **shape))
    _widen_and_save(model, tokenizer, folder)
    if json_only:
        (folder / "tokenizer.model").unlink()
    return folder


def build_tiny_qwen2(folder: Path, *, seed: int = 2, pre: str = "gpt-2", tie: bool = False) -> Path:
    """Qwen2: q/k/v biases and NEOX rope, so no q/k row permutation."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    tokenizer = build_bpe_tokenizer(pre=pre)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
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


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,  # short, so the scaling changes the tiny model's logits
}
# The Llama-family folders users bring, as tiny random models: name -> (builder, tokenizer kind).
ARCHITECTURES = {
    "codellama (rope 1e6)": (lambda d: build_tiny_spm_llama(d), "SentencePiece tokenizer.model"),
    "codellama, transformers 5 save": (
        lambda d: build_tiny_spm_llama(d, json_only=True),
        "SentencePiece-style tokenizer.json only",
    ),
    "mistral (sliding window)": (
        lambda d: build_tiny_spm_llama(d, json_only=True, mistral=True, rope_theta=1e4),
        "SentencePiece-style tokenizer.json only",
    ),
    "llama 3.1 (llama3 rope)": (
        lambda d: build_tiny_llama(d, rope=LLAMA3_ROPE, pre="llama-bpe"),
        "byte-level BPE, llama-bpe",
    ),
    "llama 3.2 (llama3 rope, tied)": (
        lambda d: build_tiny_llama(d, rope=LLAMA3_ROPE, pre="llama-bpe", tie=True),
        "byte-level BPE, llama-bpe",
    ),
    "deepseek-coder (rope linear 4)": (
        lambda d: build_tiny_llama(
            d, rope={"rope_type": "linear", "factor": 4.0, "rope_theta": 100000.0}, pre="deepseek-coder"
        ),
        "byte-level BPE, deepseek-coder",
    ),
    "qwen2 (biases)": (lambda d: build_tiny_qwen2(d, pre="qwen2"), "byte-level BPE, qwen2"),
    "qwen2.5 (biases, tied)": (lambda d: build_tiny_qwen2(d, pre="qwen2", tie=True), "byte-level BPE, qwen2"),
    "smollm (tied)": (lambda d: build_tiny_llama(d, pre="smollm", tie=True), "byte-level BPE, smollm"),
}
