"""Sampling fields through the openai SDK: logit_bias, n > 1 (whole and streamed), and fields refused or ignored."""

from __future__ import annotations

import openai
import pytest

ASK = [{"role": "user", "content": "hi"}]


def chat(sdk, **kw):
    return sdk.chat.completions.create(**{"model": "tiny", "messages": ASK, "max_tokens": 6, **kw})


def first_token(reply) -> bytes:
    return bytes(reply.choices[0].logprobs.content[0].bytes)


def test_logit_bias_plus_100_forces_a_token_and_minus_100_bans_it(sdk, base_engine):
    [fox] = base_engine.tokenize(" fox", add_special=False, parse_special=False)[:1]
    forced = chat(sdk, logit_bias={str(fox): 100}, temperature=1.0, seed=3)
    assert forced.choices[0].message.content == base_engine.detokenize([fox]) * 6
    greedy = chat(sdk, temperature=0, logprobs=True)
    top = base_engine.tokenize(greedy.choices[0].logprobs.content[0].token, add_special=False, parse_special=False)
    banned = chat(sdk, temperature=0, logprobs=True, logit_bias={str(top[0]): -100})
    assert first_token(banned) != first_token(greedy)


@pytest.mark.parametrize("bias", [{"fox": 5}, {"1": 101}, {"-1": 1}, {"99999999": 1}])
def test_bad_logit_bias_is_a_400_naming_it(sdk, bias):
    with pytest.raises(openai.BadRequestError) as err:
        chat(sdk, logit_bias=bias)
    assert err.value.body["param"].startswith("logit_bias"), err.value.body


def test_n_choices_are_independent_reproducible_and_counted(sdk):
    pair = chat(sdk, n=2, seed=11, temperature=1.0, logprobs=True, max_tokens=8)
    assert [c.index for c in pair.choices] == [0, 1]
    texts = [c.message.content for c in pair.choices]
    assert texts[0] != texts[1]
    # choice i draws with seed + i: each is the single answer for that seed
    assert [chat(sdk, seed=s, temperature=1.0, max_tokens=8).choices[0].message.content for s in (11, 12)] == texts
    one = chat(sdk, seed=11, temperature=1.0, max_tokens=8)
    assert pair.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    assert pair.usage.completion_tokens == sum(len(c.logprobs.content) for c in pair.choices)
    assert pair.usage.total_tokens == pair.usage.prompt_tokens + pair.usage.completion_tokens


def test_n_choices_stream_interleaved_by_index(sdk):
    kw = dict(n=3, seed=4, temperature=1.0, max_tokens=8)
    whole = chat(sdk, **kw)
    chunks = list(chat(sdk, stream=True, stream_options={"include_usage": True}, **kw))
    texts, finishes = ["", "", ""], [[], [], []]
    for chunk in chunks[:-1]:
        [choice] = chunk.choices
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finishes[choice.index].append(choice.finish_reason)
    assert texts == [c.message.content for c in whole.choices]
    assert finishes == [[c.finish_reason] for c in whole.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_take_n_too(sdk):
    reply = sdk.completions.create(model="tiny", prompt="The quick", n=2, max_tokens=5, seed=1, temperature=1.0)
    assert [c.index for c in reply.choices] == [0, 1] and reply.choices[0].text != reply.choices[1].text
    streamed = ["", ""]
    for chunk in sdk.completions.create(
        model="tiny", prompt="The quick", n=2, max_tokens=5, seed=1, temperature=1.0, stream=True
    ):
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert streamed == [c.text for c in reply.choices]


@pytest.mark.parametrize(
    "kw, param",
    [
        ({"extra_body": {"top_k": 5}}, "top_k"),
        ({"extra_body": {"repeat_penalty": 1.1}}, "repeat_penalty"),
        ({"reasoning_effort": "high"}, "reasoning_effort"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"verbosity": "low"}, "verbosity"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"n": 17}, "n"),
    ],
)
def test_fields_that_would_change_the_answer_are_refused_by_name(sdk, kw, param):
    with pytest.raises(openai.BadRequestError) as err:
        chat(sdk, **kw)
    assert err.value.body["param"] == param, err.value.body


def test_fields_that_do_not_change_the_answer_are_accepted(sdk):
    plain = chat(sdk, temperature=0).choices[0].message.content
    tagged = chat(
        sdk,
        temperature=0,
        user="someone",
        metadata={"team": "a"},
        store=True,
        service_tier="auto",
        prompt_cache_key="k",
        safety_identifier="s",
        modalities=["text"],
        prediction={"type": "content", "content": "hello"},
        extra_body={"some_unknown_field": 1},
    )
    assert tagged.choices[0].message.content == plain


def test_best_of_other_than_n_is_refused(sdk):
    with pytest.raises(openai.BadRequestError) as err:
        sdk.completions.create(model="tiny", prompt="x", best_of=3, max_tokens=2)
    assert err.value.body["param"] == "best_of"
    assert sdk.completions.create(model="tiny", prompt="x", best_of=2, n=2, max_tokens=2).choices[1].index == 1
