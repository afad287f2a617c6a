"""Tool calling through the openai SDK: tools, tool_choice, parallel_tool_calls, tool messages, whole and streamed."""

from __future__ import annotations

import json

import jsonschema_rs
import openai
import pytest

from core import chat, model_store
from serving import tools
from serving.engine import GenerationParams
from tests.tiny_models import CHAT_TEMPLATE

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Rome", "Oslo"]},
        "days": {"type": "integer"},
        "metric": {"type": "boolean"},
    },
    "required": ["city", "days"],
}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The forecast", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
HERMES = (  # the shape of Qwen 2.5's and Hermes' templates: tools in the system turn, calls in <tool_call> tags
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}</tools>\n"
    'For each call write <tool_call>\n{"name": ..., "arguments": ...}\n</tool_call><|im_end|>\n{% endif %}'
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m.tool_calls %}{% for c in m.tool_calls %}"
    "<tool_call>\n{{ c.function | tojson }}\n</tool_call>{% endfor %}{% else %}{{ m['content'] }}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def valid(call) -> dict:
    """The call's arguments, parsed and checked against its function's schema."""
    arguments = json.loads(call.function.arguments)
    errors = [e.message for e in jsonschema_rs.Draft202012Validator(SCHEMAS[call.function.name]).iter_errors(arguments)]
    assert not errors, (call.function.arguments, errors)
    return arguments


def ask(sdk, **kw):
    return sdk.chat.completions.create(**{"model": "tiny", "messages": ASK, "max_tokens": 300, "seed": 1, **kw})


def test_required_call_is_valid_json_for_the_schema(sdk):
    for seed in range(3):
        reply = ask(sdk, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, seed=seed)
        choice = reply.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        [call] = choice.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in SCHEMAS
        valid(call)


def test_a_named_function_is_the_one_called(sdk):
    for name in SCHEMAS:
        reply = ask(sdk, tools=TOOLS, tool_choice={"type": "function", "function": {"name": name}})
        [call] = reply.choices[0].message.tool_calls
        assert call.function.name == name and reply.choices[0].finish_reason == "tool_calls"
        valid(call)


def test_allowed_tools_limit_the_calls_to_their_list(sdk):
    only_time = {"type": "function", "function": {"name": "get_time"}}
    choice = {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [only_time]}}
    reply = ask(sdk, tools=TOOLS, tool_choice=choice, n=3, temperature=1.0)
    for c in reply.choices:
        assert c.finish_reason == "tool_calls" and {t.function.name for t in c.message.tool_calls} == {"get_time"}


def test_auto_with_a_response_format_answers_in_it_or_calls(sdk):
    """The grammar is the schema's or a call's: either way the answer is valid."""
    answer = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": answer}}
    reply = ask(sdk, tools=TOOLS, response_format=fmt, n=4, temperature=1.0, seed=3)
    for c in reply.choices:
        if c.message.tool_calls:
            assert c.finish_reason == "tool_calls" and c.message.content is None
            for call in c.message.tool_calls:
                valid(call)
        else:
            assert c.finish_reason == "stop" and jsonschema_rs.is_valid(answer, json.loads(c.message.content))


def test_parallel_calls_are_each_valid(sdk):
    reply = ask(sdk, tools=TOOLS, tool_choice="required", temperature=1.0, seed=7)
    calls = reply.choices[0].message.tool_calls
    assert 1 <= len(calls) <= tools.MAX_PARALLEL_CALLS and len({c.id for c in calls}) == len(calls)
    for call in calls:
        valid(call)


def test_streamed_call_matches_the_whole_one(sdk):
    kw = dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0)
    whole = ask(sdk, **kw).choices[0].message.tool_calls[0]
    chunks = list(ask(sdk, stream=True, **kw))
    deltas = [c.choices[0].delta for c in chunks]
    assert deltas[0].role == "assistant"
    entries = [t for d in deltas for t in d.tool_calls or []]
    head, rest = entries[0], entries[1:]
    assert head.index == 0 and head.id.startswith("call_") and head.type == "function"
    assert head.function.name == "get_weather"  # with the arguments' first text, once their "{" is there
    assert rest and all(t.index == 0 and t.id is None and t.function.name is None for t in rest)
    assert "".join(t.function.arguments for t in entries) == whole.function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]
    # the SDK's own stream helper puts the same call together
    with sdk.chat.completions.stream(model="tiny", messages=ASK, max_tokens=300, seed=1, **kw) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.tool_calls[0].function.arguments == whole.function.arguments
    valid(final.choices[0].message.tool_calls[0])


def test_none_offers_no_tools_and_auto_lists_them(sdk):
    bare = ask(sdk, max_tokens=4)
    none = ask(sdk, max_tokens=4, tools=TOOLS, tool_choice="none")
    auto = ask(sdk, max_tokens=4, tools=TOOLS)
    assert none.usage.prompt_tokens == bare.usage.prompt_tokens  # not offered: the prompt is the same
    assert auto.usage.prompt_tokens > bare.usage.prompt_tokens  # offered: the fallback prompt lists them
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason in ("stop", "length")


def test_tool_results_and_earlier_calls_are_accepted(sdk):
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"},
    ]
    reply = sdk.chat.completions.create(model="tiny", messages=history, tools=TOOLS, max_tokens=4, seed=1)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert reply.usage.prompt_tokens > ask(sdk, tools=TOOLS, max_tokens=4).usage.prompt_tokens
    with pytest.raises(openai.BadRequestError) as err:  # a result must say which call it answers
        sdk.chat.completions.create(model="tiny", messages=[*ASK, {"role": "tool", "content": "18"}], max_tokens=2)
    assert err.value.body["param"] == "messages.1"


@pytest.mark.parametrize(
    "kw, param",
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}, "tools": TOOLS}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools.0"),
        ({"tools": TOOLS, "tool_choice": "required", "stop": ["}"]}, "stop"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
        ({"tools": [TOOLS[0], TOOLS[0]]}, "tools"),
        (
            {
                "tool_choice": "required",
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "strict": True,
                            "parameters": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 1}}},
                        },
                    }
                ],
            },
            "tools.0.function.parameters.properties.x",
        ),
    ],
)
def test_bad_tool_requests_are_400s_naming_the_field(sdk, kw, param):
    with pytest.raises(openai.BadRequestError) as err:
        ask(sdk, max_tokens=2, **kw)
    assert err.value.body["param"].startswith(param), err.value.body


def test_a_template_with_tools_renders_them_and_calls_are_tagged(base_engine):
    """The template's own tool prompt, and the grammar forces its <tool_call> format, which is read back."""
    text = chat.render(HERMES, ASK, add_generation_prompt=True, tools=TOOLS)
    assert '"name": "get_weather"' in text and "You can call these functions" not in text
    plan = tools.plan(TOOLS, "required", False, HERMES)
    assert plan.tagged and plan.template_tools == TOOLS
    tokens = base_engine.tokenize(text)
    params = GenerationParams(max_tokens=300, seed=3, grammar=tools.grammar(plan))
    pieces = list(base_engine.generate(tokens, (), params))
    raw = "".join(p.text for p in pieces)
    assert raw.startswith('<tool_call>\n{"name": "') and raw.rstrip().endswith("</tool_call>")
    answer, message = tools.ChatAnswer(plan), tools.Message()
    for piece in pieces:
        message.add(answer.feed(piece.text))
    last, finish = answer.finish(pieces[-1].finish_reason)
    message.add(last)
    [call] = message.message()["tool_calls"]
    assert finish == "tool_calls"
    json.loads(call["function"]["arguments"])


TIME_CALL = '{"name": "get_time", "arguments": {"zone": "UTC"}}'
AUTO_CASES = [
    (TIME_CALL, None, ["get_time"]),
    (
        'Let me check.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>',
        "Let me check.",
        ["get_time"],
    ),
    ('{"name": "get_weather", "parameters": {"city": "Rome", "days": 2}}', None, ["get_weather"]),  # Llama 3.1
    ('[TOOL_CALLS] [{"name": "get_time", "arguments": {"zone": "UTC"}}]', None, ["get_time"]),  # Mistral
    (
        TIME_CALL + '\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 1}}',
        None,
        ["get_time", "get_weather"],
    ),
    ('{"name": "launch", "arguments": {}}', '{"name": "launch", "arguments": {}}', []),  # not an offered function
    ("The weather is fine. <tool_call> is a tag.", "The weather is fine. <tool_call> is a tag.", []),
    ('{"city": "Paris"}', '{"city": "Paris"}', []),
    ("Plain words, and a brace { later.", "Plain words, and a brace { later.", []),
]


@pytest.mark.parametrize("text, content, names", AUTO_CASES)
def test_auto_reads_calls_out_of_the_answer_streamed_as_whole(text, content, names):
    plan = tools.plan(TOOLS, "auto", True, "a template without tool support")
    for cut in (1, 3, len(text)):  # the same answer in pieces of every size
        answer, message, deltas = tools.ChatAnswer(plan), tools.Message(), []
        for i in range(0, len(text), cut):
            deltas.append(answer.feed(text[i : i + cut]))
        last, finish = answer.finish("stop")
        for delta in [*deltas, last]:
            message.add(delta)
        whole = message.message()
        assert whole["content"] == content, cut
        assert [c["function"]["name"] for c in whole.get("tool_calls", [])] == names
        assert finish == ("tool_calls" if names else "stop")
        if names and content is None:
            assert not any("content" in d for d in deltas)  # a call is never streamed as content first


def test_auto_with_parallel_off_keeps_the_first_call():
    plan = tools.plan(TOOLS, "auto", False, "")
    answer = tools.ChatAnswer(plan)
    answer.feed(AUTO_CASES[4][0])
    delta, finish = answer.finish("stop")
    assert [c["function"]["name"] for c in delta["tool_calls"]] == ["get_time"] and finish == "tool_calls"


def test_what_the_fallback_prompt_asks_for_is_read_back():
    text = chat.render(CHAT_TEMPLATE, ASK, add_generation_prompt=True, tools=TOOLS)
    assert "You can call these functions" in text and json.dumps(TOOLS[0]["function"]) in text
    call = chat.tool_call_text({"name": "get_time", "arguments": {"zone": "UTC"}})
    assert tools.parse_calls(call, SCHEMAS) == ("", [{"name": "get_time", "arguments": '{"zone": "UTC"}'}])


def test_tool_call_answers_match_the_documented_model(base_server):
    """The OpenAPI schema's ChatCompletion describes tool-call answers and n choices too."""
    import httpx

    from serving.responses import ChatCompletion

    body = {"model": "tiny", "messages": ASK, "tools": TOOLS, "tool_choice": "required", "n": 2, "max_tokens": 300}
    reply = httpx.post(f"{base_server.base_url}/chat/completions", json=body, timeout=120)
    assert reply.status_code == 200, reply.text
    parsed = ChatCompletion.model_validate(reply.json())
    assert [c.index for c in parsed.choices] == [0, 1] and all(c.message.tool_calls for c in parsed.choices)


# ----- the default model -----


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    from scalpel.demo import BackgroundServer
    from serving.app import create_app
    from serving.engine import Engine

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SCALPEL_HOME", str(tmp_path_factory.mktemp("smol-home")))
        engine = Engine(model_store.get(model_store.DEFAULT_MODEL))
        with BackgroundServer(create_app(engine)) as server:
            yield openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        engine.close()


@pytest.mark.e2e
def test_default_model_calls_the_named_function_with_valid_arguments(smol):
    strict = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    }
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": strict, "strict": True}}
    reply = smol.chat.completions.create(
        model=model_store.DEFAULT_MODEL,
        messages=[{"role": "user", "content": "What is the weather in Paris, in celsius?"}],
        tools=[weather, TOOLS[1]],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
        max_tokens=60,
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    [call] = choice.message.tool_calls
    arguments = json.loads(call.function.arguments)
    assert call.function.name == "get_weather" and jsonschema_rs.is_valid(strict, arguments), arguments
    assert arguments["city"].strip()
