"""Training and serving render and tokenize a conversation identically, and as transformers would."""

from __future__ import annotations

import pytest

from core import chat, model_store
from serving.engine import Engine
from training.base_model import load_tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "What does 42 mean?"}],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "def f(x):\n    return x  # ünïcödé ‚Äî"},
    ],
    [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "1 + 1 = ?"},
    ],
]


@pytest.mark.e2e
def test_default_model_renders_and_tokenizes_the_same_everywhere(home):
    entry = model_store.ensure_default()
    tokenizer = load_tokenizer(entry)
    engine = Engine(entry)
    try:
        for messages in CONVERSATIONS:
            ours = chat.render(
                entry.chat_template,
                messages,
                add_generation_prompt=True,
                bos_token=entry.bos_token,
                eos_token=entry.eos_token,
            )
            theirs = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            assert ours == theirs
            assert engine.chat_tokens(messages) == tokenizer(ours, add_special_tokens=False)["input_ids"]
    finally:
        engine.close()


def test_segments_split_prompt_from_answers():
    template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d"},
    ]
    pieces = chat.segments(template, messages)
    assert pieces == [
        ("<s>user: a</s><s>assistant: ", False),
        ("b</s>", True),
        ("<s>user: c</s><s>assistant: ", False),
        ("d</s>", True),
    ]
    assert "".join(text for text, _ in pieces) == chat.render(template, messages, add_generation_prompt=False)


def test_bos_is_added_once():
    assert chat.needs_bos("hello", add_bos=True, bos_token="<s>")
    assert not chat.needs_bos("<s>hello", add_bos=True, bos_token="<s>")
    assert not chat.needs_bos("hello", add_bos=False, bos_token="<s>")
