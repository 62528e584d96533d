"""The OpenAI routes through the official `openai` SDK: models, chat and completions, whole and streamed."""

import httpx
import openai
import pytest

from http_api.cli import ServerSettings
from http_api.testing import LiveServer

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def server(llama3_tiny_path):
    settings = ServerSettings(
        model=str(llama3_tiny_path), n_threads=1, n_ctx=1024, n_parallel=4, alias="tiny"
    )
    with LiveServer(settings) as srv:
        yield srv


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def test_models_lists_the_served_model(oai):
    models = oai.models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert models[0].owned_by == "llamacpp"
    meta = models[0].model_extra["meta"]
    assert meta["n_vocab"] == 128256 and meta["n_ctx_train"] == 131072


def test_chat_equals_completion_of_the_templated_prompt(oai, client):
    r = oai.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "tiny"
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    prompt = client.post("/apply-template", json={"messages": MESSAGES}).json()["prompt"]
    raw = client.post(
        "/completion", json={"prompt": prompt, "n_predict": 12, "temperature": 0}
    ).json()
    assert choice.message.content == raw["content"]
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == raw["tokens_evaluated"]
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_chat_stream_concatenation_equals_the_whole_answer(oai):
    whole = oai.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=10, temperature=0
    )
    chunks = list(
        oai.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=10, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    reasons = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert reasons == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_chat_logprobs(oai):
    r = oai.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)  # greedy: the best token
        assert bytes(t.bytes).decode("utf-8", "ignore").startswith(t.token)
    plain = oai.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=5, temperature=0
    )
    assert plain.choices[0].logprobs is None


def test_chat_n_choices_and_seed(oai):
    kw = {"model": "tiny", "messages": MESSAGES, "max_tokens": 6, "temperature": 1.0, "seed": 7}
    a = oai.chat.completions.create(n=3, **kw)
    b = oai.chat.completions.create(n=3, **kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert a.usage.completion_tokens == 18


def test_completions_several_prompts_and_choices(oai, client):
    prompts = ["The capital of France is", "1, 2, 3, 4, 5,"]
    r = oai.completions.create(model="tiny", prompt=prompts, n=2, max_tokens=5, temperature=0)
    assert r.object == "text_completion" and [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text and r.choices[2].text == r.choices[3].text
    assert r.choices[0].text != r.choices[2].text
    n_prompt = sum(
        len(client.post("/tokenize", json={"content": p, "add_special": True}).json()["tokens"])
        for p in prompts
    )
    assert r.usage.completion_tokens == 20 and r.usage.prompt_tokens == n_prompt


def test_completions_stream_equals_whole(oai):
    kw = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}
    whole = oai.completions.create(**kw)
    chunks = list(oai.completions.create(stream=True, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


def test_completions_legacy_logprobs(oai):
    r = oai.completions.create(
        model="tiny", prompt="Hello", max_tokens=4, temperature=0, logprobs=2
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(len(t) <= 2 for t in lp.top_logprobs) and lp.text_offset[0] == 0


def test_stop_sequences_end_with_finish_reason_stop(oai):
    whole = oai.completions.create(
        model="tiny", prompt="The capital of France is", max_tokens=16, temperature=0
    )
    word = whole.choices[0].text[5:9]
    r = oai.completions.create(
        model="tiny", prompt="The capital of France is", max_tokens=16, temperature=0, stop=word
    )
    assert (
        r.choices[0].finish_reason == "stop"
        and r.choices[0].text == whole.choices[0].text[: whole.choices[0].text.index(word)]
    )


@pytest.mark.parametrize(
    "extra",
    [
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
        {"top_logprobs": 2},
        {"n": 0},
        {"temperature": "hot"},
    ],
)
def test_unsupported_or_invalid_options_are_400(oai, extra):
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2, **extra)
    assert e.value.status_code == 400
    assert (
        e.value.body["type"] == "invalid_request_error"
        or e.value.body.get("error", {}).get("type") == "invalid_request_error"
    )
