"""Layer split planning (engine/split.py): llama.cpp's --tensor-split rule, refusals, per-device memory."""
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from engine import memory
from engine.backends import cuda_unavailable_reason
from engine.cli import cli
from engine.errors import ConfigError, EngineError
from engine.loader import open_model
from engine.split import (parse_tensor_split, require_shares, resolve_split, share_plans, share_weights,
                          split_layers)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_tiny_model import TinySpec, make_tiny_model  # noqa: E402


def ranges(shares):
    return [(s.device, s.layers.start, s.layers.stop) for s in shares]


def test_equal_ratios_count_the_head_as_a_layer():
    # llama.cpp: layer i on the first device whose cumulative share exceeds i / (n_layers + 1)
    assert ranges(split_layers(30, [1, 1])) == [(0, 0, 16), (1, 16, 30)]
    assert ranges(split_layers(32, [1, 1, 1, 1])) == [(0, 0, 9), (1, 9, 17), (2, 17, 25), (3, 25, 32)]


def test_proportions_and_first_last():
    shares = split_layers(8, [3, 1])
    assert ranges(shares) == [(0, 0, 7), (1, 7, 8)]  # 7 / 9 <= 3/4 < 8 / 9
    assert [(s.first, s.last) for s in shares] == [(True, False), (False, True)]
    one = split_layers(4, [1])
    assert ranges(one) == [(0, 0, 4)] and one[0].first and one[0].last


def test_zero_share_device_holds_nothing():
    assert ranges(split_layers(6, [0, 1, 1])) == [(1, 0, 4), (2, 4, 6)]
    assert ranges(split_layers(6, [1, 0])) == [(0, 0, 6)]


def test_every_layer_once_in_order():
    for n_layers in range(1, 40):
        for ratios in ([1, 1], [5, 1, 2], [0.3, 0.7], [1, 1, 1, 1]):
            if sum(r > 0 for r in ratios) > n_layers:
                continue
            layers = [i for s in split_layers(n_layers, ratios) for i in s.layers]
            assert layers == list(range(n_layers))


@pytest.mark.parametrize("ratios, message", [
    ([1, -1], "must be >= 0"),
    ([0, 0], "all 0"),
    ([1, 1, 1], "only 2 layers"),
    ([], "at least one"),
])
def test_bad_ratios_are_refused(ratios, message):
    with pytest.raises(ConfigError, match=message):
        split_layers(2, ratios)


def test_parse_tensor_split():
    assert parse_tensor_split("3,1") == (3.0, 1.0)
    assert parse_tensor_split("3/1") == (3.0, 1.0)
    assert parse_tensor_split((1, 2)) == (1.0, 2.0)
    assert parse_tensor_split(None) is None
    with pytest.raises(ConfigError, match="proportions separated by commas"):
        parse_tensor_split("3,x")


def test_resolve_split():
    assert resolve_split("none", None, None, 8) is None
    assert ranges(resolve_split("layer", None, 2, 8)) == [(0, 0, 5), (1, 5, 8)]  # no free memory known: equal
    # by free memory when known: 3 GiB and 1 GiB free
    assert ranges(resolve_split("layer", None, None, 8, free=[3 << 30, 1 << 30])) == [(0, 0, 7), (1, 7, 8)]
    assert ranges(resolve_split("layer", "1,1", None, 8, free=[3 << 30, 1 << 30])) == [(0, 0, 5), (1, 5, 8)]
    with pytest.raises(ConfigError, match="split-mode row .* not implemented"):
        resolve_split("row", None, 2, 8)
    with pytest.raises(ConfigError, match="3 proportions for --gpus 2"):
        resolve_split("layer", "1,1,1", 2, 8)
    with pytest.raises(ConfigError, match="apply with --split-mode layer"):
        resolve_split("none", "1,1", None, 8)
    with pytest.raises(ConfigError, match="asks for 3 GPUs but 2 are visible"):
        resolve_split("layer", None, 3, 8, free=[1, 1])
    with pytest.raises(ConfigError, match="needs --gpus N"):
        resolve_split("layer", None, None, 8)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def loaded(request, tmp_path_factory):
    spec = TinySpec(n_layers=5, seed=3, tied=request.param)
    path = make_tiny_model(tmp_path_factory.mktemp("split"), spec, gguf_types=("q8_0",), hf=False)["q8_0"]
    return open_model(path)


def test_share_weights_hold_every_tensor(loaded):
    c = loaded.config
    shares = split_layers(c.n_layers, [1, 1, 1])
    held = [share_weights(loaded.weights, s, c.tied_embeddings) for s in shares]
    assert "token_embd" in held[0] and "output" in held[-1] and "output_norm" in held[-1]
    assert "token_embd" not in held[1] and "output" not in held[0]
    layer_tensors = sum(1 for h in held for name in h if name.startswith("blk."))
    assert layer_tensors == sum(1 for name in loaded.weights if name.startswith("blk."))
    middle = shares[1].layers
    expected = {f"blk.{i - middle.start}.{n.split('.', 2)[2]}" for i in middle for n in loaded.weights
                if n.startswith(f"blk.{i}.")}
    assert {n for n in held[1] if n.startswith("blk.")} == expected  # its layers, renumbered from 0


@pytest.mark.parametrize("device, dtype", [("cpu", "f32"), ("cuda", "f16")])
def test_share_plans_add_up_to_the_whole(loaded, device, dtype):
    c, context = loaded.config, 200
    whole = memory.plan_memory(c, loaded.weights, context, device, dtype, f32_copies=True)
    shares = split_layers(c.n_layers, [2, 1])
    plans = share_plans(c, loaded.weights, shares, context, device, dtype, f32_copies=True)
    assert sum(p.kv_cache for p in plans) == whole.kv_cache
    assert [p.kv_cache for p in plans] == [whole.kv_cache * len(s.layers) // c.n_layers for s in shares]
    tied_copy = loaded.weights["token_embd"] if c.tied_embeddings else None  # the head's copy on the last GPU
    extra = 0 if tied_copy is None else memory.plan_memory(c, {"token_embd": tied_copy}, 1, device, dtype,
                                                           f32_copies=True).weights
    assert sum(p.weights for p in plans) == whole.weights + extra
    assert plans[0].logits == 0 and plans[-1].logits == whole.logits
    assert all(p.activations == whole.activations for p in plans)  # each stage runs a whole batch


def test_require_shares_names_the_gpu_that_does_not_fit(loaded):
    c = loaded.config
    shares = split_layers(c.n_layers, [1, 1])
    plans = share_plans(c, loaded.weights, shares, 200, "cuda", "f16")
    last = shares[-1]
    with pytest.raises(EngineError) as refused:
        require_shares(shares, plans, [1 << 40, plans[-1].total - 1])
    message = str(refused.value)
    assert f"GPU 1's share (layers {last.layers.start}-{last.layers.stop - 1} + output head)" in message
    assert f"= {plans[-1].total / 2**30:.2f} GiB needed on the GPU (f16)" in message
    require_shares(shares, plans, [plans[0].total, plans[1].total])  # exactly enough
    require_shares(shares, plans, [None])  # unknown: not checked


def test_info_shows_each_devices_share(loaded):
    path = str(loaded.path)
    result = CliRunner().invoke(cli, ["info", "-m", path, "-c", "300", "--device", "cpu", "--split-mode", "layer",
                                      "--gpus", "2"])
    assert result.exit_code == 0, result.output
    assert "plan: split" in result.output and "layer over 2 CPU ranks" in result.output
    assert "plan: CPU rank 0    " in result.output and "layers 0-2 + embedding: weights as stored" in result.output
    assert "layers 3-4 + output head: weights as stored" in result.output
    if cuda_unavailable_reason() is not None:  # no GPU here: the plan is still shown, each GPU's free memory unknown
        result = CliRunner().invoke(cli, ["info", "-m", path, "--device", "cuda", "--split-mode", "layer",
                                          "--tensor-split", "2,1"])
        assert result.exit_code == 0, result.output
        assert "plan: GPU 1" in result.output and result.output.count("free: unknown") == 2
    result = CliRunner().invoke(cli, ["info", "-m", path, "--split-mode", "row", "--gpus", "2"])
    assert result.exit_code != 0 and "split-mode row" in str(result.exception)
