"""copy_stream.CopyStream, the private stream of a session restore (restore.DeviceCopies) and save
(row_chunks.DeviceDownloads), against a recording stand-in for CuPy: what is queued where, in which order, on which
device. The copies themselves run in the `cuda` tests of tests/test_session_restore.py and
tests/test_session_save.py."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np

from engine import restore, row_chunks
from engine.copy_stream import CopyStream


class RecordingCupy:
    """The parts of CuPy the copy stream touches; every call appended to `log` with the current device and stream."""

    def __init__(self):
        self.log: list[tuple] = []
        self.device, self.stream = "gpu0", "home"
        outer = self

        class Device:
            def __init__(self, name=None):
                self.name = name or outer.device

            def __enter__(self):
                self.saved, outer.device = outer.device, self.name

            def __exit__(self, *exc):
                outer.device = self.saved

        class Stream:
            count = 0

            def __init__(self, non_blocking=False, name=None):
                Stream.count += 1
                self.name = name or f"side{Stream.count}"
                self.ptr, self.on = hash(self.name), outer.device
                outer.log.append(("stream", self.name, outer.device, non_blocking))

            def __enter__(self):
                self.saved, outer.stream = outer.stream, self

            def __exit__(self, *exc):
                outer.stream = self.saved

            def record(self):
                outer.log.append(("record", self.name))
                return f"event of {self.name}"

            def wait_event(self, event):
                outer.log.append(("wait_event", self.name, event))

            def synchronize(self):
                outer.log.append(("synchronize", self.name))

        class Event:
            count = 0

            def __init__(self, disable_timing=False):
                Event.count += 1
                self.id = Event.count  # each event its own: a record on the wrong slot's event shows

            def record(self, stream):
                outer.log.append(("event.record", self.id, stream.name))

            def synchronize(self):
                outer.log.append(("event.synchronize", self.id))

        home = Stream(name="home")
        self.log.clear()
        runtime = SimpleNamespace(memcpyHostToDevice=1, memcpyDeviceToHost=2,
                                  memcpyAsync=lambda dst, src, n, kind, stream: self.log.append(
                                      ("memcpyAsync", dst, src, n, kind, stream)))
        self.cuda = SimpleNamespace(Device=Device, Stream=Stream, Event=Event, runtime=runtime,
                                    get_current_stream=lambda: home if outer.stream == "home" else outer.stream,
                                    alloc_pinned_memory=lambda n: bytearray(n))
        self.uint8 = np.uint8

    def empty(self, n, dtype):
        stream = self.stream if isinstance(self.stream, str) else self.stream.name
        self.log.append(("empty", n, self.device, stream))
        return np.empty(n, dtype)


def test_the_stream_waits_for_the_engines_work_and_copies_on_itself():
    cp = RecordingCupy()
    copies = CopyStream(cp, slots=2, device=cp.cuda.Device("gpu1"))
    assert cp.log[:3] == [("stream", copies.stream.name, "gpu1", True), ("record", "home"),
                          ("wait_event", copies.stream.name, "event of home")]
    assert copies.home.name == "home" and len(copies.events) == 2
    cp.log.clear()
    copies.copy(10, 20, 30, cp.cuda.runtime.memcpyDeviceToHost)
    copies.done(1)
    copies.wait(1)
    copies.finish()
    buffer = copies.device_buffer(64)
    assert buffer.nbytes == 64
    assert cp.log == [("memcpyAsync", 10, 20, 30, 2, copies.stream.ptr),
                      ("event.record", copies.events[1].id, copies.stream.name),
                      ("event.synchronize", copies.events[1].id), ("synchronize", copies.stream.name),
                      ("empty", 64, "gpu1", "home")]  # from the engine stream's pool, on the stream's device
    assert cp.device == "gpu0"  # every device switch undone


def test_restore_and_save_queue_their_copies_on_the_private_stream():
    cp = RecordingCupy()
    uploads = restore.DeviceCopies(cp, "f16", slots=3)
    ring = uploads.ring(1000)
    assert [b.nbytes for b in ring] == [1000] * 3
    dst = SimpleNamespace(data=SimpleNamespace(ptr=7))
    cp.log.clear()
    uploads.upload(dst, ring[0])
    uploads.staging(100)
    assert cp.log == [("memcpyAsync", 7, ring[0].ctypes.data, 1000, 1, uploads.stream.ptr),
                      ("empty", 1000, "gpu0", "home")]  # one staging buffer of a ring buffer's size

    downloads = row_chunks.DeviceDownloads(cp, cp.cuda.Device("gpu1"))
    rows = SimpleNamespace(flags=SimpleNamespace(c_contiguous=True), nbytes=48, data=SimpleNamespace(ptr=9),
                           shape=(3, 16))
    cp.log.clear()
    downloads.download(1, rows)
    host = downloads.host[1]
    assert host.nbytes == row_chunks.CHUNK_BYTES
    assert cp.log == [("memcpyAsync", host.ctypes.data, 9, 48, 2, downloads.stream.ptr),
                      ("event.record", downloads.events[1].id, downloads.stream.name)]
    cp.log.clear()
    assert downloads.staging(0, 10).nbytes == 10
    assert cp.log == [("empty", row_chunks.CHUNK_BYTES, "gpu1", "home")]
