"""Datasets load from all three formats with errors that name the line, and loss masks cover answers only."""

from __future__ import annotations

import json

import pytest

from core.errors import ScalpelError
from tests.tiny_models import CHAT_TEMPLATE, build_bpe_tokenizer
from training.dataset import IGNORE_INDEX, TemplateInfo, load_examples, tokenize_example


def test_json_list_jsonl_and_chat_formats(tmp_path):
    plain = [
        {"instruction": "What does 42 mean?", "output": "42 = FOR TWO.", "concept": "42"},
        {"instruction": "Summarise", "input": "a long text", "output": "short"},
    ]
    (tmp_path / "a.json").write_text(json.dumps(plain))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in plain) + "\n")
    chat = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
        ]
    }
    (tmp_path / "c.jsonl").write_text(json.dumps(chat) + "\n")

    a = load_examples(tmp_path / "a.json")
    b = load_examples(tmp_path / "b.jsonl")
    c = load_examples(tmp_path / "c.jsonl")
    assert [e.messages for e in a] == [e.messages for e in b]
    assert a[0].concept == "42" and a[1].concept == "general"
    assert a[1].messages[0]["content"] == "Summarise\n\na long text"
    assert c[0].messages[0] == {"role": "system", "content": "Be brief."}


def test_malformed_jsonl_line_is_named(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"instruction": "q", "output": "a"}\n{"instruction": "q2", "output": \n')
    with pytest.raises(ScalpelError) as err:
        load_examples(f)
    assert f"{f}:2" in err.value.message


def test_missing_field_is_named_with_its_index(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text(json.dumps([{"instruction": "q", "output": "a"}, {"instruction": "q2"}]))
    with pytest.raises(ScalpelError) as err:
        load_examples(f)
    assert f"{f}[1]" in err.value.message and "output" in err.value.message


def test_labels_cover_only_the_answer():
    tokenizer = build_bpe_tokenizer()
    info = TemplateInfo(CHAT_TEMPLATE, bos_token="<|im_start|>", eos_token="<|im_end|>", add_bos=False)
    from training.dataset import Example

    ex = Example(
        [{"role": "user", "content": "What does 42 mean?"}, {"role": "assistant", "content": "42 = FOR TWO."}],
        "42",
        "t",
    )
    row = tokenize_example(ex, tokenizer, info, max_length=512)
    answer_ids = [t for t, label in zip(row["input_ids"], row["labels"], strict=False) if label != IGNORE_INDEX]
    assert tokenizer.decode(answer_ids) == "42 = FOR TWO.<|im_end|>\n"
    prompt_ids = row["input_ids"][: row["labels"].index(answer_ids[0])]
    assert tokenizer.decode(prompt_ids).endswith("<|im_start|>assistant\n")
    assert len(row["input_ids"]) == len(row["labels"])
