"""The official `openai` client against the server (starlette's TestClient as its HTTP client): chat and
completions, streamed and not, usage with cached tokens, and its error classes for refused requests."""
import time

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

import engine  # noqa: E402
from engine.server.app import create_app  # noqa: E402

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(lambda: engine.load(device="cpu", context=1024), "smol")) as http:
        deadline = time.monotonic() + 60
        while http.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http)


def test_chat_streamed_and_not(client):
    whole = client.chat.completions.create(model="smol", messages=QUESTION, max_tokens=8, temperature=0)
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content
    assert whole.usage.prompt_tokens > 0 and whole.usage.completion_tokens <= 8
    chunks = list(client.chat.completions.create(model="smol", messages=QUESTION, max_tokens=8, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == whole.usage.prompt_tokens - 1


def test_completion_with_stop_and_models(client):
    full = client.completions.create(model="smol", prompt="One, two, three, four,", max_tokens=6, temperature=0)
    stop = full.choices[0].text[2:4]
    cut = client.completions.create(model="smol", prompt="One, two, three, four,", max_tokens=6, temperature=0,
                                    stop=[stop])
    assert cut.choices[0].text == full.choices[0].text[:full.choices[0].text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert [m.id for m in client.models.list()] == ["smol"]


def test_refusals_raise_the_clients_errors(client):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4", messages=QUESTION)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="smol", prompt="x", max_tokens=-3)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="smol", prompt="word " * 1100)
