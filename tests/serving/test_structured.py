"""Structured output: response_format json_schema and json_object through grammars, with the openai SDK."""

from __future__ import annotations

import json

import jsonschema_rs
import openai
import pytest

from serving import structured
from serving.engine import GenerationParams

# Bounded on purpose: a random tiny model closes a free string only by chance, so strings are patterns or enums.
ORDER = {
    "type": "object",
    "properties": {
        "sku": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{1,3}$"},
        "size": {"enum": ["S", "M", "L"]},
        "count": {"type": "integer"},
        "gift": {"type": ["boolean", "null"]},
        "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}, "minItems": 1, "maxItems": 3},
        "ship": {
            "type": "object",
            "properties": {"express": {"type": "boolean"}, "day": {"type": "string", "format": "date"}},
            "required": ["express"],
        },
    },
    "required": ["sku", "size", "count", "tags", "ship"],
    "additionalProperties": False,
    "$defs": {"tag": {"enum": ["red", "blue"]}},
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "order", "schema": ORDER, "strict": True}}
ASK = [{"role": "user", "content": "An order, please."}]


def check(text: str) -> dict:
    value = json.loads(text)
    errors = [e.message for e in jsonschema_rs.Draft202012Validator(ORDER).iter_errors(value)]
    assert not errors, (text, errors)
    return value


def test_json_schema_answers_parse_and_fit_the_schema(sdk):
    reply = sdk.chat.completions.create(
        model="tiny", messages=ASK, response_format=FORMAT, max_tokens=400, temperature=1.0, seed=5, n=3
    )
    for choice in reply.choices:
        assert choice.finish_reason == "stop", choice
        check(choice.message.content)
    assert len({c.message.content for c in reply.choices}) > 1  # three samples, not one answer three times


def test_streamed_json_schema_answer_is_the_whole_one(sdk):
    kw = dict(model="tiny", messages=ASK, response_format=FORMAT, max_tokens=400, seed=2)
    whole = sdk.chat.completions.create(**kw).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in sdk.chat.completions.create(stream=True, **kw))
    assert streamed == whole
    check(streamed)


def test_the_sdk_parse_helper_reads_the_answer(sdk):
    from pydantic import BaseModel

    class Verdict(BaseModel):
        ok: bool
        score: int

    parsed = sdk.chat.completions.parse(model="tiny", messages=ASK, response_format=Verdict, max_tokens=100, seed=1)
    assert isinstance(parsed.choices[0].message.parsed, Verdict)


def test_json_object_ends_in_json_or_says_it_was_cut(sdk):
    """finish_reason "stop" means the content parses; an answer cut by max_tokens says "length"."""
    seen = set()
    for seed in range(6):
        for max_tokens in (3, 40):
            reply = sdk.chat.completions.create(
                model="tiny", messages=ASK, response_format={"type": "json_object"}, max_tokens=max_tokens, seed=seed
            )
            choice = reply.choices[0]
            seen.add(choice.finish_reason)
            if choice.finish_reason == "stop":
                assert isinstance(json.loads(choice.message.content), dict)
            else:
                assert choice.finish_reason == "length" and reply.usage.completion_tokens == max_tokens
                assert choice.message.content.lstrip().startswith("{")
    assert "length" in seen


@pytest.mark.parametrize(
    "response_format, param",
    [
        ({"type": "json_schema"}, "response_format"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}, "response_format.json_schema.schema"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wizard"}}}, "response_format"),
        (
            {"type": "json_schema", "json_schema": {"name": "bad name", "schema": {}}},
            "response_format.json_schema.name",
        ),
        (
            {
                "type": "json_schema",
                "json_schema": {"name": "x", "strict": True, "schema": {"type": "number", "maximum": 3}},
            },
            "response_format.json_schema.schema",
        ),
        ({"type": "yaml"}, "response_format.type"),
    ],
)
def test_bad_response_formats_are_400s_naming_the_field(sdk, response_format, param):
    with pytest.raises(openai.BadRequestError) as err:
        sdk.chat.completions.create(model="tiny", messages=ASK, response_format=response_format, max_tokens=2)
    assert err.value.body["param"].startswith(param), err.value.body


def test_not_strict_ignores_what_a_grammar_cannot_enforce(sdk):
    loose = {"name": "x", "strict": False, "schema": {"type": "integer", "maximum": 3}}
    reply = sdk.chat.completions.create(
        model="tiny", messages=ASK, response_format={"type": "json_schema", "json_schema": loose}, max_tokens=30
    )
    assert isinstance(json.loads(reply.choices[0].message.content), int)


@pytest.mark.parametrize("pattern", ["^.*$", '^[^"]+$', "^\\d+$", "^[ -~]+$", "[a-z]+"])
def test_patterns_that_could_break_the_json_are_refused_or_dropped(sdk, pattern):
    schema = {"type": "string", "pattern": pattern}
    strict = {"type": "json_schema", "json_schema": {"name": "x", "strict": True, "schema": schema}}
    with pytest.raises(openai.BadRequestError) as err:
        sdk.chat.completions.create(model="tiny", messages=ASK, response_format=strict, max_tokens=2)
    assert err.value.body["param"] == "response_format.json_schema.schema" and "'pattern'" in err.value.body["message"]
    loose = {"type": "json_schema", "json_schema": {"name": "x", "schema": {**schema, "maxLength": 4}}}
    for seed in range(3):
        reply = sdk.chat.completions.create(model="tiny", messages=ASK, response_format=loose, max_tokens=40, seed=seed)
        if reply.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(reply.choices[0].message.content), str)


def test_stop_and_a_grammar_do_not_mix(sdk):
    with pytest.raises(openai.BadRequestError) as err:
        sdk.chat.completions.create(model="tiny", messages=ASK, response_format=FORMAT, stop=["}"], max_tokens=5)
    assert err.value.body["param"] == "stop"


def test_definitions_of_one_name_in_two_schemas_stay_apart(base_engine):
    """Each schema's $defs get rules of their own: `Item` is an integer in one and a boolean in the other."""
    grammar = structured.Grammar()
    first = grammar.schema(
        {
            "type": "object",
            "properties": {"a": {"$ref": "#/$defs/Item"}},
            "required": ["a"],
            "$defs": {"Item": {"type": "integer"}},
        },
        name="one",
        param="p",
    )
    second = grammar.schema(
        {
            "type": "object",
            "properties": {"a": {"$ref": "#/$defs/Item"}},
            "required": ["a"],
            "$defs": {"Item": {"type": "boolean"}},
        },
        name="two",
        param="p",
    )
    text = grammar.rule("root", f'{first} "|" {second}') and grammar.text()
    tokens = base_engine.tokenize("x")
    for seed in range(3):
        out = "".join(
            p.text for p in base_engine.generate(tokens, (), GenerationParams(max_tokens=80, seed=seed, grammar=text))
        )
        left, right = out.split("|")
        assert isinstance(json.loads(left)["a"], int) and isinstance(json.loads(right)["a"], bool), out


def test_strings_never_hold_raw_control_characters():
    """JSON forbids a raw newline inside a string; llama-cpp-python's converter alone would allow it."""
    text = structured.schema_grammar({"type": "string"}, param="p")
    assert "\\x00-\\x1F" in text


def test_a_list_of_types_keeps_the_other_keywords(base_engine):
    schema = {"type": ["object", "null"], "properties": {"n": {"enum": [1, 2]}}, "required": ["n"]}
    text = structured.schema_grammar(schema, param="p")
    tokens = base_engine.tokenize("x")
    for seed in range(3):
        out = "".join(
            p.text for p in base_engine.generate(tokens, (), GenerationParams(max_tokens=40, seed=seed, grammar=text))
        )
        assert jsonschema_rs.is_valid(schema, json.loads(out)), out
