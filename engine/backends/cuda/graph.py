"""The decode loop as one CUDA graph per step: Llama.compute for one token, then device sampling.

    decoder = backend.decoder(model, cache, sampling_params, history)   # after the prompt's prefill
    token = decoder.first(last_logits)      # sample from the prefill's last logits (numpy or device)
    token = decoder.start(last_prompt_id)   # or: feed the prompt's last token (cache.length = len(history) - 1)
    while ...:
        token = decoder.step(token)         # feed token at cache.length, commit it, return the next id

The step is ``Llama.compute`` for one token, which runs the backend's fused decode blocks (fused.py:
6 launches per layer). The graph reads the token and its position from two device slots and, at its
end, the sampling kernel writes the next token into the token slot and advances the position: a
replay needs no upload, and only the 4-byte token id comes back. The first step runs eagerly (compiles kernels,
warms the memory pool); the second captures the graph; later steps replay it. Captured work draws
its memory from a private pool that lives with the graph, so no other allocation can reuse the
addresses the graph writes. Stream: a private non-blocking stream, synchronized with the default
stream when the decoder starts (the prefill ran there) and at every step (the token comes back).
When the sampling settings cannot run on the device (sampling.device_supported), the graph stops
at the logits and the host Sampler picks the token. Where a Self-Extend or StreamingLLM attention runs its composed
path (the attention temperature; extension.graph_ready) every step runs eagerly (``use_graph`` False,
CudaBackend.decoder): that path picks its key tiles on the host from the position.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ...decoder import non_finite_logits
from ...errors import DeviceError
from ...sampling import Sampler, SamplingParams
from .sampling import NON_FINITE, DeviceSampler, device_supported


class GraphDecoder:
    def __init__(self, backend, model, cache, params: SamplingParams, history: Sequence[int],
                 use_graph: bool = True):
        cp = self.cp = backend.cp
        self.backend, self.model, self.cache = backend, model, cache
        self.params = params
        self.use_graph = use_graph
        self.on_device = device_supported(params)
        self.history = list(history)  # host copy, for host sampling
        self.host_sampler = None if self.on_device else Sampler(params)
        self.stream = cp.cuda.Stream(non_blocking=True)
        cp.cuda.Stream.null.synchronize()  # the prefill wrote the cache on the default stream
        with self.stream:
            self.sampler = DeviceSampler(cp, params, self.history)
            self.position = cp.zeros(1, dtype=cp.int32)
        self._device_token: int | None = None  # what the token slot holds, as far as the host knows
        self._device_position: int | None = None
        self._graph = None
        self._graph_pool = None
        self._logits = None  # the graph's output (1, vocab) fp32
        self.steps = 0

    # ---------------------------------------------------------------------------------------
    def first(self, logits) -> int:
        """The first generated token, from the prefill's last logits ((vocab,) or (1, vocab))."""
        cp = self.cp
        with self.stream:
            device_logits = cp.array(logits, dtype=cp.float32).reshape(1, -1)
            if not self.on_device:
                return self._host_pick(cp.asnumpy(device_logits)[0])
            self.sampler.launch(device_logits, self.position, advance=False)
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
        with self.stream:
            if token != self._device_token:
                self.sampler.token[...] = token
            if self.cache.length != self._device_position:
                self.position[...] = self.cache.length
            if self._graph is None and self.use_graph and self.steps >= 1:
                self._capture()
            if self._graph is not None:
                self._graph.launch(self.stream)
            else:
                self._run_step()
        self.cache.commit(1)
        self.steps += counted
        if not self.on_device:
            self._device_position = None  # the graph did not advance it
            if counted:
                self.history.append(token)
            return self._host_pick(self._logits_host())
        self._device_position = self.cache.length
        return self._read_token()

    def close(self) -> None:
        """The decode loop is over: nothing to release (the graph and its pool go with this object)."""

    # ---------------------------------------------------------------------------------------
    def _run_step(self) -> None:
        """The step's device work: compute the logits of the token slot, then sample (and advance)."""
        logits = self.model.compute(self.sampler.token, self.position, self.cache, "last")  # (1, vocab) fp32
        self._logits = logits
        if self.on_device:
            self.sampler.launch(logits, self.position, advance=True)

    def _capture(self) -> None:
        cp = self.cp
        pool = cp.cuda.MemoryPool()
        with cp.cuda.using_allocator(pool.malloc):
            self.stream.begin_capture()
            try:
                self._run_step()
            finally:
                graph = self.stream.end_capture()
        self._graph, self._graph_pool = graph, pool

    def _read_token(self) -> int:
        token = int(self.sampler.token.get(stream=self.stream)[0])
        if token == NON_FINITE:
            raise non_finite_logits(self.steps, self.backend.dtype)
        self._device_token = token
        return token

    def _logits_host(self) -> np.ndarray:
        if self._logits is None:
            raise DeviceError("decoder: no logits computed yet")
        return self.cp.asnumpy(self._logits, stream=self.stream)[0]

    def _host_pick(self, logits: np.ndarray) -> int:
        if not np.isfinite(logits).all():
            raise non_finite_logits(self.steps, self.backend.dtype)
        token = self.host_sampler(logits, self.history)
        self._device_token = None
        return token
