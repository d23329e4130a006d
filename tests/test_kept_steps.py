"""Kept decode graphs (engine/backends/cuda/graph.py, module docstring), on the CPU: the key (the sampling scalars a
captured step freezes), the per-cache LRU and its step inputs, the sampler's reset, and GraphDecoder's course over
stand-ins for CuPy and the model (a stream that records launches while capturing, a graph that replays them, a
sample_token that writes a token depending on the logits, the seed and the counter): a later generation on the same
cache replays the kept graph from its first step and gives the tokens a fresh decoder gives."""
from __future__ import annotations

import gc
from contextlib import nullcontext
from types import SimpleNamespace

import numpy as np
import pytest

from engine.backends.cuda import sampling
from engine.backends.cuda.graph import GraphDecoder, KeptStates, KeptSteps, StepState, step_inputs
from engine.backends.cuda.sampling import DeviceSampler, scalars
from engine.kvcache import KVCache
from engine.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)
SEEDED = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, min_p=0.02, repeat_penalty=1.2, seed=5)
HOST = SamplingParams(temperature=0.9, top_k=0, seed=5)  # all-vocabulary top-k: the host samples
VOCAB = 97


# --- the key ------------------------------------------------------------------------------------------------------
def test_the_key_holds_what_the_kernels_take_by_value_and_not_the_seed():
    assert scalars(SEEDED) == scalars(SamplingParams(**{**SEEDED.__dict__, "seed": 6}))
    assert scalars(SEEDED) == scalars(SamplingParams(**{**SEEDED.__dict__, "seed": None}))
    for field, value in (("temperature", 0.8), ("top_k", 21), ("top_p", 0.8), ("min_p", 0.0),
                         ("repeat_penalty", 1.1), ("repeat_last_n", 32)):
        assert scalars(SEEDED) != scalars(SamplingParams(**{**SEEDED.__dict__, field: value})), field
    # greedy reads no temperature, top_k, top_p or min_p; no penalty is no penalty however long its window
    assert scalars(GREEDY) == scalars(SamplingParams(temperature=0.0, top_k=3, top_p=0.5, min_p=0.3, seed=1))
    assert scalars(GREEDY) == scalars(SamplingParams(temperature=0.0, repeat_last_n=0, repeat_penalty=1.5))
    assert scalars(GREEDY) != scalars(SamplingParams(temperature=0.0, repeat_penalty=1.5))
    assert scalars(HOST) != scalars(SamplingParams(temperature=0.9, top_k=300, seed=5))


# --- the LRU per cache ----------------------------------------------------------------------------------------------
class State:
    def __init__(self, name):
        self.name, self.released = name, False

    def release(self):
        self.released = True


def test_kept_states_drop_the_least_recently_used_beyond_their_size():
    kept, inputs = KeptStates(2), ("model",)
    a, b, c = State("a"), State("b"), State("c")
    kept.put(inputs, "ka", a)
    kept.put(inputs, "kb", b)
    assert kept.take(inputs, "ka") is a and kept.take(inputs, "ka") is None  # taken: the caller's until put back
    kept.put(inputs, "ka", a)  # now the most recently used
    kept.put(inputs, "kc", c)
    assert b.released and not a.released and list(kept.states) == ["ka", "kc"]
    newer = State("a2")
    kept.put(inputs, "ka", newer)  # two decoders on one key: the later put replaces (and frees) the earlier
    assert a.released and kept.states["ka"] is newer
    kept.put(inputs, "ka", newer)
    assert not newer.released


def test_kept_states_serve_only_the_inputs_they_were_made_for():
    kept = KeptStates(4)
    model, other_model = object(), object()
    a = State("a")
    kept.put((model, 1), "k", a)
    assert kept.take((model, 1), "other key") is None and not a.released
    assert kept.take((other_model, 1), "k") is None and a.released  # compared by identity: released, not reused
    assert kept.take((model, 1), "k") is None


def test_kept_steps_are_per_cache_and_go_with_it():
    steps = KeptSteps(per_cache=4)
    first, second = KVCache(1, 4, 1, 2), KVCache(1, 4, 1, 2)
    a = State("a")
    steps.put(first, ("m",), "k", a)
    assert steps.take(second, ("m",), "k") is None
    assert steps.take(first, ("m",), "k") is a
    steps.put(first, ("m",), "k", a)
    del first
    gc.collect()
    assert len(steps._caches) == 0


def test_step_inputs_are_the_model_its_blocks_and_the_q8_scratch():
    model = SimpleNamespace(decode_blocks=object())
    scratch = SimpleNamespace(buffers={"k": object(), "v": object()})
    backend = SimpleNamespace(kv_scratch=scratch)
    inputs = step_inputs(backend, model)
    assert inputs == (model, model.decode_blocks, scratch.buffers["k"], scratch.buffers["v"])
    scratch.buffers["k"] = object()  # a larger cache was made: its replacement
    kept, state = KeptStates(1), State("a")
    kept.put(inputs, "k", state)
    assert kept.take(step_inputs(backend, model), "k") is None and state.released


# --- the sampler's reset --------------------------------------------------------------------------------------------
def test_a_reset_sampler_holds_what_a_fresh_one_does():
    history = list(range(3, 200, 3))
    used = DeviceSampler(np, SEEDED, [1, 2])  # numpy stands in for CuPy
    used.ring[:] = 7
    used.ring_count[:] = 99
    used.counter[:] = 12
    used.token[:] = 8
    other = SamplingParams(**{**SEEDED.__dict__, "seed": 77})
    used.reset(other, history)
    fresh = DeviceSampler(np, other, history)
    for name in ("ring", "ring_count", "counter", "seed"):
        assert np.array_equal(getattr(used, name), getattr(fresh, name)), name
    assert fresh.ring_count[0] == SEEDED.repeat_last_n and list(fresh.ring) == history[-SEEDED.repeat_last_n:]
    assert fresh.seed[0] != DeviceSampler(np, SEEDED, history).seed[0]
    with pytest.raises(ValueError, match="differ"):
        used.reset(GREEDY, history)


# --- GraphDecoder over stand-ins --------------------------------------------------------------------------------------
class Array(np.ndarray):
    def get(self, stream=None):
        return np.asarray(self).copy()


def array(a, dtype=None):
    return np.array(a, dtype=dtype).view(Array)


class Stream:
    """Launches run at once, or are recorded while capturing (the graph replays them)."""
    current: list = []

    def __init__(self, non_blocking=False):
        self.recording = None

    def __enter__(self):
        Stream.current.append(self)
        return self

    def __exit__(self, *exc):
        Stream.current.pop()

    def synchronize(self):
        pass

    def begin_capture(self):
        self.recording = []

    def end_capture(self):
        ops, self.recording = self.recording, None
        return SimpleNamespace(launch=lambda stream: [op() for op in ops])


Stream.null = Stream()


def run(op):
    stream = Stream.current[-1] if Stream.current else None
    if stream is not None and stream.recording is not None:
        stream.recording.append(op)
    else:
        op()


FAKE_CP = SimpleNamespace(
    int32=np.int32, uint64=np.uint64, float32=np.float32,
    zeros=lambda shape, dtype=float: np.zeros(shape, dtype).view(Array), asarray=array, array=array,
    asnumpy=lambda a, stream=None: np.asarray(a).copy(),
    cuda=SimpleNamespace(Stream=Stream, MemoryPool=lambda: SimpleNamespace(malloc=None, free_all_blocks=lambda: None),
                         using_allocator=lambda malloc: nullcontext()))


def fake_function(file, kernel, dtype="f16", instance=None):
    """sample_token: the logits' argmax, moved on by seed and counter when stochastic; the ring, the counter and
    the position as the kernel keeps them. The other kernels: nothing."""
    def launch(grid, block, args, shared_mem=0):
        if kernel != "sample_token":
            return
        logits, ring, ring_size, ring_count, temperature = args[0], args[9], int(args[10]), args[11], args[12]
        seed, counter, token, pos, advance = args[16], args[17], args[18], args[19], int(args[20])

        def op():
            pick = int(np.argmax(logits[0]))
            if temperature > 0:
                pick = (pick + int(seed[0] % np.uint64(1000)) + int(counter[0])) % logits.shape[-1]
                counter[0] += 1
            token[0] = pick
            if ring_size:
                ring[ring_count[0] % ring_size] = pick
                ring_count[0] += 1
            pos[0] += advance
        run(op)
    return launch


class Model:
    def __init__(self):
        self.decode_blocks = object()
        self.eager = self.captured = 0  # compute calls outside a capture, and captured

    def compute(self, token, position, cache, which):
        out = np.zeros((1, VOCAB), np.float32).view(Array)
        capturing = bool(Stream.current) and Stream.current[-1].recording is not None
        self.eager += not capturing
        self.captured += capturing

        def op():
            out[...] = 0
            out[0, (int(token[0]) * 7 + int(position[0]) * 3) % VOCAB] = 1.0
        run(op)
        return out


@pytest.fixture
def fakes(monkeypatch):
    monkeypatch.setattr(sampling, "function", fake_function)
    backend = SimpleNamespace(cp=FAKE_CP, dtype="f16", kv_scratch=SimpleNamespace(buffers={}), kept_steps=KeptSteps())
    return backend, Model()


def generate(backend, model, cache, params, prompt, n, by_step=False, use_graph=True):
    """generate_on's course: the prompt (but its last token, by_step) 'prefilled', then n tokens; the decoder closed."""
    cache.truncate(0)
    cache.commit(len(prompt) - by_step)
    decoder = GraphDecoder(backend, model, cache, params, prompt, use_graph=use_graph)
    try:
        tokens = [decoder.start(prompt[-1]) if by_step else decoder.first(np.arange(VOCAB, dtype=np.float32) % 13)]
        while len(tokens) < n:
            tokens.append(decoder.step(tokens[-1]))
        return tokens
    finally:
        decoder.close()


def fresh(params, prompt, n, by_step=False):
    """The tokens of a decoder with nothing kept (a backend and cache of its own)."""
    backend = SimpleNamespace(cp=FAKE_CP, dtype="f16", kv_scratch=SimpleNamespace(buffers={}), kept_steps=KeptSteps())
    return generate(backend, Model(), KVCache(1, 64, 1, 2), params, prompt, n, by_step)


@pytest.mark.parametrize("params", [GREEDY, SEEDED, HOST], ids=["greedy", "seeded", "host"])
def test_a_later_generation_replays_the_kept_graph_from_its_first_step(fakes, params):
    backend, model = fakes
    cache = KVCache(1, 64, 1, 2)
    prompts = [[3, 4, 5], [3, 4, 5, 9, 11], [8]]
    assert generate(backend, model, cache, params, prompts[0], 6) == fresh(params, prompts[0], 6)
    assert model.captured == 1 and model.eager == 1  # a new state: one eager step, then the capture
    for prompt in prompts[1:]:
        for by_step in (False, True):
            expected = fresh(params, prompt, 6, by_step)
            eager, captures = model.eager, model.captured
            assert generate(backend, model, cache, params, prompt, 6, by_step) == expected
            assert model.eager == eager and model.captured == captures  # replayed from the first step


def test_other_settings_capture_their_own_graph_and_the_seed_does_not(fakes):
    backend, model = fakes
    cache = KVCache(1, 64, 1, 2)
    prompt = [3, 4, 5]
    generate(backend, model, cache, SEEDED, prompt, 5)
    reseeded = SamplingParams(**{**SEEDED.__dict__, "seed": 8})
    assert generate(backend, model, cache, reseeded, prompt, 5) == fresh(reseeded, prompt, 5)
    assert model.captured == 1
    generate(backend, model, cache, GREEDY, prompt, 5)
    assert model.captured == 2
    other_cache = KVCache(1, 64, 1, 2)
    generate(backend, model, other_cache, GREEDY, prompt, 5)  # never another cache's graph
    assert model.captured == 3
    model.decode_blocks = object()  # other decode blocks: the kept graphs read the old ones' memory
    generate(backend, model, cache, GREEDY, prompt, 5)
    assert model.captured == 4


def test_eager_decoders_run_on_the_kept_buffers(fakes):
    backend, model = fakes
    cache = KVCache(1, 64, 1, 2)
    generate(backend, model, cache, SEEDED, [3, 4, 5], 5)
    eager = model.eager
    assert generate(backend, model, cache, SEEDED, [6, 7], 5, use_graph=False) == fresh(SEEDED, [6, 7], 5)
    assert model.eager == eager + 4 and model.captured == 1
    assert generate(backend, model, cache, SEEDED, [6, 7], 5) == fresh(SEEDED, [6, 7], 5)


def test_two_decoders_on_one_cache_never_share_a_state(fakes):
    backend, model = fakes
    cache = KVCache(1, 64, 1, 2)
    generate(backend, model, cache, GREEDY, [3, 4, 5], 4)
    a = GraphDecoder(backend, model, cache, GREEDY, [3])
    b = GraphDecoder(backend, model, cache, GREEDY, [3])
    assert isinstance(a.state, StepState) and a.state.graph is not None and b.state.graph is None
    state = a.state
    a.close()
    assert a.state is None
    assert backend.kept_steps.take(cache, step_inputs(backend, model), scalars(GREEDY)) is state
