"""Training and serving render and tokenize a conversation identically, and as transformers would."""

from __future__ import annotations

import json

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


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
CHATML = (  # no tools: the fallback prompt
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WITH_TOOLS = (
    "{% if tools %}[TOOLS]{{ tools | map(attribute='function.name') | join(',') }}[/TOOLS]{% endif %}"
    "{% for m in messages %}[{{ m.role }}]{% if m.tool_calls %}{{ m.tool_calls[0].function.arguments.city }}"
    "{% else %}{{ m.content }}{% endif %}{% endfor %}"
)
HISTORY = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
            {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}},
        ],
    },
    {"role": "tool", "tool_call_id": "a", "name": "get_weather", "content": "18"},
    {"role": "tool", "tool_call_id": "b", "name": "get_weather", "content": "25"},
    {"role": "assistant", "content": "18 in Paris, 25 in Rome."},
]


def test_a_template_that_renders_tools_gets_them_and_the_calls_as_they_are():
    assert chat.supports_tools(WITH_TOOLS) and not chat.supports_tools(CHATML)
    text = chat.render(WITH_TOOLS, HISTORY, add_generation_prompt=False, tools=TOOLS)
    assert text.startswith("[TOOLS]get_weather[/TOOLS]") and "[assistant]Paris[tool]18[tool]25" in text


def test_without_template_support_tools_calls_and_results_become_text():
    text = chat.render(CHATML, HISTORY, add_generation_prompt=True, tools=TOOLS)
    assert text.startswith("<|im_start|>system\nYou can call these functions")
    assert json.dumps(TOOLS[0]["function"]) in text
    assert (
        '<|im_start|>assistant\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n{"name": "get_weather"' in text
    )
    assert "<|im_start|>user\nResult of get_weather (a):\n18\n\nResult of get_weather (b):\n25<|im_end|>" in text
    assert text.count("<|im_start|>user") == 2  # the two results are one user turn
    with_system = chat.render(
        CHATML, [{"role": "system", "content": "Be brief."}, *HISTORY], add_generation_prompt=True, tools=TOOLS
    )
    assert with_system.count("<|im_start|>system") == 1 and "Be brief.\n\nYou can call these functions" in with_system


def test_training_splits_a_conversation_with_tool_turns():
    pieces = chat.segments(CHATML, HISTORY)
    answers = [text for text, is_answer in pieces if is_answer]
    assert answers[0].startswith('{"name": "get_weather"') and answers[1].startswith("18 in Paris")
    assert "".join(text for text, _ in pieces) == chat.render(CHATML, HISTORY, add_generation_prompt=False)
