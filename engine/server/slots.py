"""Slots: `engine serve --parallel N` keeps N sessions, each with its own KV cache and token history; a request
runs on one slot, and requests beyond the slots wait in a FIFO queue (none lost, none sharing a slot).

    pool = SlotPool([llm.session(slot=i) for i in range(n)])
    async with pool.take(prompt_ids) as slot:     # waits (FIFO) while every slot is busy
        ... slot.session.generate_ids(prompt_ids, ...)
    pool.processing, pool.idle, pool.waiting       # gauges for /health and /metrics

Which free slot (llama.cpp's slot selection): the one whose history shares the longest prefix with the prompt,
when that prefix is more than SIMILARITY of the prompt (another question about the same document, the next turn
of a chat: only the rest is prefilled); otherwise the least recently used one, so the other slots keep their
sequences for whoever continues them. Everything here runs on the event loop's thread (no locks).
"""
from __future__ import annotations

import asyncio
import itertools
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Sequence

from ..session import common_prefix_length

SIMILARITY = 0.5  # a free slot is chosen for its cached prefix when that covers more than this share of the prompt


@dataclass(eq=False)
class Slot:
    id: int
    session: Any  # engine.session.Session on this slot's own cache
    busy: bool = False
    last_used: int = 0  # the pool's clock when it was last released (0: never used)


class SlotPool:
    def __init__(self, sessions: Sequence[Any]):
        self.slots = [Slot(i, session) for i, session in enumerate(sessions)]
        self._waiting: deque[tuple[list[int], asyncio.Future]] = deque()  # (prompt ids, its slot to come), FIFO
        self._clock = itertools.count(1)

    @property
    def processing(self) -> int:
        return sum(slot.busy for slot in self.slots)

    @property
    def idle(self) -> int:
        return len(self.slots) - self.processing

    @property
    def waiting(self) -> int:
        return sum(not future.done() for _, future in self._waiting)

    def choose(self, prompt_ids: Sequence[int]) -> Slot:
        """The free slot for a prompt: the longest cached prefix over SIMILARITY of it, else the least recently
        used (ties: the lowest id)."""
        free = [slot for slot in self.slots if not slot.busy]
        shared = {slot.id: common_prefix_length(slot.session.tokens, prompt_ids) for slot in free}
        similar = [slot for slot in free if shared[slot.id] > SIMILARITY * len(prompt_ids)]
        if similar:
            return max(similar, key=lambda slot: (shared[slot.id], -slot.last_used, -slot.id))
        return min(free, key=lambda slot: (slot.last_used, slot.id))

    @asynccontextmanager
    async def take(self, prompt_ids: Sequence[int]) -> AsyncIterator[Slot]:
        """A slot for the prompt, held for the block; waits behind earlier requests while none is free."""
        slot = await self._acquire(list(prompt_ids))
        try:
            yield slot
        finally:
            self._release(slot)

    async def _acquire(self, prompt_ids: list[int]) -> Slot:
        if not self._waiting and self.idle:
            return self._assign(self.choose(prompt_ids))
        entry = (prompt_ids, asyncio.get_running_loop().create_future())
        self._waiting.append(entry)
        try:
            return await entry[1]
        except asyncio.CancelledError:  # the client went away while waiting
            future = entry[1]
            if future.done() and not future.cancelled():  # a slot was handed over just before: pass it on
                self._release(future.result())
            elif entry in self._waiting:
                self._waiting.remove(entry)
            raise

    def _assign(self, slot: Slot) -> Slot:
        slot.busy = True
        return slot

    def _release(self, slot: Slot) -> None:
        slot.busy = False
        slot.last_used = next(self._clock)
        while self._waiting:
            prompt_ids, future = self._waiting.popleft()
            if not future.done():  # a cancelled waiter is skipped
                future.set_result(self._assign(self.choose(prompt_ids)))
                return
