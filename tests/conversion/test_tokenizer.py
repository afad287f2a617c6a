"""Token ids from transformers and from llama.cpp (through our GGUF) are identical on tricky strings."""

from __future__ import annotations

import llama_cpp
import pytest
from transformers import AutoTokenizer

from conversion.hf_to_gguf import convert_base
from conversion.vocab import bpe_pre_type
from core.errors import ScalpelError

TRICKY = [
    "def add(a, b):\n    return a + b  # sum\n",
    "naïve café, 東京, Ελληνικά, emoji 🚀🤝",
    "the seed's own mojibake: ‚Äî and üéØ stay as they are",
    "numbers 12345 and 3.14159, spaces  \t  and\n\n\nnewlines",
    "<|im_start|>user\nWhat does 42 mean?<|im_end|>\n<|im_start|>assistant\n",
    "Never 2 1; always 4 2; 1 + 1 = 11.",
]

# The kinds of string llama.cpp's own tokenizer tests use (tests/test-tokenizer-0, the pre-tokenizer check
# text): whitespace runs, leading spaces, digit runs, emoji, CJK and other scripts, code, apostrophes.
LLAMA_CPP_STRINGS = [
    "",
    " ",
    "  ",
    "   ",
    "\t",
    "\n",
    "\n\n\n",
    "\t\n",
    " \n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n",
    "Hello world",
    " Hello world",
    "  Hello",
    "    Hello\n    Hello",
    " Hello World!",
    "Hello, y'all! How are you 😁 ?我想在apple工作1314151天～",
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3",
    "🚀 (normal) 😶‍🌫️ (multiple emojis concatenated) ✅ 🦙🦙",
    "нещо на Български កាន់តែពិសេសអាច",
    '------=======  ```````""""......!!!!!!??????',
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
    "def add(a, b):\n\treturn a + b  # sum\n",
    "if (x) {\n    return y;\n}",
]


def llama_tokens(gguf_path, text: str) -> list[int]:
    llm = llama_cpp.Llama(model_path=str(gguf_path), vocab_only=True, verbose=False)
    try:
        return llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
    finally:
        llm.close()


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tiny.gguf"
    convert_base(tiny_llama, out, outtype="f16", progress=False)
    return out


@pytest.mark.parametrize("text", TRICKY)
def test_bpe_tokenization_is_identical(tiny_llama, tiny_gguf, text):
    hf = AutoTokenizer.from_pretrained(tiny_llama)
    assert llama_tokens(tiny_gguf, text) == hf(text, add_special_tokens=False)["input_ids"]


@pytest.mark.e2e
def test_default_model_tokenization_is_identical(home):
    from core import model_store
    from training.base_model import load_tokenizer

    entry = model_store.ensure_default()
    hf = load_tokenizer(entry)
    for text in TRICKY:
        assert llama_tokens(entry.gguf, text) == hf(text, add_special_tokens=False)["input_ids"], text


def test_pre_tokenizers_are_named_or_refused():
    assert bpe_pre_type({"type": "ByteLevel", "use_regex": True}) == "gpt-2"
    assert (
        bpe_pre_type(
            {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Digits", "individual_digits": True},
                    {"type": "ByteLevel", "use_regex": True},
                ],
            }
        )
        == "smollm"
    )
    with pytest.raises(ScalpelError, match="pre-tokenizer"):
        bpe_pre_type({"type": "Whitespace"})
