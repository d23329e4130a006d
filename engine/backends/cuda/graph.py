"""The decode loop as one CUDA graph per step: Llama.compute for one token, then device sampling.

    decoder = backend.decoder(model, cache, sampling_params, history)   # after the prompt's prefill
    token = decoder.first(last_logits)      # sample from the prefill's last logits (numpy or device)
    token = decoder.start(last_prompt_id)   # or: feed the prompt's last token (cache.length = len(history) - 1)
    while ...:
        token = decoder.step(token)         # feed token at cache.length, commit it, return the next id
    decoder.close()                         # the step's graph and buffers are kept for the cache's next generation

The step is ``Llama.compute`` for one token, which runs the backend's fused decode blocks (fused.py:
6 launches per layer). The graph reads the token and its position from two device slots and, at its
end, the sampling kernel writes the next token into the token slot and advances the position: a
replay needs no upload, and only the 4-byte token id comes back. A new step state's first step runs eagerly
(compiles kernels, warms the memory pool); the next captures the graph; later steps replay it. Captured work draws
its memory from a private pool that lives with the graph, so no other allocation can reuse the
addresses the graph writes. Stream: a private non-blocking stream, synchronized with the default
stream when the decoder starts (the prefill ran there) and at every step (the token comes back).
When the sampling settings cannot run on the device (sampling.device_supported), the graph stops
at the logits and the host Sampler picks the token. Where a Self-Extend or StreamingLLM attention runs its composed
path (the attention temperature; extension.graph_ready) every step runs eagerly (``use_graph`` False,
CudaBackend.decoder): that path picks its key tiles on the host from the position.

Kept graphs (gpt-fast's one static cache and graph): the step state (``StepState``: the stream, the device sampler's
buffers, the position slot, the captured graph with its pool and logits) outlives its decoder. ``close`` hands it to
the backend's ``KeptSteps``, which keeps up to KEPT_PER_CACHE states per KV cache (weakly keyed: they go with the
cache), by the sampling scalars the kernels take by value (sampling.scalars: frozen into the graph; the seed is a
device buffer), least recently used dropped with their pools. A later decoder on the same cache with equal scalars
takes the state, resets the sampler (ring and its count from the new history, counter 0, the new seed) and uploads
its token and position at its first step, then replays the graph from that step on (``start`` or ``step``): a chat
turn or a server request pays no eager step and no capture. A graph is valid only for the objects whose device
memory it reads (``step_inputs``: the model, its decode blocks, the q8_0 scratch; the cache's buffers are fixed for
its life): a cache keeps the states of one set of them, held so that their memory outlives the graphs. A cache
serves one generation at a time; a decoder holds its state until it closes, so two at once never share buffers.
"""
from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from typing import Any, Sequence

import numpy as np

from ...decoder import non_finite_logits
from ...sampling import Sampler, SamplingParams
from .sampling import NON_FINITE, DeviceSampler, Scalars, device_supported, scalars

KEPT_PER_CACHE = 4  # step states kept per KV cache (sampling settings in use at once: a server's few presets)


def step_inputs(backend, model) -> tuple:
    """The objects a captured step reads device memory of, beside its cache and its state's buffers: the model (weights,
    rotary tables), its decode blocks (their scratch) and the backend's q8_0 dequantization scratch (replaced when a
    larger cache is made). A kept graph serves only these very objects."""
    return (model, model.decode_blocks, *backend.kv_scratch.buffers.values())


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


class KeptStates:
    """One cache's step states by their sampling scalars, least recently used first, at most `size`, all made for
    one set of step inputs (step_inputs): the latest caller's, held here so that their memory outlives the graphs."""

    def __init__(self, size: int):
        self.size = size
        self.inputs: tuple = ()
        self.states: OrderedDict[Scalars, Any] = OrderedDict()

    def take(self, inputs: tuple, key: Scalars):
        """The state kept under key, removed (the caller's until it puts it back); None if none is."""
        self._adopt(inputs)
        return self.states.pop(key, None)

    def put(self, inputs: tuple, key: Scalars, state) -> None:
        """Keep state under key as the most recently used, releasing any it replaces and the least recently used
        beyond `size`."""
        self._adopt(inputs)
        replaced = self.states.pop(key, None)
        if replaced is not None and replaced is not state:
            replaced.release()
        self.states[key] = state
        while len(self.states) > self.size:
            self.states.popitem(last=False)[1].release()

    def _adopt(self, inputs: tuple) -> None:
        """Other step inputs than the states': release them all (their graphs read memory of the old inputs)."""
        if _same(inputs, self.inputs):
            return
        for state in self.states.values():
            state.release()
        self.states.clear()
        self.inputs = inputs


class KeptSteps:
    """The backend's kept step states: a KeptStates per KV cache, weakly keyed (they go with the cache). Thread-safe
    (a server's slots, each with its own cache, start and end their generations in threads of their own)."""

    def __init__(self, per_cache: int = KEPT_PER_CACHE):
        self.per_cache = per_cache
        self._caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def take(self, cache, inputs: tuple, key: Scalars):
        """The state kept for cache under key and inputs, now the caller's; None if none is."""
        with self._lock:
            kept = self._caches.get(cache)
            return None if kept is None else kept.take(inputs, key)

    def put(self, cache, inputs: tuple, key: Scalars, state) -> None:
        with self._lock:
            kept = self._caches.get(cache)
            if kept is None:
                kept = self._caches[cache] = KeptStates(self.per_cache)
            kept.put(inputs, key, state)


class StepState:
    """What a step reads and writes beside the model and the cache: a stream, the device sampler (its token slot,
    ring, counter, seed, workspace), the position slot and, once captured, the graph, its private pool and its
    logits (1, vocab) fp32."""

    def __init__(self, cp, params: SamplingParams, history: Sequence[int]):
        self.cp = cp
        self.stream = cp.cuda.Stream(non_blocking=True)
        with self.stream:
            self.sampler = DeviceSampler(cp, params, history)
            self.position = cp.zeros(1, dtype=cp.int32)  # the decode position slot
        self.graph = self.pool = self.logits = None
        self.warm = False  # an eager step ran (kernels compiled, lazily made buffers exist): a capture may follow

    def capture(self, run_step) -> None:
        """Capture run_step() (-> its logits) on the stream, its allocations from a private pool."""
        pool = self.cp.cuda.MemoryPool()
        with self.cp.cuda.using_allocator(pool.malloc):
            self.stream.begin_capture()
            try:
                logits = run_step()
            finally:
                graph = self.stream.end_capture()
        self.graph, self.pool, self.logits = graph, pool, logits

    def release(self) -> None:
        """Drop the graph and free its pool's memory now (the state is no longer kept)."""
        self.graph = self.logits = None
        if self.pool is not None:
            self.pool.free_all_blocks()
        self.pool = None


class GraphDecoder:
    def __init__(self, backend, model, cache, params: SamplingParams, history: Sequence[int],
                 use_graph: bool = True):
        cp = self.cp = backend.cp
        self.backend, self.model, self.cache = backend, model, cache
        self.use_graph = use_graph
        self.on_device = device_supported(params)
        self.history = list(history)  # host copy, for host sampling
        self.host_sampler = None if self.on_device else Sampler(params)
        self.key, self.inputs = scalars(params), step_inputs(backend, model)
        cp.cuda.Stream.null.synchronize()  # the prefill wrote the cache on the default stream
        self.state = backend.kept_steps.take(cache, self.inputs, self.key)
        if self.state is None:
            self.state = StepState(cp, params, self.history)
        else:
            with self.state.stream:
                self.state.sampler.reset(params, self.history)
        # what the token and position slots hold, as far as this decoder knows (nothing: its first step uploads both)
        self._device_token: int | None = None
        self._device_position: int | None = None
        self.steps = 0

    # ---------------------------------------------------------------------------------------
    def first(self, logits) -> int:
        """The first generated token, from the prefill's last logits ((vocab,) or (1, vocab))."""
        cp, state = self.cp, self.state
        with state.stream:
            device_logits = cp.array(logits, dtype=cp.float32).reshape(1, -1)
            if not self.on_device:
                return self._host_pick(cp.asnumpy(device_logits)[0])
            state.sampler.launch(device_logits, state.position, advance=False)
            return self._read_token()

    def start(self, token: int) -> int:
        """The first generated token, from feeding the prompt's last token (`token`, already in the history) at
        position cache.length: one decode step instead of a prefill of one token."""
        return self._feed(token, counted=False)

    def step(self, token: int) -> int:
        """Feed `token` at position cache.length (the cache grows by one) and return the next token."""
        return self._feed(token, counted=True)

    def _feed(self, token: int, counted: bool) -> int:
        """One step on `token`; counted: a generated token (a decode step: into the host history, the step count)."""
        self.cache.check_room(1)
        state = self.state
        with state.stream:
            if token != self._device_token:
                state.sampler.token[...] = token
            if self.cache.length != self._device_position:
                state.position[...] = self.cache.length
            logits = self._launch_step()
        self.cache.commit(1)
        self.steps += counted
        if not self.on_device:
            self._device_position = None  # the graph did not advance it
            if counted:
                self.history.append(token)
            return self._host_pick(self.cp.asnumpy(logits, stream=state.stream)[0])
        self._device_position = self.cache.length
        return self._read_token()

    def close(self) -> None:
        """The decode loop is over: the step state goes to the backend's kept steps (module docstring)."""
        if self.state is not None:
            self.backend.kept_steps.put(self.cache, self.inputs, self.key, self.state)
            self.state = None

    # ---------------------------------------------------------------------------------------
    def _launch_step(self):
        """The step on the state's stream, replayed when captured, else captured once an eager step has run, else
        eager -> its logits (1, vocab) fp32."""
        state = self.state
        if self.use_graph and state.graph is None and state.warm:
            state.capture(self._run_step)
        if self.use_graph and state.graph is not None:
            state.graph.launch(state.stream)
            return state.logits
        logits = self._run_step()
        state.warm = True
        return logits

    def _run_step(self):
        """The step's device work: compute the logits of the token slot, then sample (and advance) -> the logits."""
        state = self.state
        logits = self.model.compute(state.sampler.token, state.position, self.cache, "last")  # (1, vocab) fp32
        if self.on_device:
            state.sampler.launch(logits, state.position, advance=True)
        return logits

    def _read_token(self) -> int:
        token = int(self.state.sampler.token.get(stream=self.state.stream)[0])
        if token == NON_FINITE:
            raise non_finite_logits(self.steps, self.backend.dtype)
        self._device_token = token
        return token

    def _host_pick(self, logits: np.ndarray) -> int:
        if not np.isfinite(logits).all():
            raise non_finite_logits(self.steps, self.backend.dtype)
        token = self.host_sampler(logits, self.history)
        self._device_token = None
        return token
