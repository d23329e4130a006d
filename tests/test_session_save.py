"""Writing session files as a stream (engine/prompt_cache.save_session): the safetensors writer
(engine/safetensors_writer.py) against safetensors.numpy.save_file byte for byte; the cache's row chunks
(engine/row_chunks.py, KVCache/StagedCache.host_row_chunks) for every storage kind, the GPU path run on the CPU with
numpy standing in for CuPy and a stand-in for DeviceDownloads that runs a copy only when it is waited for; the q8_0
blocks joined "on the device" (kv_q8.join_blocks_on_device on numpy) against kv_q8.join_blocks; files of tiny CPU
models equal to the old path's (host_rows + save_file) and loading back. GPU tests (marker `cuda`): a CUDA q8_0 and a
bf16 cache saved equal the old path's file."""
from __future__ import annotations

import io
import json
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import engine
from engine import restore, row_chunks
from engine.backends.cuda import kv_q8
from engine.kv_storage import EncodedStore
from engine.kvcache import KVCache
from engine.safetensors_writer import StreamedTensor, write_safetensors
from engine.sampling import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_tiny_model import TinySpec, make_tiny_model  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)
PROMPT = [int(i) for i in np.random.default_rng(5).integers(5, 380, 47)]


def written(tensors, metadata=None) -> bytes:
    out = io.BytesIO()
    write_safetensors(out, tensors, metadata)
    return out.getvalue()


def saved(tensors, path: Path, metadata=None) -> bytes:
    save_file(tensors, str(path), metadata=metadata)
    return path.read_bytes()


def parts(data: bytes) -> tuple[dict, list[str], bytes]:
    """(header, its tensor names in order, the data bytes) of a safetensors file."""
    size = int.from_bytes(data[:8], "little")
    pairs = json.loads(data[8:8 + size], object_pairs_hook=list)
    return dict(pairs), [name for name, _ in pairs if name != "__metadata__"], data[8 + size:]


def assert_same_file(ours: bytes, theirs: bytes) -> None:
    """Equal but for the order of the metadata keys (save_file's varies from process to process)."""
    assert len(ours) == len(theirs)
    (header, order, data), (header_2, order_2, data_2) = parts(ours), parts(theirs)
    assert dict(header, __metadata__=dict(header.get("__metadata__", {}))) == dict(
        header_2, __metadata__=dict(header_2.get("__metadata__", {})))
    assert order == order_2 and data == data_2


# ---------------------------------------------------------------------------------------------------------- writer
def random_tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "tokens": rng.integers(-2**31, 2**31, 13, dtype=np.int32),
        "k": rng.standard_normal((3, 5, 2, 7)).astype(np.float32),
        "v": rng.integers(0, 2**16, (2, 3, 1), dtype=np.uint16).view(np.float16),  # NaNs and infs among them
        "bits": rng.integers(0, 2**16, (1, 9), dtype=np.uint16),
        "bytes": rng.integers(0, 256, (4, 3, 34), dtype=np.uint8),
        "empty": np.zeros((2, 0, 5), np.float32),
        "one": np.array([7], np.uint8),
        "scalar": np.array(2.5, np.float32),
        "wide": rng.standard_normal(3), "long": np.arange(-3, 2, dtype=np.int64), "flags": np.array([True, False]),
    }


@pytest.mark.parametrize("metadata", [None, {}, {"messages": json.dumps([{"role": "user", "content": "héllo\n\x01"}],
                                                                        ensure_ascii=False) + "\u2028\x7f\x1f/"}])
def test_the_writer_writes_save_files_bytes(tmp_path, metadata):
    rng = np.random.default_rng(1)
    for count in (1, 2, len(random_tensors(rng))):
        tensors = dict(list(random_tensors(rng).items())[:count])
        assert written(tensors, metadata) == saved(tensors, tmp_path / "ref.safetensors", metadata)


def test_with_several_metadata_keys_only_their_order_differs(tmp_path):
    tensors = random_tensors(np.random.default_rng(2))
    metadata = {f"key{i}": f"value {i} é" for i in range(12)}
    ours = written(tensors, metadata)
    assert_same_file(ours, saved(tensors, tmp_path / "ref.safetensors", metadata))
    assert list(json.loads(ours[8:8 + int.from_bytes(ours[:8], "little")])["__metadata__"]) == list(metadata)


@pytest.mark.parametrize("chunk_rows", [1, 2, 3, 100])
def test_streamed_tensors_are_written_as_whole_ones(tmp_path, chunk_rows):
    tensors = random_tensors(np.random.default_rng(3))
    streamed = dict(tensors)
    for name in ("k", "v", "bytes", "empty"):
        array = tensors[name]
        streamed[name] = StreamedTensor(array.dtype, array.shape, lambda a=array: (
            np.ascontiguousarray(a[i:i + chunk_rows]) for i in range(0, len(a), chunk_rows)))
    assert written(streamed, {"a": "b"}) == saved(tensors, tmp_path / "ref.safetensors", {"a": "b"})
    assert written({"s": np.arange(12, dtype=np.int32)[::2]}) == written({"s": np.arange(0, 12, 2, dtype=np.int32)})


def test_bad_tensors_are_one_clear_error():
    with pytest.raises(ValueError, match="no dtype for numpy's >f4"):
        written({"x": np.zeros(2, ">f4")})
    with pytest.raises(ValueError, match="no dtype for numpy's complex64"):
        written({"x": np.zeros(2, np.complex64)})

    def stream(*chunks, shape=(2, 3)):
        return {"x": StreamedTensor(np.dtype(np.float32), shape, lambda: iter(chunks))}

    with pytest.raises(ValueError, match="chunks hold 12 bytes, its shape"):
        written(stream(np.zeros(3, np.float32)))
    with pytest.raises(ValueError, match="a chunk of float16"):
        written(stream(np.zeros(6, np.float16)))
    with pytest.raises(ValueError, match="contiguous: False"):
        written(stream(np.zeros((3, 4), np.float32)[:, ::2]))


def test_a_failed_write_closes_the_chunks():
    closed = []

    def chunks():
        try:
            yield np.zeros(3, np.float32)
            yield np.zeros(3, np.float32)
        finally:
            closed.append(True)

    class FullDisk(io.BytesIO):
        def write(self, data):
            if self.tell() > 8:  # the header goes in, the data does not
                raise OSError(28, "No space left on device")
            return super().write(data)

    with pytest.raises(OSError, match="No space left"):
        write_safetensors(FullDisk(), {"x": StreamedTensor(np.dtype(np.float32), (2, 3), chunks)})
    assert closed == [True]


# ---------------------------------------------------------------------------------------------------------- q8_0 join
@pytest.mark.parametrize("lead", [(), (1,), (3,), (2, 5), (3, 7, 2)])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_joining_on_the_device_gives_join_blocks_bytes(lead, head_dim):
    rng = np.random.default_rng(len(lead) * 1000 + head_dim)
    q = rng.integers(-128, 128, lead + (head_dim,), dtype=np.int8)
    bits = rng.integers(0, 2**16, lead + (head_dim // 32,), dtype=np.uint16)
    special = np.array([0x7E00, 0x7C01, 0xFC00, 0x7C00, 0x8000, 0x0001, 0xFFFF], np.uint16)  # NaNs, infs, -0, tiny
    bits.reshape(-1)[:special.size] = special[:bits.size]
    d = bits.view(np.float16)
    expected = kv_q8.join_blocks(q, d)
    assert np.array_equal(kv_q8.join_blocks_on_device(np, q, d), expected)
    out = np.full(expected.nbytes + 17, 0xEE, np.uint8)
    joined = kv_q8.join_blocks_on_device(np, q, d, out=out[:expected.nbytes])
    assert joined.shape == expected.shape and np.array_equal(joined, expected) and (out[expected.nbytes:] == 0xEE).all()
    assert np.array_equal(kv_q8.split_blocks(joined, head_dim)[1].view(np.uint16), bits)  # NaN payloads kept


def test_joining_slices_of_a_store_and_to_bytes():
    rng = np.random.default_rng(9)
    rows = kv_q8.DeviceQ8Rows(rng.integers(-128, 128, (3, 11, 2, 64), dtype=np.int8),
                              rng.integers(0, 2**16, (3, 11, 2, 2), dtype=np.uint16).view(np.float16))
    part = rows[1:, 2:9]  # strided over the leading axes
    expected = kv_q8.join_blocks(part.q, part.d)
    assert np.array_equal(kv_q8.join_blocks_on_device(np, part.q, part.d), expected)
    assert np.array_equal(part.to_bytes(), expected) and part.to_bytes().shape == part.byte_shape


# ---------------------------------------------------------------------------------------------------------- chunks
N_LAYERS, N_KV, HEAD_DIM, CAPACITY = 3, 2, 64, 40


def test_row_pieces_cover_every_layers_rows_once_in_order():
    for n, row, chunk in ((0, 8, 64), (1, 8, 64), (13, 8, 24), (13, 8, 4), (13, 8, 104), (13, 8, 10_000)):
        pieces = list(row_chunks.row_pieces(N_LAYERS, n, row, chunk))
        assert [(layer, r) for layer, first, rows in pieces for r in range(first, first + rows)] == [
            (layer, r) for layer in range(N_LAYERS) for r in range(n)]
        assert all(rows * row <= max(chunk, row) for _, _, rows in pieces)


class LazyDownloads:
    """DeviceDownloads on numpy: a copy is queued and runs only at wait(its slot) or finish(); each slot's host
    buffer is poisoned when its next copy is queued, so a chunk used after the next one was asked for reads 0xEE."""

    def __init__(self):
        self.xp = np
        self.host = [np.empty(0, np.uint8)] * row_chunks.SLOTS
        self.queued: dict[int, np.ndarray] = {}
        self.staged = [np.empty(0, np.uint8)] * row_chunks.SLOTS
        self.finished = 0

    def active(self):
        return nullcontext()

    def staging(self, slot, nbytes):
        if self.staged[slot].nbytes < nbytes:
            self.staged[slot] = np.empty(nbytes, np.uint8)
        return self.staged[slot][:nbytes]

    def download(self, slot, rows):
        assert slot not in self.queued and rows.flags.c_contiguous  # the slot's last copy was waited for
        if self.host[slot].nbytes < rows.nbytes:
            self.host[slot] = np.empty(rows.nbytes, np.uint8)
        self.host[slot][...] = 0xEE
        self.queued[slot] = rows.copy()  # what the stream copies: the rows as they are when queued

    def wait(self, slot):
        rows = self.queued.pop(slot)
        self.host[slot][:rows.nbytes] = rows.reshape(-1).view(np.uint8)

    def finish(self):
        self.queued.clear()
        self.finished += 1


def device_like_cache(types: tuple[str, str], n: int, rng: np.random.Generator) -> KVCache:
    """A cache laid out as the CUDA backend's (kv_q8.storage) over numpy arrays, n random rows committed."""
    dtype = "bf16" if "bf16" in types else "f16"
    cache = KVCache(N_LAYERS, CAPACITY, N_KV, HEAD_DIM, xp=np, types=types, storage=kv_q8.storage(np, dtype))
    for store in (cache.k, cache.v):
        for array in (store.q, store.d) if kv_q8.is_q8(store) else (store,):
            bytes_view = array.view(np.uint8)
            bytes_view[...] = rng.integers(0, 256, bytes_view.shape, dtype=np.uint8)
    cache.commit(n)
    return cache


def old_rows(store, n: int) -> np.ndarray:
    """What session files held before chunks: kv_q8.join_blocks of the host copies, or the rows as they are."""
    if kv_q8.is_q8(store):
        return kv_q8.join_blocks(store.q[:, :n], store.d[:, :n])
    if isinstance(store, EncodedStore):
        return np.ascontiguousarray(store.raw[:, :n])
    return np.ascontiguousarray(store[:, :n])


@pytest.mark.parametrize("types", [("bf16", "bf16"), ("f16", "f16"), ("q8_0", "q8_0"), ("q8_0", "bf16")],
                         ids=lambda t: "-".join(t))
@pytest.mark.parametrize("n, chunk_rows", [(0, 4), (1, 4), (29, 0.5), (29, 1), (29, 3), (29, 29), (29, 100)])
def test_device_chunks_are_the_stored_rows(types, n, chunk_rows):
    """The GPU path on numpy: chunks of at most chunk_bytes, shaped and typed as stored, whose bytes in order are the
    old host rows; each chunk still holds its rows when used, after the next one's copy was queued."""
    cache = device_like_cache(types, n, np.random.default_rng(n))
    for name in "kv":
        store = getattr(cache, name)
        expected = old_rows(store, n)
        row = expected[0, 0].nbytes if n else 1
        downloads = LazyDownloads()
        chunks = [chunk.copy() for chunk in row_chunks.device_chunks(store, n, downloads, int(chunk_rows * row))]
        assert downloads.finished == 1 and not downloads.queued
        assert all(c.dtype == expected.dtype and c.shape[1:] == expected.shape[2:] for c in chunks)
        assert all(c.nbytes <= max(1, int(chunk_rows)) * row for c in chunks)
        got = np.concatenate([c.reshape(-1).view(np.uint8) for c in chunks]) if chunks else np.empty(0, np.uint8)
        assert np.array_equal(got, expected.reshape(-1).view(np.uint8))
        # and as the CPU cache gives them (host_chunks of the same stores)
        assert np.array_equal(cache.host_rows()["kv".index(name)].view(np.uint8), expected.view(np.uint8))


def test_closing_device_chunks_half_way_waits_for_the_queued_copies():
    cache = device_like_cache(("q8_0", "bf16"), 20, np.random.default_rng(0))
    downloads = LazyDownloads()
    chunks = row_chunks.device_chunks(cache.k, 20, downloads, 5 * 136)
    next(chunks)
    assert downloads.queued  # the next chunk's copy
    chunks.close()
    assert downloads.finished == 1 and not downloads.queued


@pytest.mark.parametrize("types", [("f32", "f32"), ("f16", "q8_0"), ("q4_0", "bf16"), ("q5_1", "q4_1")],
                         ids=lambda t: "-".join(t))
def test_cpu_chunks_are_views_of_the_cache(types):
    cache = KVCache(N_LAYERS, CAPACITY, N_KV, HEAD_DIM, types=types)
    rng = np.random.default_rng(4)
    for layer in range(N_LAYERS):
        cache.write(layer, 0, *rng.standard_normal((2, 17, N_KV, HEAD_DIM)).astype(np.float32))
    cache.commit(17)
    for name in "kv":
        store = getattr(cache, name)
        chunks = list(cache.host_row_chunks(name, chunk_bytes=5 * old_rows(store, 17)[0, 0].nbytes))
        assert [len(c) for c in chunks] == [5, 5, 5, 2] * N_LAYERS
        memory = store.raw if isinstance(store, EncodedStore) else store
        assert all(np.shares_memory(c, memory) for c in chunks)
        assert np.array_equal(np.concatenate(chunks).reshape(old_rows(store, 17).shape), old_rows(store, 17))
    with pytest.raises(ValueError, match="not 'q'"):
        cache.host_row_chunks("q")


def test_the_chunk_size_is_the_restores():
    """A save's pinned buffers are the size a restore's ring takes from CuPy's pinned pool (and gives back)."""
    assert row_chunks.CHUNK_BYTES == restore.CHUNK_BYTES


# ---------------------------------------------------------------------------------------------------------- files
@pytest.fixture(scope="module")
def model(tmp_path_factory):
    spec = TinySpec(n_layers=3, d_model=128, n_heads=4, n_kv_heads=2, ffn_dim=128, seed=21)  # head_dim 32
    return make_tiny_model(tmp_path_factory.mktemp("save"), spec, gguf_types=("f32",), hf=False)["f32"]


def old_file(session, path: Path, metadata: dict[str, str]) -> bytes:
    """The file the old path wrote: every part's rows gathered on the host, then save_file."""
    cache_parts = getattr(session.cache, "parts", [session.cache])
    n = session.cache.length
    k, v = (np.concatenate([old_rows(getattr(part, name), n) for part in cache_parts]) for name in "kv")
    return saved({"tokens": np.asarray(session.tokens, np.int32), "k": k, "v": v}, path, metadata)


@pytest.mark.parametrize("settings", [{}, {"cache_type_k": "q8_0", "cache_type_v": "q8_0"},
                                      {"cache_type_k": "f16", "cache_type_v": "q4_0"},
                                      {"split_mode": "layer", "tensor_split": "1,2"},
                                      {"split_mode": "layer", "tensor_split": "2,1", "cache_type_k": "q5_0"}],
                         ids=["f32", "q8_0", "f16-q4_0", "split", "split-q5_0"])
def test_saved_files_are_the_old_paths_and_load_back(model, tmp_path, settings):
    llm = engine.load(model, context=96, **settings)
    session = llm.session(system="sys")
    generated = list(session.generate_ids(PROMPT, 5, GREEDY, stop_ids=[]))
    session.save(tmp_path / "new.session")
    ours = (tmp_path / "new.session").read_bytes()
    with safe_open(str(tmp_path / "new.session"), framework="numpy") as f:
        metadata = f.metadata()
    assert_same_file(ours, old_file(session, tmp_path / "old.session", metadata))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.session", "old.session"]  # no temporary left
    rows = session.cache.host_rows()
    follow = PROMPT + generated + PROMPT[:5]
    expected = list(session.generate_ids(follow, 4, GREEDY, stop_ids=[]))
    for path in ("new.session", "old.session"):  # the old path's files load as before
        other = engine.load(model, context=96, **settings).session()
        other.load(tmp_path / path)
        assert other.tokens == PROMPT + generated[:-1] and other.messages == [{"role": "system", "content": "sys"}]
        for a, b in zip(other.cache.host_rows(), rows):
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))
        assert list(other.generate_ids(follow, 4, GREEDY, stop_ids=[])) == expected


def test_an_empty_session_saves_and_loads(model, tmp_path):
    llm = engine.load(model, context=96, cache_type_k="q8_0")
    llm.session().save(tmp_path / "empty.session")
    other = llm.session()
    other.load(tmp_path / "empty.session")
    assert other.tokens == [] and other.cache.length == 0


# ---------------------------------------------------------------------------------------------------------- GPU
@pytest.mark.cuda
@pytest.mark.parametrize("types", [("q8_0", "q8_0"), ("bf16", "bf16"), ("q8_0", "bf16")], ids=lambda t: "-".join(t))
def test_cuda_saved_files_are_the_old_paths(tmp_path, types):
    """A tiny random model's CUDA cache (q8_0 rows joined on the device, 16-bit rows as they are) saved through pinned
    chunks equals the file the old path writes: the stores copied to the host, q8_0 joined by numpy, save_file; and
    with chunks of 3 rows the same bytes come."""
    import cupy as cp

    spec = TinySpec(d_model=128, n_heads=4, n_kv_heads=2, ffn_dim=128, seed=3)
    path = make_tiny_model(tmp_path, spec, gguf_types=("f32",), hf=False)["f32"]
    dtype = "bf16" if "bf16" in types else "f16"
    llm = engine.load(path, device="cuda", dtype=dtype, context=256, cache_type_k=types[0], cache_type_v=types[1])
    session = llm.session()
    list(session.generate_ids(np.random.default_rng(4).integers(3, 384, 150).tolist(), 4, GREEDY, stop_ids=[]))
    session.save(tmp_path / "new.session")
    n = session.cache.length

    def host_rows(store):
        if kv_q8.is_q8(store):
            return kv_q8.join_blocks(cp.asnumpy(store.q[:, :n]), cp.asnumpy(store.d[:, :n]))
        return cp.asnumpy(store[:, :n])

    with safe_open(str(tmp_path / "new.session"), framework="numpy") as f:
        metadata = f.metadata()
    tensors = {"tokens": np.asarray(session.tokens, np.int32), "k": host_rows(session.cache.k),
               "v": host_rows(session.cache.v)}
    assert_same_file((tmp_path / "new.session").read_bytes(), saved(tensors, tmp_path / "old.session", metadata))
    for name in "kv":
        row = tensors[name][0, 0].nbytes
        small = b"".join(c.tobytes() for c in session.cache.host_row_chunks(name, chunk_bytes=3 * row))
        assert small == tensors[name].tobytes()
