"""Copies between pinned host buffers and one GPU on a stream of their own, for a session file's restore
(restore.DeviceCopies) and save (row_chunks.DeviceDownloads): the stream first waits for the work already queued on
the current stream (the engine's, which may still be writing the cache), and one event per slot of the host buffers
marks when the copies queued from or into that slot have run."""
from __future__ import annotations

from typing import Any


class CopyStream:
    def __init__(self, cp: Any, slots: int, device: Any = None):
        self.xp = cp
        self.device = cp.cuda.Device() if device is None else device  # default: the current GPU
        with self.device:
            self.home = cp.cuda.get_current_stream()  # the engine's: the cache's writers
            self.stream = cp.cuda.Stream(non_blocking=True)
            self.stream.wait_event(self.home.record())
            self.events = [cp.cuda.Event(disable_timing=True) for _ in range(slots)]

    def device_buffer(self, nbytes: int) -> Any:
        """An (nbytes,) uint8 device buffer from the engine stream's pool: freed once finish() has run, it is that
        stream's to reuse."""
        with self.device, self.home:
            return self.xp.empty(nbytes, dtype=self.xp.uint8)

    def copy(self, dst_ptr: int, src_ptr: int, nbytes: int, kind: int) -> None:
        """nbytes from src_ptr to dst_ptr (kind: runtime.memcpyHostToDevice or memcpyDeviceToHost), queued."""
        self.xp.cuda.runtime.memcpyAsync(dst_ptr, src_ptr, nbytes, kind, self.stream.ptr)

    def done(self, slot: int) -> None:
        """Every copy of that slot is queued."""
        self.events[slot].record(self.stream)

    def wait(self, slot: int) -> None:
        """Block until the copies queued before the slot's last done() have run."""
        self.events[slot].synchronize()

    def finish(self) -> None:
        """Block until everything queued has run."""
        self.stream.synchronize()
