"""`engine serve --parallel N` on a tiny random model over a real socket: 8 concurrent `openai` clients each get
the answer the same request gets alone (greedy and seeded, streamed and not, 1, 2 and 4 slots, decode steps
batched or not; batches of more than one slot reached); busy slots advance token by token, turn by turn or in
batches of all the decoding slots; waiting requests are served first come, first served; a client that
disconnects frees its slot;
a request goes to the slot that holds its prefix (cached_tokens); the slot gauges; the memory refusal from the
command line. The slot choice and the model turns are also checked on their own (slots.py, turns.py)."""
import asyncio
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import engine  # noqa: E402
from engine import memory  # noqa: E402
from engine.server.app import create_app  # noqa: E402
from engine.server.slots import SlotPool  # noqa: E402
from engine.server.turns import ModelTurns  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_tiny_model import TinySpec, make_tiny_model  # noqa: E402
from prose import prose_lines  # noqa: E402

LINES = prose_lines()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), TinySpec(), gguf_types=("f32",), hf=False)["f32"]


@contextmanager
def serve(model, slots: int, context: int = 1024, batch_decode: bool = True):
    """A live server (uvicorn in a thread) with `slots` slots: (base URL, its ServerState)."""
    app = create_app(lambda: engine.load(model, device="cpu", context=context, slots=slots), "tiny", batch_decode)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    state = app.state.engine
    deadline = time.monotonic() + 60
    while not (server.started and state.llm is not None):
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", state
    finally:
        server.should_exit = True
        thread.join(30)


def client(url: str):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)


def gauges(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {line.split()[0][len("engine_"):]: float(line.split()[1]) for line in text.splitlines()
            if line.startswith(("engine_slots", "engine_requests_waiting", "engine_generated_tokens_total",
                                "engine_decode_batch_size"))}


def wait_until(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def let_the_other_ask(state) -> None:
    """Inside a model call: give the other busy slot's worker time to ask for its next turn (a loaded machine may
    not run it for a while), so that the order of turns shows the scheduling, not the machine's load."""
    deadline = time.monotonic() + 2
    while not state.turns.waiting and state.slots.processing == 2 and time.monotonic() < deadline:
        time.sleep(0.001)


def ask(openai_client, i: int) -> tuple[str, int]:
    """Request i of 8: chat or completion, streamed or not, greedy or seeded -> (text, completion tokens)."""
    sampling = {"temperature": 0} if i % 3 else {"temperature": 0.9, "seed": 100 + i}
    common = {"model": "tiny", "max_tokens": 6 + 2 * i, "stream": i % 4 in (1, 2), **sampling}
    if common["stream"]:
        common["stream_options"] = {"include_usage": True}
    if i % 2:
        reply = openai_client.chat.completions.create(messages=[{"role": "user", "content": LINES[i]}], **common)
    else:
        reply = openai_client.completions.create(prompt=LINES[i], **common)
    if not common["stream"]:
        choice = reply.choices[0]
        return (choice.message.content if i % 2 else choice.text), reply.usage.completion_tokens
    chunks = list(reply)
    pieces = [(c.choices[0].delta.content if i % 2 else c.choices[0].text) or "" for c in chunks if c.choices]
    return "".join(pieces), chunks[-1].usage.completion_tokens


@pytest.mark.parametrize("slots, batch_decode", [(1, True), (2, False), (2, True), (4, True)])
def test_eight_concurrent_clients_each_get_the_answer_they_get_alone(tiny, slots, batch_decode):
    with serve(tiny, slots, batch_decode=batch_decode) as (url, state):
        alone = [ask(client(url), i) for i in range(8)]
        start = threading.Barrier(8)

        def concurrent(i):
            start.wait()
            return ask(client(url), i)

        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(concurrent, range(8)))
        assert together == alone
        assert all(text and n == 6 + 2 * i for i, (text, n) in enumerate(alone))  # whole: no end token met
        assert gauges(url)["slots"] == slots and state.slots.idle == slots
        batches = gauges(url)
        if batch_decode:  # every decode step went through the batcher: more than one slot at a time with 2 or 4
            assert batches["decode_batch_size_sum"] == 2 * sum(n - 1 for _, n in alone)  # alone, then together
            assert (batches['decode_batch_size_bucket{le="1"}'] < batches["decode_batch_size_count"]) == (slots > 1)
        else:
            assert batches["decode_batch_size_count"] == 0


def test_busy_slots_advance_token_by_token(tiny, monkeypatch):
    with serve(tiny, 2, batch_decode=False) as (url, state):
        llm = state.llm
        steps = []  # the slot of every model call, in order
        forward = llm.model.forward

        def recorded(ids, cache, **kwargs):
            wait_until(lambda: len(steps) or state.slots.processing == 2, "both requests to take their slots")
            steps.append(next(i for i, c in enumerate(llm.caches) if c is cache))
            let_the_other_ask(state)
            return forward(ids, cache, **kwargs)

        monkeypatch.setattr(llm.model, "forward", recorded)
        assert two_clients_at_once(url) == [40, 40]
    assert sorted(set(steps)) == [0, 1] and len(steps) == 2 * 40  # a prefill and 39 decode steps each
    both = steps[max(steps.index(0), steps.index(1)):]  # from the later start on, both slots are busy
    both = both[:min(len(both) - both[::-1].index(s) for s in (0, 1))]  # ... until the first one finishes
    runs = [len(run) for run in "".join(map(str, both)).replace("01", "0 1").replace("10", "1 0").split()]
    assert len(both) >= 70 and max(runs) <= 2  # alternating, not one request after the other


def two_clients_at_once(url: str) -> list[int]:
    """Two completions of 40 tokens (ignore_eos) started together on their own prompts: their token counts."""
    start = threading.Barrier(2)

    def generate(i):
        start.wait()
        return client(url).completions.create(model="tiny", prompt=LINES[20 + i], max_tokens=40, temperature=0,
                                              extra_body={"ignore_eos": True}).usage.completion_tokens

    with ThreadPoolExecutor(2) as pool:
        return list(pool.map(generate, range(2)))


def test_busy_slots_decode_in_batches_of_both(tiny, monkeypatch):
    with serve(tiny, 2) as (url, state):
        llm = state.llm
        forward, forward_batch = llm.model.forward, llm.model.forward_batch
        sizes = []  # the sequences of every batched decode step, in order

        def prefill(ids, cache, **kwargs):
            if len(ids) > 1:
                wait_until(lambda: state.slots.processing == 2, "both requests to take their slots")
            return forward(ids, cache, **kwargs)

        def recorded(tokens, caches):
            sizes.append(len(caches))
            return forward_batch(tokens, caches)

        monkeypatch.setattr(llm.model, "forward", prefill)
        monkeypatch.setattr(llm.model, "forward_batch", recorded)
        assert two_clients_at_once(url) == [40, 40]
        batches = gauges(url)
    # 39 decode steps each: alone while the other prefills or after it ends, else both in one forward
    assert set(sizes) <= {1, 2} and sum(sizes) == 2 * 39 and sizes.count(2) >= 30, sizes
    first, last = sizes.index(2), len(sizes) - 1 - sizes[::-1].index(2)
    assert set(sizes[first:last + 1]) == {2} and first == len(sizes) - 1 - last  # 1s only before and after
    assert (batches["decode_batch_size_sum"], batches["decode_batch_size_count"]) == (2 * 39, len(sizes))


def test_a_long_prefill_lets_the_other_slot_decode_between_its_batches(tiny, monkeypatch):
    with serve(tiny, 2) as (url, state):
        llm = state.llm
        monkeypatch.setattr(llm.backend, "prefill_batch", 16)  # a long prompt's batches, in miniature
        calls = []  # (slot, tokens) of every model call, in order
        forward = llm.model.forward

        def recorded(ids, cache, **kwargs):
            calls.append((next(i for i, c in enumerate(llm.caches) if c is cache), len(ids)))
            if len(calls) == 3:  # the first request has started decoding: it waits for the second one to arrive
                wait_until(lambda: state.slots.processing == 2, "the second request to take its slot")
            let_the_other_ask(state)
            return forward(ids, cache, **kwargs)

        monkeypatch.setattr(llm.model, "forward", recorded)
        long_prompt = llm.tokenize(" ".join(LINES[70:72]))[:40]  # 3 prefill batches
        assert len(long_prompt) == 40

        def generate(prompt, n):
            return client(url).completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0,
                                                  extra_body={"ignore_eos": True}).usage.completion_tokens

        with ThreadPoolExecutor(2) as pool:
            decoding = pool.submit(generate, [5, 6, 7], 60)  # slot 0
            wait_until(lambda: len(calls) >= 3, "the first request to decode")
            assert generate(long_prompt, 2) == 2 and decoding.result() == 60
    batches = [i for i, (slot, n) in enumerate(calls) if slot == 1 and n > 1]
    assert [calls[i][1] for i in batches] == [16, 16, 8]
    for a, b in zip(batches, batches[1:]):  # the other slot decoded between the batches
        assert b - a > 1 and all(calls[i] == (0, 1) for i in range(a + 1, b)), calls


def test_waiting_requests_are_served_first_come_first_served(tiny, monkeypatch):
    with serve(tiny, 1) as (url, state):
        prompts = {name: LINES[30 + k] for k, name in enumerate("ABCD")}
        prompt_ids = {name: state.llm.tokenize(prompt) for name, prompt in prompts.items()}
        gate, served = threading.Event(), []  # served: the requests in the order their prompts were prefilled
        forward = state.llm.model.forward

        def gated(ids, cache, **kwargs):
            gate.wait(30)
            served.extend(name for name, p in prompt_ids.items() if len(ids) > 1 and p[-len(ids):] == list(ids))
            return forward(ids, cache, **kwargs)

        monkeypatch.setattr(state.llm.model, "forward", gated)
        with ThreadPoolExecutor(4) as pool:
            replies = {"A": pool.submit(client(url).completions.create, model="tiny", prompt=prompts["A"],
                                        max_tokens=3, temperature=0)}
            wait_until(lambda: gauges(url)["slots_processing"] == 1, "A to take the slot")
            for n, name in enumerate("BCD", start=1):
                replies[name] = pool.submit(client(url).completions.create, model="tiny", prompt=prompts[name],
                                            max_tokens=3, temperature=0)
                wait_until(lambda: gauges(url)["requests_waiting"] == n, f"{name} to wait")
            assert httpx.get(f"{url}/health").json() == {"status": "ok", "slots_idle": 0, "slots_processing": 1}
            gate.set()
            assert [replies[name].result().usage.completion_tokens for name in "ABCD"] == [3] * 4
        assert served == ["A", "B", "C", "D"]
        assert gauges(url)["requests_waiting"] == 0 and gauges(url)["slots_processing"] == 0


def test_a_disconnect_mid_stream_frees_its_slot(tiny, monkeypatch):
    with serve(tiny, 1) as (url, state):
        forward = state.llm.model.forward
        monkeypatch.setattr(state.llm.model, "forward", lambda *a, **k: time.sleep(0.01) or forward(*a, **k))
        before = gauges(url)["generated_tokens_total"]
        body = {"prompt": LINES[40], "max_tokens": 500, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=url, timeout=60) as http:
            with http.stream("POST", "/v1/completions", json=body) as response:
                received = [line for line, _ in zip(response.iter_lines(), range(6)) if line.startswith("data: ")]
            assert len(received) >= 2  # the connection is closed now
            wait_until(lambda: http.get("/health").json()["slots_idle"] == 1, "the slot to be freed")
            after = client(url).completions.create(model="tiny", prompt=LINES[41], max_tokens=2, temperature=0)
        assert after.usage.completion_tokens == 2
        assert gauges(url)["generated_tokens_total"] - before < 250 + 2  # stopped well before 500


def test_a_request_goes_to_the_slot_holding_its_prefix(tiny):
    with serve(tiny, 2) as (url, state):
        llm = state.llm
        document = llm.tokenize(" ".join(LINES[50:53]))
        other = llm.tokenize(LINES[60])

        def cached(prompt):
            reply = client(url).completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0)
            return reply.usage.prompt_tokens_details.cached_tokens

        assert cached(other) == 0  # slot 0 (both empty: the lowest id)
        assert cached(document + llm.tokenize(" First?")) == 0  # slot 1: nothing shared, the least recently used
        # the least recently used slot is 0 now, but slot 1 holds the document: it goes there
        assert cached(document + llm.tokenize(" Second?")) >= len(document)
        assert cached(other) == len(other) - 1  # and slot 0 still holds the other prompt
        assert [s.session.tokens[:len(other)] == other for s in state.slots.slots] == [True, False]


def test_serve_refuses_more_slots_than_fit_with_one_error(tiny, monkeypatch, capsys):
    from engine.cli import cli, run

    loaded = engine.loader.open_model(tiny)
    plan = memory.plan_memory(loaded.config, loaded.weights, 4096, "cpu", f32_copies=False, slots=8)
    monkeypatch.setattr(memory, "available_bytes", lambda device: plan.with_slots(3).total + 1)
    monkeypatch.setattr(sys, "argv", ["engine", "serve", "-m", str(tiny), "-c", "4096", "--no-f32-copies",
                                      "--parallel", "8", "--port", "0", "--device", "cpu"])
    with pytest.raises(SystemExit) as exited:
        run(cli)
    assert exited.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: 8 slots of a context of 4096 tokens each: ") and "use --parallel 3" in err


@pytest.mark.parametrize("flags, batched", [([], True), (["--no-batch-decode"], False)])
def test_serve_passes_its_batch_decode_option(tiny, monkeypatch, flags, batched):
    from click.testing import CliRunner

    from engine.cli import cli
    from engine.server import command

    served = {}
    monkeypatch.setattr(command, "run_server", lambda load, name, host, port, batch_decode: served.update(
        name=name, batch_decode=batch_decode))
    result = CliRunner().invoke(cli, ["serve", "-m", str(tiny), "--port", "0", *flags])
    assert result.exit_code == 0, result.output
    assert served == {"name": tiny.name.removesuffix(".gguf"), "batch_decode": batched}


class FakeSession:
    def __init__(self, tokens=()):
        self.tokens = list(tokens)


def test_slot_choice_prefers_a_shared_prefix_over_half_the_prompt_else_the_least_recently_used():
    async def scenario():
        pool = SlotPool([FakeSession([1, 2, 3, 4]), FakeSession([1, 2, 9]), FakeSession()])
        assert pool.choose([1, 2, 3, 4, 5, 6]).id == 0  # slot 0 holds 4 of the 6 tokens
        assert pool.choose([1, 2, 9, 9, 9]).id == 1  # slot 1 holds 3 of the 5
        assert pool.choose([1, 2, 9, 9, 9, 9]).id == 0  # 3 of 6 is not over half: the least recently used (the
        # slots are all unused: the lowest id)
        async with pool.take([7]) as first:
            assert first.id == 0 and (pool.processing, pool.idle) == (1, 2)
        async with pool.take([8]) as second:
            assert second.id == 1  # slot 0 was used last
            assert pool.choose([1, 2, 3, 4, 5]).id == 0  # slot 0 is free again and holds 4 of 5
            assert pool.choose([1, 2, 9, 9, 9]).id == 2  # slot 1 is busy, slot 0 shares 2 of 5: the least recently
            # used of the free ones
        assert pool.choose([8]).id == 2  # still the least recently used

    asyncio.run(scenario())


def test_waiters_get_slots_in_arrival_order_and_a_cancelled_one_is_skipped():
    async def scenario():
        pool = SlotPool([FakeSession()])
        served = []

        async def request(name, hold):
            async with pool.take([1]):
                served.append(name)
                await hold.wait()

        holds = {name: asyncio.Event() for name in "ABCD"}
        tasks = {}
        for name in "ABCD":
            tasks[name] = asyncio.create_task(request(name, holds[name]))
            await asyncio.sleep(0)
        assert served == ["A"] and pool.waiting == 3
        tasks["B"].cancel()  # a client that went away while waiting
        await asyncio.sleep(0)
        assert pool.waiting == 2
        for name in "ACD":
            holds[name].set()
            await asyncio.sleep(0.01)
        assert served == ["A", "C", "D"] and pool.idle == 1 and pool.waiting == 0

    asyncio.run(scenario())


def test_model_turns_go_round_robin():
    turns, order = ModelTurns(), []
    running = [3]  # workers not finished yet
    lock = threading.Lock()

    def worker(name):
        for _ in range(5):
            with turns.turn():
                order.append(name)
                deadline = time.monotonic() + 2  # until every other running worker asks for its turn
                while turns.waiting < running[0] - 1 and time.monotonic() < deadline:
                    time.sleep(0.001)
        with lock:
            running[0] -= 1

    threads = [threading.Thread(target=worker, args=(name,)) for name in "abc"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    rounds = ["".join(sorted(order[i:i + 3])) for i in range(0, 15, 3)]
    assert rounds == ["abc"] * 5  # every round gives each worker one turn
