"""Model turns: the slots' generations run in threads of their own, but the model runs one step at a time, in the
order the steps were asked for (a FIFO ticket lock), so the streams of busy slots advance round-robin.

    turns = ModelTurns(device_sync)
    with turns.turn():            # one decode step (or the start of a generation, up to its first prefill batch)
        token = next(tokens)
    turns.pass_turn()             # from inside a turn (after each prefill batch): let the waiting ones go first

Why one at a time: the backends are not re-entrant. The numpy backend decodes stored weights into one shared
scratch buffer; on CUDA, prefill scratch and rotary tables are shared, a decode step's CUDA graph is captured
while no other thread may touch the device, and kernels of a prefill run asynchronously on the default stream.
Each generation has its own GraphDecoder (its graph captured against its own slot's cache, its own private
memory pool and stream), so turns are all it takes to keep the slots apart; ``device_sync`` (CUDA: wait for the
device) runs at the end of every turn, so no work of one turn overlaps the next.
"""
from __future__ import annotations

import threading
from collections import deque
from contextlib import contextmanager
from typing import Callable, Iterator


class ModelTurns:
    def __init__(self, device_sync: Callable[[], None] = lambda: None):
        self.device_sync = device_sync
        self._changed = threading.Condition()
        self._queue: deque[object] = deque()  # tickets of the threads waiting for a turn, in order of asking
        self._held = False

    @contextmanager
    def turn(self) -> Iterator[None]:
        self._acquire()
        try:
            yield
        finally:
            self._release()

    def pass_turn(self) -> None:
        """Give the turn to those waiting for one (if any) and wait for it again, behind them."""
        with self._changed:
            if not self._queue:
                return
        self._release()
        self._acquire()

    @property
    def waiting(self) -> int:
        with self._changed:
            return len(self._queue)

    def _acquire(self) -> None:
        ticket = object()
        with self._changed:
            self._queue.append(ticket)
            while self._held or self._queue[0] is not ticket:
                self._changed.wait()
            self._queue.popleft()
            self._held = True

    def _release(self) -> None:
        try:
            self.device_sync()
        finally:
            with self._changed:
                self._held = False
                self._changed.notify_all()
