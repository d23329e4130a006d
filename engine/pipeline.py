"""A model split by layer at run time: each stage's backend, its layers, and its part of the KV cache.

``Llama.compute`` walks the layers once, stage by stage (engine/models/llama.py); where a stage begins, the
residual stream x (n, d) and the positions (n,) are handed to its backend (``backend.receive``: a
device-to-device copy on CUDA, a copy on the CPU) and its ops run under ``backend.activate()`` (the
stage's GPU current on CUDA). An unsplit model is one stage of every layer.

On the CPU the stages are separate numpy backends over one host: a simulation of a multi-GPU run that
exercises the same partition, handovers and cache parts (what CI tests). Which layers go where, and what
each device holds: engine/split.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np

from . import row_chunks
from .decoder import HostDecoder
from .errors import ContextError
from .kvcache import KVCache


@dataclass
class Stage:
    backend: Any
    layers: range  # the model's layers it runs, contiguous
    blocks: Any = field(default=None, repr=False)  # its one-token blocks (backend.decode_blocks), set by Llama
    prompt_blocks: Any = field(default=None, repr=False)  # its blocks for prompts (backend.prefill_blocks)

    def activate(self):
        """Context in which this stage's ops run (its GPU current on CUDA)."""
        return self.backend.activate()


def synchronize(stages: Sequence[Stage]) -> None:
    """Wait for the work queued on every stage's device (a model turn, a timed run)."""
    for stage in stages:
        stage.backend.synchronize()


def new_cache(stages: Sequence[Stage], n_kv_heads: int, head_dim: int, capacity: int,
              types: tuple[str, str] | None = None) -> "KVCache | StagedCache":
    """An empty KV cache of `capacity` tokens for a model run as `stages`: each stage's backend makes the part
    of its layers (one stage: that cache itself). types: the K and V cache types (None: the backend's own)."""
    extra = () if types is None else (types,)
    parts = [stage.backend.new_cache(len(stage.layers), capacity, n_kv_heads, head_dim, *extra) for stage in stages]
    return parts[0] if len(parts) == 1 else StagedCache(parts, stages)


class HostDecoders:
    """The decode loops of a split model: one eager forward per token through the stages (no CUDA graph spans
    several GPUs), the logits sampled on the host (decoder.HostDecoder)."""

    def __init__(self, head_backend: Any):
        self.head_backend = head_backend  # the last stage's: where the logits are

    def decoder(self, model, cache, sampling, history) -> HostDecoder:
        return HostDecoder(self.head_backend, model, cache, sampling, history)


class StagedCache:
    """The KV cache of a split model: one KVCache per stage holding that stage's layers (numbered from 0 in
    it), with one sequence length. Same interface as KVCache for the model, sessions and session files;
    ``layer(index)`` -> (the part holding model layer `index`, its index there)."""

    def __init__(self, parts: Sequence[KVCache], stages: Sequence[Stage]):
        self.parts = list(parts)
        self._where = [(part, local) for part, stage in zip(self.parts, stages) for local in range(len(stage.layers))]
        self.capacity = self.parts[0].capacity
        self.types = self.parts[0].types
        self.owner: object | None = None

    def layer(self, index: int) -> tuple[KVCache, int]:
        return self._where[index]

    @property
    def length(self) -> int:
        return self.parts[0].length

    @property
    def free(self) -> int:
        return self.parts[0].free

    def check_room(self, n_new: int) -> None:
        self.parts[0].check_room(n_new)

    def commit(self, n: int) -> None:
        for part in self.parts:
            part.commit(n)

    def reset(self) -> None:
        for part in self.parts:
            part.reset()
        self.owner = None

    def truncate(self, length: int) -> None:
        for part in self.parts:
            part.truncate(length)

    def host_row_chunks(self, name: str, chunk_bytes: int = row_chunks.CHUNK_BYTES) -> Iterator[np.ndarray]:
        """As KVCache.host_row_chunks: every layer's chunks, the parts' layers one after another."""
        for part in self.parts:
            yield from part.host_row_chunks(name, chunk_bytes)

    def host_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """As KVCache.host_rows: every layer's rows, the parts' layers one after another."""
        return tuple(row_chunks.gather(self.host_row_chunks(name), shape, dtype)
                     for name, (shape, dtype) in zip("kv", self.stored_layout(self.length)))

    def stored_layout(self, n: int) -> list[tuple[tuple[int, ...], np.dtype]]:
        layouts = [part.stored_layout(n) for part in self.parts]
        n_layers = sum(layout[0][0][0] for layout in layouts)
        return [((n_layers,) + shape[1:], dtype) for shape, dtype in layouts[0]]

    def load_rows(self, k: np.ndarray, v: np.ndarray) -> None:
        """As KVCache.load_rows: host rows of every layer, split among the parts."""
        if [(k.shape, k.dtype), (v.shape, v.dtype)] != self.stored_layout(k.shape[1] if k.ndim > 1 else -1):
            raise ContextError(f"KV rows {k.shape} {k.dtype} / {v.shape} {v.dtype} do not fit this split cache")
        first = 0
        for part in self.parts:
            n_layers = part.stored_layout(0)[0][0][0]
            part.load_rows(k[first:first + n_layers], v[first:first + n_layers])
            first += n_layers
