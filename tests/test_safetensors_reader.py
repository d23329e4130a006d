"""SafetensorsFile / SafetensorsCheckpoint against files written by the safetensors package."""
import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from engine.errors import ModelFormatError
from engine.weights.quant import GGMLType
from engine.weights.safetensors import SafetensorsCheckpoint, SafetensorsFile


def write_bf16_file(path, tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Hand-craft a BF16 safetensors file from float32 arrays; returns the exact float32 values."""
    header, blobs, offset, exact = {}, [], 0, {}
    for name, values in tensors.items():
        bits = (values.astype(np.float32).view("<u4") >> 16).astype("<u2")
        exact[name] = (bits.astype(np.uint32) << 16).view(np.float32)
        header[name] = {"dtype": "BF16", "shape": list(values.shape), "data_offsets": [offset, offset + bits.nbytes]}
        blobs.append(bits.tobytes())
        offset += bits.nbytes
    header["__metadata__"] = {"format": "hand"}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header with spaces
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"".join(blobs))
    return exact


def test_f32_f16_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "model.embed_tokens.weight": rng.standard_normal((10, 8)).astype(np.float32),
        "model.norm.weight": rng.standard_normal(8).astype(np.float16),
        "three_d": rng.standard_normal((2, 3, 4)).astype(np.float32),
        "scalar": np.array(1.5, dtype=np.float32),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    with SafetensorsFile(path) as f:
        assert f.metadata == {"format": "pt"}
        assert set(f.tensors) == set(tensors)
        for name, values in tensors.items():
            info = f.tensors[name]
            assert info.shape == values.shape
            assert info.ggml_type == (GGMLType.F16 if values.dtype == np.float16 else GGMLType.F32)
            np.testing.assert_array_equal(f.raw(name), np.frombuffer(values.tobytes(), np.uint8))
            out = f.tensor(name)
            assert out.dtype == np.float32
            np.testing.assert_array_equal(out, values.astype(np.float32))
        assert isinstance(f.raw("three_d"), np.memmap)


def test_bf16(tmp_path):
    rng = np.random.default_rng(1)
    values = {"w": rng.standard_normal((4, 6)).astype(np.float32), "b": np.array([1.0, -2.5, 3e38], np.float32)}
    path = tmp_path / "bf16.safetensors"
    exact = write_bf16_file(path, values)
    with SafetensorsFile(path) as f:
        assert f.metadata == {"format": "hand"}
        for name in values:
            assert f.tensors[name].ggml_type == GGMLType.BF16
            np.testing.assert_array_equal(f.tensor(name), exact[name])
            np.testing.assert_allclose(f.tensor(name), values[name], rtol=2**-7)


def make_sharded(folder, rng):
    a = {"model.layers.0.mlp.up_proj.weight": rng.standard_normal((4, 3)).astype(np.float32),
         "model.embed_tokens.weight": rng.standard_normal((5, 3)).astype(np.float16)}
    b = {"model.norm.weight": rng.standard_normal(3).astype(np.float32)}
    save_file(a, str(folder / "model-00001-of-00002.safetensors"))
    save_file(b, str(folder / "model-00002-of-00002.safetensors"))
    weight_map = {**{k: "model-00001-of-00002.safetensors" for k in a},
                  **{k: "model-00002-of-00002.safetensors" for k in b}}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 3}))
    return {**a, **b}, weight_map


def test_sharded_checkpoint(tmp_path):
    tensors, weight_map = make_sharded(tmp_path, np.random.default_rng(2))
    ckpt = SafetensorsCheckpoint(tmp_path)
    assert [f.path.name for f in ckpt.files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert set(ckpt.tensors) == set(tensors)
    for name, values in tensors.items():
        assert ckpt.file_of(name).path.name == weight_map[name]
        np.testing.assert_array_equal(ckpt.tensor(name), values.astype(np.float32))
        np.testing.assert_array_equal(ckpt.raw(name), np.frombuffer(values.tobytes(), np.uint8))
    assert ckpt.read_json("config.json")["hidden_size"] == 3
    with pytest.raises(ModelFormatError, match="no tensor named 'lm_head.weight'"):
        ckpt.tensor("lm_head.weight")


def test_single_file_checkpoint(tmp_path):
    values = np.arange(6, dtype=np.float32).reshape(2, 3)
    save_file({"lm_head.weight": values}, str(tmp_path / "model.safetensors"))
    ckpt = SafetensorsCheckpoint(tmp_path)
    assert len(ckpt.files) == 1
    np.testing.assert_array_equal(ckpt.tensor("lm_head.weight"), values)


def test_checkpoint_errors(tmp_path):
    rng = np.random.default_rng(3)
    with pytest.raises(ModelFormatError, match="has neither model.safetensors nor"):
        SafetensorsCheckpoint(tmp_path)
    with pytest.raises(ModelFormatError, match="not a model folder"):
        SafetensorsCheckpoint(tmp_path / "missing")

    _, weight_map = make_sharded(tmp_path, rng)
    index = tmp_path / "model.safetensors.index.json"

    def with_map(mapping):
        index.write_text(json.dumps({"weight_map": mapping}))

    with_map({**weight_map, "extra.weight": "model-00003-of-00003.safetensors"})
    with pytest.raises(ModelFormatError, match="shard 'model-00003-of-00003.safetensors' is not a file"):
        SafetensorsCheckpoint(tmp_path)

    with_map({**weight_map, "lm_head.weight": "model-00002-of-00002.safetensors"})
    with pytest.raises(ModelFormatError, match="'lm_head.weight' is listed in shard .* but missing from it"):
        SafetensorsCheckpoint(tmp_path)

    with_map({**weight_map, "x": "../model-00001-of-00002.safetensors"})
    with pytest.raises(ModelFormatError, match="is not a file in"):
        SafetensorsCheckpoint(tmp_path)

    one = np.ones(3, np.float32)
    save_file({"w": one}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"w": one, "v": one}, str(tmp_path / "model-00002-of-00002.safetensors"))
    with_map({"w": "model-00001-of-00002.safetensors", "v": "model-00002-of-00002.safetensors"})
    with pytest.raises(ModelFormatError, match="model-00002-of-00002.safetensors: tensor 'w' is also in .*00001"):
        SafetensorsCheckpoint(tmp_path)

    index.write_text("{not json")
    with pytest.raises(ModelFormatError, match="model.safetensors.index.json: invalid JSON"):
        SafetensorsCheckpoint(tmp_path)
    index.write_text(json.dumps({"weight_map": ["a"]}))
    with pytest.raises(ModelFormatError, match="weight_map must map"):
        SafetensorsCheckpoint(tmp_path)


def test_read_json_errors(tmp_path):
    save_file({"w": np.ones(2, np.float32)}, str(tmp_path / "model.safetensors"))
    ckpt = SafetensorsCheckpoint(tmp_path)
    with pytest.raises(ModelFormatError, match="config.json: file is missing"):
        ckpt.read_json("config.json")
    (tmp_path / "config.json").write_text('{"a": 1,}')
    with pytest.raises(ModelFormatError, match="config.json: invalid JSON"):
        ckpt.read_json("config.json")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelFormatError, match="config.json: expected a JSON object"):
        ckpt.read_json("config.json")


def test_unused_dtype_is_listed_and_named_when_read(tmp_path):
    path = tmp_path / "i64.safetensors"
    save_file({"ok": np.ones(2, np.float32), "position_ids": np.arange(4, dtype=np.int64)}, str(path))
    f = SafetensorsFile(path)  # a position_ids buffer does not stop a checkpoint from opening
    assert list(f.tensors) == ["ok"] and f.unsupported == {"position_ids": "I64"}
    with pytest.raises(ModelFormatError, match=r"tensor 'position_ids' has dtype 'I64', which is not supported"):
        f.tensor("position_ids")


def test_undefined_dtype_is_an_error(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({"ok": np.ones(2, np.float32)}, str(path))
    data = path.read_bytes().replace(b'"F32"', b'"Q99"')
    path.write_bytes(data)
    with pytest.raises(ModelFormatError, match="'Q99', which safetensors does not define"):
        SafetensorsFile(path)
