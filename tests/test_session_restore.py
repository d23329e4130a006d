"""Restoring a session file's rows into a GPU cache through pinned buffers (engine/restore.py).

CPU tests: the plan (which file bytes go to which layer's rows), and the threaded copy into a cache laid out as the
CUDA backend lays it out (16-bit rows; q8_0 values and scales apart, kv_q8.DeviceQ8Rows) with numpy arrays for the
device's and a stand-in for DeviceCopies that runs a copy only when the pipeline waits for it (as a stream may run
it late): bit for bit for bf16 / f16 / q8_0 caches, n not a multiple of the chunk, chunks smaller than a row,
smaller and larger than a layer, a part's layers of a split model; a truncated file is one SessionFileError and
leaves no reader thread behind. GPU test (marker `cuda`): the pinned path against KVCache.load_rows on a tiny model.
"""
from __future__ import annotations

import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import save_file

from engine import prompt_cache, restore
from engine.backends.cuda import kv_q8
from engine.kvcache import KVCache
from engine.prompt_cache import SessionFileError
from engine.restore import Chunk, copy_file, plan

N_LAYERS, N_KV, HEAD_DIM, CAPACITY = 3, 2, 64, 96
# (K, V) cache types -> the activation dtype of a CUDA cache holding them
PAIRS = {("bf16", "bf16"): "bf16", ("f16", "f16"): "f16", ("q8_0", "q8_0"): "f16", ("q8_0", "bf16"): "bf16"}


class LazyCopies:
    """DeviceCopies on numpy: a copy into the cache is queued and runs only at wait(its slot) or finish(), so rows
    restore wrong if a ring slot is refilled before its copies ran; a copy into the staging buffer runs at once (the
    q8_0 split reads it next, in stream order)."""

    def __init__(self, slots: int):
        self.slots = slots
        self.queued: list = []  # copies since the last done()
        self.by_slot: dict[int, list] = {}
        self._staging = np.empty(0, np.uint8)

    def ring(self, nbytes: int) -> list[np.ndarray]:
        return [np.full(nbytes, 0xEE, np.uint8) for _ in range(self.slots)]

    def upload(self, dst: np.ndarray, host: np.ndarray) -> None:
        if dst.base is self._staging:
            dst[...] = host
        else:
            self.queued.append((dst, host))

    def staging(self, nbytes: int) -> np.ndarray:
        if self._staging.nbytes < nbytes:
            self._staging = np.empty(nbytes, np.uint8)
        return self._staging[:nbytes]

    def split_q8(self, raw: np.ndarray, rows) -> None:
        """The device's split_kv_q8_blocks as numpy does it (kv_q8.split_blocks), at once as the staging copy."""
        q, d = kv_q8.split_blocks(raw.reshape(rows.d.shape[:-1] + (-1,)), rows.q.shape[-1])
        rows.q[...], rows.d[...] = q, d

    def done(self, slot: int) -> None:
        self.by_slot.setdefault(slot, []).extend(self.queued)
        self.queued = []

    def wait(self, slot: int) -> None:
        for dst, host in self.by_slot.pop(slot, []):
            dst[...] = host

    def finish(self) -> None:
        for slot in list(self.by_slot):
            self.wait(slot)


def random_rows(types: tuple[str, str], n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The file's k and v as a CUDA cache of `types` stores them: any 16-bit patterns, any q8_0 block bytes."""
    rows = {}
    for name, cache_type in zip("kv", types):
        if cache_type == "q8_0":
            rows[name] = rng.integers(0, 256, (N_LAYERS, n, N_KV, HEAD_DIM // 32 * 34), dtype=np.uint8)
        else:
            bits = rng.integers(0, 2**16, (N_LAYERS, n, N_KV, HEAD_DIM), dtype=np.uint16)
            rows[name] = bits if cache_type == "bf16" else bits.view(np.float16)
    return rows


def write_session(path: Path, rows: dict[str, np.ndarray]) -> dict[str, prompt_cache.TensorBytes]:
    n = rows["k"].shape[1]
    save_file({"tokens": np.arange(n, dtype=np.int32), **rows}, str(path))
    return dict(zip("kv", prompt_cache.tensor_bytes(path, ("k", "v"))))


def host_cache(types: tuple[str, str], n_layers: int = N_LAYERS) -> KVCache:
    """A cache laid out as the CUDA backend's (kv_q8.storage) over numpy arrays, its rows filled with 0x5A bytes."""
    cache = KVCache(n_layers, CAPACITY, N_KV, HEAD_DIM, xp=np, types=types,
                    storage=kv_q8.storage(np, PAIRS[types]))
    for store in (cache.k, cache.v):
        for array in (store.q, store.d) if kv_q8.is_q8(store) else (store,):
            array.view(np.uint8)[...] = 0x5A
    return cache


def stored(store, n: int) -> np.ndarray:
    """The first n rows of every layer as the file holds them (q8_0: ggml blocks), as raw bytes."""
    if kv_q8.is_q8(store):
        return kv_q8.join_blocks(store.q[:, :n], store.d[:, :n])
    return np.ascontiguousarray(store[:, :n]).view(np.uint8)


# ---------------------------------------------------------------------------------------------------------- plan
@pytest.mark.parametrize("n, chunk_rows", [(37, 0.5), (37, 1), (37, 5), (37, 36), (37, 37), (37, 80), (1, 2),
                                           (37, 10_000)])
def test_plan_reads_every_row_once_into_its_layer(n, chunk_rows):
    row = N_KV * HEAD_DIM * 2
    tensors = {"k": prompt_cache.TensorBytes(1000, (N_LAYERS, n, N_KV, HEAD_DIM), np.dtype(np.uint16)),
               "v": prompt_cache.TensorBytes(1000 + N_LAYERS * n * row, (N_LAYERS, n, N_KV, HEAD_DIM),
                                             np.dtype(np.uint16))}
    layers = range(1, 3)  # a split model's second part
    chunks = list(plan(tensors, layers, int(chunk_rows * row)))
    seen = []
    for chunk in chunks:
        assert chunk.nbytes == sum(p.nbytes for p in chunk.pieces) <= max(1, int(chunk_rows)) * row
        assert [p.start for p in chunk.pieces] == list(np.cumsum([0] + [p.nbytes for p in chunk.pieces])[:-1])
        for p in chunk.pieces:
            assert p.nbytes == p.rows * row and 0 <= p.first and p.first + p.rows <= n and p.layer in (0, 1)
            file_row = (layers.start + p.layer) * n + p.first  # where the piece's rows are in the tensor
            assert chunk.offset + p.start == tensors[p.name].offset + file_row * row
            seen += [(p.name, p.layer, r) for r in range(p.first, p.first + p.rows)]
    assert sorted(seen) == [(name, layer, r) for name in "kv" for layer in (0, 1) for r in range(n)]
    ends = [c.offset + c.nbytes for c in chunks]
    assert all(a <= b.offset for a, b in zip(ends, chunks[1:]))  # file order


def test_plan_of_an_empty_session_reads_nothing():
    empty = prompt_cache.TensorBytes(64, (N_LAYERS, 0, N_KV, HEAD_DIM), np.dtype(np.uint16))
    assert list(plan({"k": empty, "v": empty}, range(N_LAYERS), 4096)) == []


# ---------------------------------------------------------------------------------------------------------- copy
@pytest.mark.parametrize("types", list(PAIRS), ids=lambda t: "-".join(t))
@pytest.mark.parametrize("n, chunk_rows", [(37, 1), (37, 5), (37, 50), (37, 1000), (CAPACITY, 7), (1, 3)])
def test_restored_rows_equal_the_files_bit_for_bit(tmp_path, types, n, chunk_rows):
    rows = random_rows(types, n, np.random.default_rng(n * chunk_rows))
    tensors = write_session(tmp_path / "s.session", rows)
    cache = host_cache(types)
    chunks = list(plan(tensors, range(N_LAYERS), chunk_rows * min(t.row_bytes for t in tensors.values())))
    copy_file(tmp_path / "s.session", chunks, cache, LazyCopies(slots=3), readers=2)
    for name in "kv":
        store = getattr(cache, name)
        assert np.array_equal(stored(store, n), rows[name].view(np.uint8).reshape(stored(store, n).shape))
        assert (stored(store, CAPACITY)[:, n:] == 0x5A).all()  # rows past n untouched


@pytest.mark.parametrize("types", [("bf16", "bf16"), ("q8_0", "q8_0")], ids=lambda t: "-".join(t))
def test_a_part_of_a_split_cache_gets_its_layers(tmp_path, types):
    rows = random_rows(types, 29, np.random.default_rng(5))
    tensors = write_session(tmp_path / "s.session", rows)
    part = host_cache(types, n_layers=2)
    copy_file(tmp_path / "s.session", list(plan(tensors, range(1, 3), 4096)), part, LazyCopies(slots=2), readers=3)
    for name in "kv":
        assert np.array_equal(stored(getattr(part, name), 29).reshape(-1), rows[name][1:3].view(np.uint8).reshape(-1))


def reader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("session-read")]


@pytest.mark.parametrize("cut", [0.1, 0.5, 0.9, 0.999])
def test_a_truncated_file_is_one_session_file_error(tmp_path, cut):
    path = tmp_path / "s.session"
    tensors = write_session(path, random_rows(("bf16", "bf16"), 50, np.random.default_rng(1)))
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * cut)])
    chunks = list(plan(tensors, range(N_LAYERS), 4096))
    with pytest.raises(SessionFileError, match=r"s\.session: not a readable session file \(truncated: it ends at "):
        copy_file(path, chunks, host_cache(("bf16", "bf16")), LazyCopies(slots=4), readers=3)
    assert reader_threads() == []


def test_a_missing_file_is_one_session_file_error(tmp_path):
    chunk = Chunk(0, 16, ())
    with pytest.raises(SessionFileError, match="cannot read the session file"):
        copy_file(tmp_path / "gone.session", [chunk], host_cache(("bf16", "bf16")), LazyCopies(slots=1))


def test_the_pipeline_waits_for_a_slot_before_refilling_it(tmp_path, monkeypatch):
    """The stand-in is strict enough to catch a ring slot refilled before its copies ran."""
    rows = random_rows(("bf16", "bf16"), 40, np.random.default_rng(2))
    tensors = write_session(tmp_path / "s.session", rows)
    copies = LazyCopies(slots=2)
    monkeypatch.setattr(copies, "wait", lambda slot: None)
    cache = host_cache(("bf16", "bf16"))
    copy_file(tmp_path / "s.session", list(plan(tensors, range(N_LAYERS), 4096)), cache, copies, readers=1)
    assert not np.array_equal(stored(cache.k, 40).reshape(-1), rows["k"].view(np.uint8).reshape(-1))


def test_a_slot_is_refilled_only_chunks_after_its_copies_were_queued(tmp_path):
    """The main thread never waits on the copies it has just queued: a slot's wait comes UPLOADS_IN_FLIGHT puts
    after that slot's copies were queued (its copies overlap the next chunks' reads and puts); rows still exact."""
    events: list[tuple[str, int]] = []

    class Recording(LazyCopies):
        def done(self, slot: int) -> None:
            super().done(slot)
            events.append(("done", slot))

        def wait(self, slot: int) -> None:
            super().wait(slot)
            events.append(("wait", slot))

        def finish(self) -> None:  # the end of the restore waits for every slot: not a refill
            events.append(("finish", -1))
            super().finish()

    rows = random_rows(("bf16", "bf16"), 40, np.random.default_rng(3))
    tensors = write_session(tmp_path / "s.session", rows)
    cache = host_cache(("bf16", "bf16"))
    chunks = list(plan(tensors, range(N_LAYERS), 1024))
    copy_file(tmp_path / "s.session", chunks, cache, Recording(slots=restore.SLOTS))
    assert np.array_equal(stored(cache.k, 40).reshape(-1), rows["k"].view(np.uint8).reshape(-1))
    assert np.array_equal(stored(cache.v, 40).reshape(-1), rows["v"].view(np.uint8).reshape(-1))
    puts, queued_at, gaps = 0, {}, []
    for kind, slot in events[:events.index(("finish", -1))]:
        if kind == "done":
            puts += 1
            queued_at[slot] = puts
        elif slot in queued_at:
            gaps.append(puts - queued_at.pop(slot))
    assert len(chunks) > restore.SLOTS and gaps and min(gaps) >= restore.UPLOADS_IN_FLIGHT


def test_ring_buffers_are_one_size_whatever_the_rows():
    """DeviceCopies.ring pins max(nbytes, CHUNK_BYTES) a slot (so CuPy's pinned pool, which reuses a buffer for a
    request of its size, gives every restore the same buffers back, pin_ring_in_background's too) and views nbytes."""
    pinned_sizes = []

    def alloc_pinned_memory(nbytes):
        pinned_sizes.append(nbytes)
        return bytearray(nbytes)

    stub = SimpleNamespace(xp=SimpleNamespace(cuda=SimpleNamespace(alloc_pinned_memory=alloc_pinned_memory)),
                           events=[None] * 3, buffer_bytes=0)
    for nbytes in (1000, restore.CHUNK_BYTES - 34, restore.CHUNK_BYTES + 4096):
        pinned_sizes.clear()
        ring = restore.DeviceCopies.ring(stub, nbytes)
        assert [b.nbytes for b in ring] == [nbytes] * 3 and stub.buffer_bytes == nbytes
        assert pinned_sizes == [max(nbytes, restore.CHUNK_BYTES)] * 3


def test_nothing_is_pinned_without_cupy(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy raises ImportError
    assert restore.pin_ring_in_background() is None


# ---------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.cuda
def test_a_ring_pinned_in_the_background_is_the_restores():
    """pin_ring_in_background leaves SLOTS buffers of CHUNK_BYTES in CuPy's pinned pool; a restore's ring takes them
    from there (no new pinning) whatever its rows' size."""
    import cupy as cp

    pool = cp.get_default_pinned_memory_pool()
    thread = restore.pin_ring_in_background()
    thread.join()
    free = pool.n_free_blocks()
    assert free >= restore.SLOTS
    copies = restore.DeviceCopies(cp, "f16")
    ring = copies.ring(restore.CHUNK_BYTES - 1234)
    assert pool.n_free_blocks() == free - restore.SLOTS and len(ring) == restore.SLOTS


@pytest.mark.cuda
@pytest.mark.parametrize("types", [("f16", "f16"), ("bf16", "bf16"), ("q8_0", "q8_0"), ("bf16", "q8_0")],
                         ids=lambda t: "-".join(t))
def test_pinned_restore_equals_the_mapped_copy_on_cuda(tmp_path, types):
    """A tiny random model's CUDA cache saved, then restored through pinned buffers (session.load, and copy_file
    with chunks of 3 rows and of 1.5 layers) holds the bytes KVCache.load_rows copies from the memory-mapped file."""
    import cupy as cp

    import engine
    from engine import pipeline
    from engine.sampling import SamplingParams

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from make_tiny_model import TinySpec, make_tiny_model

    model = make_tiny_model(tmp_path, TinySpec(d_model=128, n_heads=4, n_kv_heads=2, ffn_dim=128, seed=3),
                            gguf_types=("f32",), hf=False)["f32"]
    dtype = "bf16" if "bf16" in types else "f16"
    llm = engine.load(model, device="cuda", dtype=dtype, context=256, cache_type_k=types[0], cache_type_v=types[1])
    session = llm.session()
    prompt = np.random.default_rng(4).integers(3, 384, 150).tolist()
    list(session.generate_ids(prompt, 4, SamplingParams(temperature=0.0), stop_ids=[]))
    path = tmp_path / "s.session"
    session.save(path)
    k, v = prompt_cache.tensor_bytes(path, ("k", "v"))
    n = k.shape[1]
    c = llm.config

    def fresh():
        return pipeline.new_cache(llm.stages, c.n_kv_heads, c.head_dim, 256, llm.cache_types)

    mapped = fresh()
    mapped.load_rows(*(np.memmap(path, dtype=t.dtype, mode="r", offset=t.offset, shape=t.shape) for t in (k, v)))
    restored = llm.session()
    restored.load(path)  # the pinned path: restore.device_restore
    assert restored.tokens == session.tokens and restored.cache.length == n
    candidates = [restored.cache]
    for chunk_bytes in (3 * k.row_bytes, int(1.5 * n * k.row_bytes)):
        cache = fresh()
        copies = restore.DeviceCopies(cp, dtype)
        with copies.stream:
            copy_file(path, list(plan({"k": k, "v": v}, range(c.n_layers), chunk_bytes)), cache, copies)
        candidates.append(cache)
    for cache in candidates:
        for name in "kv":
            want, got = getattr(mapped, name), getattr(cache, name)
            arrays = ((want.q, got.q), (want.d, got.d)) if kv_q8.is_q8(want) else ((want, got),)
            for a, b in arrays:
                assert cp.array_equal(a[:, :n].view(cp.uint8), b[:, :n].view(cp.uint8))
