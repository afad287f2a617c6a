"""/v1/responses with the real openai client: whole and streamed, chained by previous_response_id, stored in SQLite."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from scalpel.demo import BackgroundServer
from serving.app import create_app
from serving.response_store import ResponseStore
from tests.serving.test_app import engine, tiny_home  # noqa: F401  (module-scoped fixtures, one instance here)

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(engine):  # noqa: F811
    with BackgroundServer(create_app(engine)) as server:
        yield server


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def chat(client, messages, model="tiny", max_tokens=8) -> str:
    reply = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
    return reply.choices[0].message.content


def test_a_whole_response_is_the_chat_answer(client, engine):  # noqa: F811
    r = client.responses.create(model="tiny", input="hi", max_output_tokens=8, temperature=0)
    assert r.object == "response" and r.id.startswith("resp_") and r.model == "tiny"
    assert r.status in ("completed", "incomplete") and len(r.output) == 1
    message = r.output[0]
    assert message.type == "message" and message.role == "assistant" and message.content[0].type == "output_text"
    assert r.output_text == message.content[0].text == chat(client, HI)
    assert r.usage.input_tokens == len(engine.chat_tokens(HI))
    assert 0 < r.usage.output_tokens <= 8 and r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    if r.status == "incomplete":
        assert r.usage.output_tokens == 8 and r.incomplete_details.reason == "max_output_tokens"


def test_messages_parts_and_instructions_render_like_chat(client):
    messages = [
        {"role": "user", "content": [{"type": "input_text", "text": "What is "}, {"type": "input_text", "text": "42?"}]}
    ]
    r = client.responses.create(
        model="tiny", input=messages, instructions="Answer briefly.", max_output_tokens=8, temperature=0
    )
    expected = chat(
        client, [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 42?"}]
    )
    assert r.output_text == expected and r.instructions == "Answer briefly."
    developer = client.responses.create(
        model="tiny",
        input=[{"role": "developer", "content": "Answer briefly."}, {"role": "user", "content": "What is 42?"}],
        max_output_tokens=8,
        temperature=0,
    )
    assert developer.output_text == expected


def test_an_adapter_answers_by_its_name(client):
    adapted = client.responses.create(model="tiny_a", input="hi", max_output_tokens=6, temperature=0)
    assert adapted.output_text == chat(client, HI, "tiny_a", 6) != chat(client, HI, "tiny", 6)


def test_the_stream_sends_the_events_the_sdk_parses(client):
    whole = client.responses.create(model="tiny", input="hi", max_output_tokens=8, temperature=0)
    events = list(client.responses.create(model="tiny", input="hi", max_output_tokens=8, temperature=0, stream=True))
    kinds = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[4 : 4 + len(deltas)] == ["response.output_text.delta"] * len(deltas) and deltas
    final = "response.completed" if whole.status == "completed" else "response.incomplete"
    assert kinds[4 + len(deltas) :] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        final,
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert "".join(d.delta for d in deltas) == whole.output_text == events[-1].response.output_text
    item_ids = {e.item_id for e in events if hasattr(e, "item_id")} | {events[2].item.id, events[-2].item.id}
    assert item_ids == {events[-1].response.output[0].id}
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens


def test_the_stream_helper_accumulates_the_text(client):
    whole = client.responses.create(model="tiny", input="hi", max_output_tokens=8, temperature=0)
    with client.responses.stream(model="tiny", input="hi", max_output_tokens=8, temperature=0) as stream:
        texts = [e.snapshot for e in stream if e.type == "response.output_text.delta"]
    assert texts[-1] == whole.output_text


def test_previous_response_id_continues_the_conversation(client, engine):  # noqa: F811
    first = client.responses.create(model="tiny", input="hi", max_output_tokens=6, temperature=0)
    second = client.responses.create(
        model="tiny", input="and again?", previous_response_id=first.id, max_output_tokens=6, temperature=0
    )
    conversation = [*HI, {"role": "assistant", "content": first.output_text}, {"role": "user", "content": "and again?"}]
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens == len(engine.chat_tokens(conversation))
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    assert second.output_text == chat(client, conversation, max_tokens=6)
    third = client.responses.create(
        model="tiny", input="once more", previous_response_id=second.id, max_output_tokens=4, temperature=0
    )
    longer = [
        *conversation,
        {"role": "assistant", "content": second.output_text},
        {"role": "user", "content": "once more"},
    ]
    assert third.usage.input_tokens == len(engine.chat_tokens(longer))


def test_stored_responses_are_retrieved_deleted_and_survive_a_restart(client, engine):  # noqa: F811
    r = client.responses.create(model="tiny", input="hi", max_output_tokens=4, temperature=0)
    assert client.responses.retrieve(r.id).output_text == r.output_text
    with BackgroundServer(create_app(engine)) as restarted:  # a new app: a new store object on the same file
        again = openai.OpenAI(base_url=restarted.base_url, api_key="unused", max_retries=0)
        assert again.responses.retrieve(r.id).output_text == r.output_text
        follow = again.responses.create(model="tiny", input="more", previous_response_id=r.id, max_output_tokens=2)
        assert follow.usage.input_tokens > r.usage.input_tokens
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError) as unknown:
        client.responses.create(model="tiny", input="hi", previous_response_id=r.id, max_output_tokens=2)
    assert unknown.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(r.id)


def test_store_false_keeps_nothing(client):
    r = client.responses.create(model="tiny", input="hi", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


def test_an_unknown_previous_response_id_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.create(model="tiny", input="hi", previous_response_id="resp_nothing", max_output_tokens=2)
    assert missing.value.body["param"] == "previous_response_id"
    assert missing.value.body["code"] == "response_not_found"


def test_a_stored_response_is_seen_only_by_its_key(engine):  # noqa: F811
    with BackgroundServer(create_app(engine, api_keys={"alice", "bob"})) as server:
        alice = openai.OpenAI(base_url=server.base_url, api_key="alice", max_retries=0)
        bob = openai.OpenAI(base_url=server.base_url, api_key="bob", max_retries=0)
        r = alice.responses.create(model="tiny", input="hi", max_output_tokens=2)
        assert alice.responses.retrieve(r.id).id == r.id
        with pytest.raises(openai.NotFoundError):
            bob.responses.retrieve(r.id)
        with pytest.raises(openai.NotFoundError):
            bob.responses.create(model="tiny", input="hi", previous_response_id=r.id, max_output_tokens=2)


def test_the_store_keeps_only_the_newest(tmp_path):
    store = ResponseStore(tmp_path / "responses.db", keep=3)
    for i in range(5):
        store.save({"id": f"resp_{i}"}, [{"role": "user", "content": str(i)}], None)
    with pytest.raises(Exception, match="no stored response"):
        store.get("resp_1", None)
    assert store.get("resp_4", None).messages == [{"role": "user", "content": "4"}]
    assert [ResponseStore(tmp_path / "responses.db", keep=3).get(f"resp_{i}", None).response for i in (2, 3, 4)]


def test_logprobs_when_included(client):
    r = client.responses.create(
        model="tiny",
        input="hi",
        max_output_tokens=5,
        temperature=0,
        include=["message.output_text.logprobs"],
        top_logprobs=2,
    )
    entries = r.output[0].content[0].logprobs
    assert len(entries) == r.usage.output_tokens and all(len(e.top_logprobs) == 2 for e in entries)
    assert "".join(e.token for e in entries) == r.output_text


def test_json_object_format_is_json(client):
    r = client.responses.create(
        model="tiny", input="json please", max_output_tokens=20, text={"format": {"type": "json_object"}}
    )
    assert r.output_text.lstrip().startswith(("{", "["))  # the JSON grammar constrains even a random model
    if r.status == "completed":
        json.loads(r.output_text)


OK = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "mood": {"enum": ["calm", "busy"]}},
    "required": ["ok", "mood"],
    "additionalProperties": False,
}


def test_a_json_schema_format_fits_the_schema(client):
    import jsonschema_rs

    r = client.responses.create(
        model="tiny",
        input="how are you?",
        max_output_tokens=40,
        text={"format": {"type": "json_schema", "name": "status", "schema": OK, "strict": True}},
    )
    assert r.status == "completed" and r.text.format.type == "json_schema" and r.text.format.name == "status"
    jsonschema_rs.validate(OK, json.loads(r.output_text))


def test_a_strict_schema_the_grammar_cannot_enforce_is_refused(server):
    strict = {"type": "json_schema", "name": "n", "strict": True, "schema": {"type": "integer", "minimum": 3}}
    reply = httpx.post(
        f"{server.base_url}/responses", json={"model": "tiny", "input": "hi", "text": {"format": strict}}
    )
    assert reply.status_code == 400 and reply.json()["error"]["param"].startswith("text.format.schema")


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"reasoning": {"effort": "low"}}, "reasoning"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
        ({"include": ["file_search_call.results"]}, "include"),
        ({"truncation": "auto"}, "truncation"),
        ({"background": True}, "background"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]}, "input"),
        ({"input": ""}, "input"),
        ({"input": "FOR TWO " * 3000}, "input"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"temperature": 3}, "temperature"),
    ],
)
def test_what_would_change_the_answer_is_refused_by_name(server, extra, param):
    reply = httpx.post(f"{server.base_url}/responses", json={"model": "tiny", "input": "hi", **extra}, timeout=60)
    assert reply.status_code == 400, reply.text
    assert reply.json()["error"]["param"] == param


def test_harmless_fields_are_accepted(client):
    r = client.responses.create(
        model="tiny",
        input="hi",
        max_output_tokens=2,
        user="someone",
        metadata={"k": "v"},
        parallel_tool_calls=False,
        tool_choice="auto",
        truncation="disabled",
        service_tier="auto",
        safety_identifier="x",
        prompt_cache_key="k",
    )
    assert r.metadata == {"k": "v"}


def test_an_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input="hi")
