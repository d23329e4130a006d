"""Malformed GGUF and safetensors files: one clear ModelFormatError, never a crash, hang or big allocation.

GGUF files here are assembled byte by byte so that every field can lie.
"""
import json
import os
import struct
import time
import tracemalloc

import numpy as np
import pytest

from engine.errors import ModelFormatError
from engine.weights.gguf import GGUFFile
from engine.weights.safetensors import SafetensorsFile

# gguf value types and ggml tensor types used below
U32, F32V, STRING, ARRAY = 4, 6, 8, 9
T_F32, T_Q8_0, T_Q4_K, T_IQ2_XXS = 0, 8, 12, 16


def gstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + payload


def string_array(items: list[str | bytes]) -> bytes:
    return struct.pack("<IQ", STRING, len(items)) + b"".join(gstr(s) for s in items)


def tensor_info(name: str | bytes, ne: list[int], ggml_type: int, offset: int) -> bytes:
    return gstr(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne) + struct.pack("<IQ", ggml_type, offset)


def gguf_bytes(kvs: list[bytes], infos: list[bytes], data: bytes, *, version: int = 3, alignment: int = 32,
               n_kv: int | None = None, n_tensors: int | None = None) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(infos)
    return body + b"\0" * (-len(body) % alignment) + data


rng0 = np.random.default_rng(0)
F32_DATA = rng0.standard_normal((4, 8)).astype(np.float32).tobytes()  # 128 bytes at 0
Q8_DATA = bytes(rng0.integers(0, 256, 68, dtype=np.uint8))  # (2, 32) Q8_0 at 128
Q4K_DATA = bytes(rng0.integers(0, 256, 144, dtype=np.uint8))  # (1, 256) Q4_K at 224

BASE_KVS = [
    kv("general.architecture", STRING, gstr("llama")),
    kv("llama.block_count", U32, struct.pack("<I", 2)),
    kv("tokenizer.ggml.tokens", ARRAY, string_array(["<s>", "a", "Ġb"])),
    kv("scores", ARRAY, struct.pack("<IQ3f", F32V, 3, 0.0, -1.0, 2.5)),
]
BASE_INFOS = [
    tensor_info("a", [8, 4], T_F32, 0),
    tensor_info("b", [32, 2], T_Q8_0, 128),
    tensor_info("c", [256], T_Q4_K, 224),
]
BASE_DATA = F32_DATA + Q8_DATA + b"\0" * 28 + Q4K_DATA


def valid_gguf() -> bytes:
    return gguf_bytes(BASE_KVS, BASE_INFOS, BASE_DATA)


def write_fresh(path, data: bytes) -> None:
    """Replace the file by a new one (rewriting a file that is still mapped is slow)."""
    path.unlink(missing_ok=True)
    path.write_bytes(data)


def open_and_read(path, reader=GGUFFile) -> None:
    with reader(path) as f:
        for name in f.tensors:
            f.tensor(name)


def expect_error(path, data: bytes, match: str, reader=GGUFFile) -> None:
    write_fresh(path, data)
    with pytest.raises(ModelFormatError, match=match) as info:
        open_and_read(path, reader)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message


def test_base_file_is_valid(tmp_path):
    path = tmp_path / "ok.gguf"
    path.write_bytes(valid_gguf())
    with GGUFFile(path) as f:
        assert f.metadata["tokenizer.ggml.tokens"] == ["<s>", "a", "Ġb"]
        assert f.metadata["scores"].tolist() == [0.0, -1.0, 2.5]
        assert [t.shape for t in f.tensors.values()] == [(4, 8), (2, 32), (256,)]
        np.testing.assert_array_equal(f.tensor("a"), np.frombuffer(F32_DATA, np.float32).reshape(4, 8))


def test_truncation_at_every_offset(tmp_path):
    data = valid_gguf()
    path = tmp_path / "cut.gguf"
    for n in range(len(data)):
        write_fresh(path, data[:n])
        with pytest.raises(ModelFormatError):
            open_and_read(path)


LYING_GGUF = [
    (b"GGML" + valid_gguf()[4:], r"not a GGUF file \(starts with b'GGML'"),
    (gguf_bytes(BASE_KVS, BASE_INFOS, BASE_DATA, version=1), "GGUF version 1 is not supported"),
    (gguf_bytes(BASE_KVS, BASE_INFOS, BASE_DATA, version=7), "unsupported GGUF version 7"),
    (gguf_bytes(BASE_KVS, BASE_INFOS, BASE_DATA, version=3 << 24), "big-endian GGUF files are not supported"),
    (b"GGUF\x03\0\0", "truncated: version"),
    (gguf_bytes(BASE_KVS, BASE_INFOS, BASE_DATA, n_kv=2**60), "metadata key/value count is 1152921504606846976, which cannot fit"),
    (gguf_bytes(BASE_KVS, BASE_INFOS, BASE_DATA, n_tensors=2**40), "tensor count is 1099511627776, which cannot fit"),
    (gguf_bytes(BASE_KVS, BASE_INFOS, BASE_DATA, n_kv=5), "truncated|unknown|not valid UTF-8"),
    (gguf_bytes([struct.pack("<Q", 2**62) + b"key"], [], b""), r"truncated: metadata key #0 \(4611686018427387904 bytes\)"),
    (gguf_bytes([kv("k", STRING, struct.pack("<Q", 2**63) + b"x")], [], b""), "truncated: value of 'k'"),
    (gguf_bytes([kv("toks", ARRAY, struct.pack("<IQ", STRING, 2**61))], [], b""), "array length of 'toks' is 2305843009213693952, which cannot fit"),
    (gguf_bytes([kv("nums", ARRAY, struct.pack("<IQ", U32, 2**62 + 1) + b"\0" * 8)], [], b""), "array length of 'nums' is"),
    (gguf_bytes([kv("nest", ARRAY, struct.pack("<IQ", ARRAY, 2**50))], [], b""), "array length of 'nest' is"),
    (gguf_bytes([kv("k", 99, b"\0" * 8)], [], b""), "key 'k' has unknown value type 99"),
    (gguf_bytes([kv("k", ARRAY, struct.pack("<IQ", 42, 1) + b"\0" * 8)], [], b""), "'k' is an array of unknown value type 42"),
    (gguf_bytes([kv("deep", ARRAY, struct.pack("<IQ", ARRAY, 1) * 40 + struct.pack("<IQ", U32, 0))], [], b""),
     "'deep' nests arrays deeper than"),
    (gguf_bytes([kv("k", U32, b"\0" * 4), kv("k", U32, b"\0" * 4)], [], b""), "duplicate metadata key 'k'"),
    (gguf_bytes([kv(b"ok", U32, b"\0" * 4), kv(b"bad\xff", U32, b"\0" * 4)], [], b""), "metadata key #1 is not valid UTF-8"),
    (gguf_bytes([kv("k", STRING, gstr(b"\xc3\x28"))], [], b""), "value of 'k' is not valid UTF-8"),
    (gguf_bytes([kv("toks", ARRAY, string_array(["a", b"\xe2\x82"]))], [], b""), "'toks' element 1 is not valid UTF-8"),
    (gguf_bytes([kv("general.alignment", U32, struct.pack("<I", 24))], [], b""), "general.alignment 24 is not a power of two"),
    (gguf_bytes([kv("general.alignment", U32, struct.pack("<I", 0))], [], b""), "general.alignment 0 is not a power of two"),
    (gguf_bytes([kv("general.alignment", STRING, gstr("32"))], [], b""), "general.alignment must be an integer"),
    (gguf_bytes([], [tensor_info(b"\xff", [8], T_F32, 0)], b"\0" * 32), "name of tensor #0 is not valid UTF-8"),
    (gguf_bytes([], [tensor_info("t", [8, 1, 1, 1, 1], T_F32, 0)], b"\0" * 32), "tensor 't' has 5 dimensions"),
    (gguf_bytes([], [gstr("t") + struct.pack("<I", 2**31) + b"\0" * 64], b""), "tensor 't' has 2147483648 dimensions"),
    (gguf_bytes([], [tensor_info("t", [], T_F32, 0)], b"\0" * 32), "tensor 't' has 0 dimensions"),
    (gguf_bytes([], [tensor_info("t", [8, 0], T_F32, 0)], b"\0" * 32), r"tensor 't' has an invalid dimension in \[8, 0\]"),
    (gguf_bytes([], [tensor_info("t", [8, 2**64 - 1], T_F32, 0)], b"\0" * 32), "tensor 't' has an invalid dimension"),
    (gguf_bytes([], [tensor_info("t", [2**40, 2**40], T_F32, 0)], b"\0" * 32), "tensor 't' data .* extends past the end"),
    (gguf_bytes([], [tensor_info("t", [8], 77, 0)], b"\0" * 32), "tensor 't': unknown tensor type 77"),
    (gguf_bytes([], [tensor_info("t", [256], T_IQ2_XXS, 0)], b"\0" * 96), "tensor 't': tensor type IQ2_XXS is not supported"),
    (gguf_bytes([], [tensor_info("t", [33, 2], T_Q8_0, 0)], b"\0" * 96), "tensor 't': row length 33 of a Q8_0 tensor"),
    (gguf_bytes([], [tensor_info("t", [8], T_F32, 4096)], b"\0" * 32), r"tensor 't' data \(bytes \d+\.\.\d+\) extends past the end"),
    (gguf_bytes([], [tensor_info("t", [8], T_F32, 4)], b"\0" * 64), "tensor 't' data offset 4 is not a multiple of the alignment 32"),
    (gguf_bytes([], [tensor_info("t", [8], T_F32, 0), tensor_info("u", [16], T_F32, 0)], b"\0" * 64),
     "tensors 't' and 'u' overlap"),
    (gguf_bytes([], [tensor_info("t", [8], T_F32, 0), tensor_info("t", [8], T_F32, 32)], b"\0" * 64),
     "duplicate tensor name 't'"),
]


@pytest.mark.parametrize("data,match", LYING_GGUF, ids=[m for _, m in LYING_GGUF])
def test_lying_gguf(tmp_path, data, match):
    expect_error(tmp_path / "bad.gguf", data, match)


def test_unusual_but_valid_gguf(tmp_path):
    # alignment 1 (unaligned tensor data) and an empty array are legal
    kvs = [kv("general.alignment", U32, struct.pack("<I", 1)), kv("empty", ARRAY, struct.pack("<IQ", U32, 0))]
    data = gguf_bytes(kvs, [tensor_info("t", [3], T_F32, 0)], np.array([1, 2, 3], np.float32).tobytes(), alignment=1)
    path = tmp_path / "ok.gguf"
    path.write_bytes(data)
    with GGUFFile(path) as f:
        assert f.alignment == 1 and f.metadata["empty"].size == 0
        np.testing.assert_array_equal(f.tensor("t"), [1, 2, 3])


def test_not_a_regular_file(tmp_path):
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ModelFormatError, match="empty.gguf: file is empty"):
        GGUFFile(tmp_path / "empty.gguf")
    with pytest.raises(ModelFormatError, match="empty.gguf: file is empty"):
        SafetensorsFile(tmp_path / "empty.gguf")
    with pytest.raises(ModelFormatError, match="is a directory"):
        GGUFFile(tmp_path)
    with pytest.raises(ModelFormatError, match="missing.gguf: cannot open"):
        GGUFFile(tmp_path / "missing.gguf")
    with pytest.raises(ModelFormatError, match="is a directory"):
        SafetensorsFile(tmp_path)
    with pytest.raises(ModelFormatError, match="missing.safetensors: cannot open"):
        SafetensorsFile(tmp_path / "missing.safetensors")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads any file")
def test_permission_denied(tmp_path):
    path = tmp_path / "locked.gguf"
    path.write_bytes(valid_gguf())
    path.chmod(0)
    with pytest.raises(ModelFormatError, match="cannot open"):
        GGUFFile(path)


# --- safetensors ----------------------------------------------------------------------


def st_bytes(header: dict | bytes, data: bytes, header_len: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if header_len is None else header_len) + text + data


ST_DATA = np.arange(6, dtype=np.float32).tobytes() + np.ones(4, np.float16).tobytes()  # 24 + 8 bytes
ST_HEADER = {
    "__metadata__": {"format": "pt"},
    "w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
    "b": {"dtype": "F16", "shape": [4], "data_offsets": [24, 32]},
}


def st_with(name: str, **entry) -> dict:
    header = json.loads(json.dumps(ST_HEADER))
    header[name].update(entry)
    return header


def test_safetensors_base_and_truncation(tmp_path):
    data = st_bytes(ST_HEADER, ST_DATA)
    path = tmp_path / "ok.safetensors"
    path.write_bytes(data)
    with SafetensorsFile(path) as f:
        np.testing.assert_array_equal(f.tensor("w"), np.arange(6).reshape(2, 3))
    for n in range(len(data)):
        write_fresh(path, data[:n])
        with pytest.raises(ModelFormatError):
            open_and_read(path, SafetensorsFile)


MALFORMED_SAFETENSORS = [
    (b"\x01\0\0", r"too small \(3 bytes\)"),
    (st_bytes(ST_HEADER, ST_DATA, header_len=2**40), "header length 1099511627776 is impossible"),
    (st_bytes(ST_HEADER, ST_DATA, header_len=200 * 2**20), "header length 209715200 is impossible"),
    (st_bytes(b'{"w": ', ST_DATA), "header is not valid JSON"),
    (st_bytes(b'{"a": "\xff"}', b""), "header is not valid JSON"),
    (st_bytes(b"[" * 100000 + b"]" * 100000, b""), "header is not valid JSON"),
    (st_bytes(b"[1, 2]", b""), "header is not a JSON object"),
    (st_bytes(b'{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "w": {}}', b"\0" * 4), "duplicate key 'w'"),
    (st_bytes({"__metadata__": {"a": 1}}, b""), "__metadata__ must map strings to strings"),
    (st_bytes({"w": [1]}, b""), "tensor 'w': header entry is not an object"),
    (st_bytes(st_with("w", dtype="F64"), ST_DATA), "tensor 'w': shape .* of F64 does not match data_offsets"),
    (st_bytes(st_with("w", dtype="X99"), ST_DATA), "tensor 'w' has dtype 'X99', which safetensors does not define"),
    (st_bytes(st_with("w", shape=[2, -3]), ST_DATA), r"tensor 'w': shape \[2, -3\] is not a list of non-negative"),
    (st_bytes(st_with("w", shape="2x3"), ST_DATA), "tensor 'w': shape '2x3'"),
    (st_bytes(st_with("w", data_offsets=[0]), ST_DATA), "tensor 'w': data_offsets"),
    (st_bytes(st_with("w", data_offsets=[0, 4000]), ST_DATA), r"tensor 'w': data_offsets \[0, 4000\] are outside the 32"),
    (st_bytes(st_with("w", data_offsets=[24, 0]), ST_DATA), "inverted"),
    (st_bytes(st_with("w", data_offsets=[-8, 16]), ST_DATA), "outside"),
    (st_bytes(st_with("w", data_offsets=[0, 20]), ST_DATA), r"shape \[2, 3\] of F32 needs 24 bytes but data_offsets span 20"),
    (st_bytes(st_with("b", data_offsets=[16, 24]), ST_DATA), "tensors 'w' and 'b' overlap"),
]


@pytest.mark.parametrize("data,match", MALFORMED_SAFETENSORS, ids=[m for _, m in MALFORMED_SAFETENSORS])
def test_malformed_safetensors(tmp_path, data, match):
    expect_error(tmp_path / "bad.safetensors", data, match, reader=SafetensorsFile)


# --- bounded fuzzing ------------------------------------------------------------------

MEMORY_SLACK = 1 << 20  # bytes above the file size that one open+read may trace


def mutate(data: bytes, region_end: int, rng: np.random.Generator) -> bytes:
    """1-3 random byte replacements, insertions or deletions inside data[:region_end]."""
    out = bytearray(data)
    for _ in range(int(rng.integers(1, 4))):
        pos = int(rng.integers(0, region_end))
        op = rng.integers(3)
        if op == 0:
            out[pos] = int(rng.integers(0, 256))
        elif op == 1:
            out[pos:pos] = rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8).tobytes()
        else:
            del out[pos : pos + int(rng.integers(1, 9))]
    return bytes(out)


def fuzz(tmp_path, data: bytes, region_end: int, reader, seed: int, cases: int = 300) -> tuple[int, int]:
    rng = np.random.default_rng(seed)
    path = tmp_path / "fuzz.bin"
    outcomes = {"ok": 0, "error": 0}
    for _ in range(cases):
        mutated = mutate(data, region_end, rng)
        write_fresh(path, mutated)
        tracemalloc.start()
        start = time.perf_counter()
        try:
            open_and_read(path, reader)
            outcomes["ok"] += 1
        except ModelFormatError:
            outcomes["error"] += 1
        finally:
            elapsed = time.perf_counter() - start
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        assert peak < len(mutated) + MEMORY_SLACK, f"peak {peak} bytes for a {len(mutated)}-byte file"
        assert elapsed < 2.0, f"one case took {elapsed:.2f} s"
    return outcomes["ok"], outcomes["error"]


def test_fuzz_gguf_header(tmp_path):
    data = valid_gguf()
    header_end = len(data) - len(BASE_DATA)
    ok, errors = fuzz(tmp_path, data, header_end, GGUFFile, seed=1234)
    assert ok > 0 and errors > 0  # both paths exercised


def test_fuzz_safetensors_header(tmp_path):
    data = st_bytes(ST_HEADER, ST_DATA)
    ok, errors = fuzz(tmp_path, data, len(data) - len(ST_DATA), SafetensorsFile, seed=4321)
    assert errors > 0
