"""`engine serve` (engine/server): the OpenAI-compatible endpoints through starlette's TestClient, on the default
model (CPU, greedy, a few tokens): answers equal the API's, streaming equals non-streaming, stop strings cut,
a follow-up turn reuses the cached prefix, every bad request is a 4xx with an OpenAI-style error body."""
import json
import threading
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("httpx")
from starlette.testclient import TestClient  # noqa: E402

import engine  # noqa: E402
from engine.server.app import create_app  # noqa: E402
from engine.server.stops import StopMatcher  # noqa: E402

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def wait_loaded(client, timeout=60.0):
    deadline = time.monotonic() + timeout
    while client.get("/health").status_code != 200:
        assert time.monotonic() < deadline, "the model did not load"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def client():
    app = create_app(lambda: engine.load(device="cpu", context=2048), "smol")
    with TestClient(app) as client:
        wait_loaded(client)
        yield client


@pytest.fixture
def llm(client):
    return client.app.state.engine.llm


def events(response):
    """The JSON payloads of a server-sent event stream, and whether it ended with [DONE]."""
    assert response.headers["content-type"].startswith("text/event-stream")
    data = [line[len("data: "):] for line in response.text.split("\n\n") if line.startswith("data: ")]
    return [json.loads(d) for d in data if d != "[DONE]"], data[-1] == "[DONE]"


def chat(client, messages, **fields):
    return client.post("/v1/chat/completions", json={"model": "smol", "messages": messages, "max_tokens": 8,
                                                     "temperature": 0, **fields})


def test_chat_answers_like_the_api_and_the_next_turn_reuses_the_cache(client, llm):
    expected = "".join(llm.generate(QUESTION[0]["content"], max_tokens=8, temperature=0, chat=True))
    response = chat(client, QUESTION)
    assert response.status_code == 200
    body = response.json()
    answer = body["choices"][0]["message"]
    assert body["object"] == "chat.completion" and answer == {"role": "assistant", "content": expected}
    n_prompt = len(llm.chat_ids(QUESTION))
    assert body["usage"]["prompt_tokens"] == n_prompt and 0 < body["usage"]["completion_tokens"] <= 8
    assert body["usage"]["total_tokens"] == n_prompt + body["usage"]["completion_tokens"]

    follow_up = QUESTION + [answer, {"role": "user", "content": "And of Germany?"}]
    body = chat(client, follow_up).json()
    assert body["usage"]["prompt_tokens"] == len(llm.chat_ids(follow_up))
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] >= n_prompt
    assert body["choices"][0]["message"]["content"] == "".join(
        llm.generate(llm.chat_ids(follow_up), max_tokens=8, temperature=0))


def test_ignore_eos_generates_max_tokens(client):
    answer = chat(client, QUESTION, max_tokens=12).json()  # "The capital of France is Paris." then the end
    assert answer["choices"][0]["finish_reason"] == "stop" and answer["usage"]["completion_tokens"] < 12
    forced = chat(client, QUESTION, max_tokens=12, ignore_eos=True).json()
    assert forced["choices"][0]["finish_reason"] == "length" and forced["usage"]["completion_tokens"] == 12


def test_streamed_chat_equals_the_whole_answer(client):
    whole = chat(client, QUESTION).json()
    chunks, done = events(chat(client, QUESTION, stream=True, stream_options={"include_usage": True}))
    assert done and all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == whole["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == \
        whole["usage"]["completion_tokens"]
    assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] == len(client.app.state.engine.llm.chat_ids(
        QUESTION)) - 1  # the same prompt again: all but its last token come from the cache


def test_stream_reports_prompt_progress_when_asked(client, llm, monkeypatch):
    monkeypatch.setattr(llm.backend, "prefill_batch", 16)
    prompt = "Progress is reported once per prefill batch of the prompt, " * 4
    n_prompt = len(llm.tokenize(prompt))
    body = {"prompt": prompt, "max_tokens": 2, "temperature": 0, "stream": True}
    chunks, done = events(client.post("/v1/completions", json={**body, "return_progress": True}))
    progress = [c["prompt_progress"] for c in chunks if "prompt_progress" in c]
    assert done and len(progress) == -(-n_prompt // 16) and progress[0]["cache"] == 0
    assert [p["processed"] for p in progress] == [min(16 * (i + 1), n_prompt) for i in range(len(progress))]
    assert all(p["total"] == n_prompt for p in progress)
    again, _ = events(client.post("/v1/completions", json={**body, "return_progress": True}))
    assert [c["prompt_progress"] for c in again if "prompt_progress" in c] == [
        {"total": n_prompt, "cache": n_prompt - 1, "processed": n_prompt}]
    plain, _ = events(client.post("/v1/completions", json=body))
    assert not any("prompt_progress" in c for c in plain)


def test_completion_stop_strings_cut_the_text(client):
    prompt = {"prompt": "The list of the first ten numbers: one, two, three,", "max_tokens": 12, "temperature": 0}
    full = client.post("/v1/completions", json=prompt).json()["choices"][0]
    assert full["finish_reason"] == "length"
    stop = full["text"][3:6]
    cut = full["text"][:full["text"].index(stop)]
    stopped = client.post("/v1/completions", json={**prompt, "stop": [stop, "never appears"]}).json()["choices"][0]
    assert stopped == {"index": 0, "text": cut, "logprobs": None, "finish_reason": "stop"}
    chunks, done = events(client.post("/v1/completions", json={**prompt, "stop": stop, "stream": True}))
    assert done and "".join(c["choices"][0]["text"] for c in chunks) == cut
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    by_ids = client.post("/v1/completions", json={**prompt, "prompt": client.post(
        "/tokenize", json={"content": prompt["prompt"]}).json()["tokens"]}).json()
    assert by_ids["choices"][0]["text"] == full["text"]


def test_stop_matcher_holds_back_possible_starts():
    matcher = StopMatcher(["END", "\n\n"])
    assert matcher.push("one E") == ("one ", False)
    assert matcher.push("N") == ("", False)
    assert matcher.push("x two\n") == ("ENx two", False)
    assert matcher.push("\nthree") == ("", True)
    matcher = StopMatcher(["abc"])
    assert matcher.push("xab") == ("x", False) and matcher.flush() == "ab"


def test_tokenize_detokenize_models_metrics(client, llm):
    text = "Hello, world: a test."
    tokens = client.post("/tokenize", json={"content": text}).json()["tokens"]
    assert tokens == llm.tokenize(text)
    assert client.post("/detokenize", json={"tokens": tokens}).json() == {"content": llm.detokenize(tokens)}
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["smol"]
    chat(client, QUESTION, max_tokens=2)
    before = client.get("/metrics").text
    chat(client, QUESTION, max_tokens=2)  # the same prompt again: a cache hit
    after = client.get("/metrics").text
    assert 'engine_requests_total{endpoint="/v1/chat/completions",status="200"}' in after

    def total(text, name):
        return float(next(line.split()[-1] for line in text.splitlines() if line.startswith(f"engine_{name} ")))
    assert total(after, "generated_tokens_total") > total(before, "generated_tokens_total")
    assert total(after, "prompt_cache_hits_total") == total(before, "prompt_cache_hits_total") + 1


LONG = "word " * 3000  # > 2048 tokens


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", [1, 2], 400, None),
    ("/v1/chat/completions", {}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {"messages": QUESTION, "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {"messages": QUESTION, "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": QUESTION, "max_tokens": True}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": QUESTION, "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": QUESTION, "max_tokens": 10**9}, 400, "messages"),
    ("/v1/chat/completions", {"messages": QUESTION, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": QUESTION, "temperature": -1}, 400, None),
    ("/v1/chat/completions", {"messages": QUESTION, "top_p": 0}, 400, None),
    ("/v1/chat/completions", {"messages": QUESTION, "seed": -5}, 400, None),
    ("/v1/completions", b'{"prompt": "hi", "temperature": NaN}', 400, None),
    ("/v1/chat/completions", {"messages": QUESTION, "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {"messages": QUESTION, "stop": 5}, 400, "stop"),
    ("/v1/chat/completions", {"messages": QUESTION, "n": 2}, 400, "n"),
    ("/v1/chat/completions", {"messages": QUESTION, "stream_options": {"include_usage": "yes"}}, 400,
     "stream_options.include_usage"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    ("/v1/completions", {"prompt": LONG, "stream": True}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 10**7]}, 400, "prompt"),
    ("/v1/completions", {"prompt": {"text": "hi"}}, 400, "prompt"),
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt"),
    ("/tokenize", {"content": 3}, 400, "content"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/v1/no-such-endpoint", {}, 404, None),
])
def test_bad_requests_get_openai_errors(client, path, body, status, param):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = client.post(path, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param
    assert "Traceback" not in response.text
    if "context" in error["message"]:
        assert error["code"] == "context_length_exceeded"
    assert client.get("/health").status_code == 200  # still serving
    assert client.get("/v1/completions").status_code == 405


def test_seed_minus_one_is_random_as_in_llama_cpp(client):
    response = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "seed": -1})
    assert response.status_code == 200, response.text


def test_health_is_503_while_loading():
    release = threading.Event()

    def slow_load():
        release.wait(30)
        return engine.load(device="cpu", context=256)

    with TestClient(create_app(slow_load, "smol")) as client:
        loading = client.get("/health")
        assert loading.status_code == 503 and loading.json()["error"]["type"] == "unavailable_error"
        assert client.post("/v1/completions", json={"prompt": "hi"}).status_code == 503
        assert client.get("/v1/models").status_code == 200
        release.set()
        wait_loaded(client)
        assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}).status_code == 200


def test_concurrent_requests_each_get_their_own_answer(client):
    prompts = ["The sky is", "Water boils at", "My favourite food is"]
    expected = [client.post("/v1/completions", json={"prompt": p, "max_tokens": 5, "temperature": 0}).json()
                ["choices"][0]["text"] for p in prompts]
    answers = [None] * len(prompts)

    def ask(i):
        answers[i] = client.post("/v1/completions", json={"prompt": prompts[i], "max_tokens": 5, "temperature": 0,
                                                          "stream": i % 2 == 1})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    texts = [(r.json()["choices"][0]["text"] if i % 2 == 0 else
              "".join(c["choices"][0]["text"] for c in events(r)[0])) for i, r in enumerate(answers)]
    assert texts == expected
