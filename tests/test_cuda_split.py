"""The layer split on CUDA (marker `cuda`): each stage a CudaBackend bound to its GPU, x handed over with a
device-to-device copy, eager decode with host sampling (engine/pipeline.py).

Two stages on one GPU run every piece of it but the copy between two GPUs (CI's GPU machine has one); the
split over GPUs 0 and 1 skips with "needs 2 GPUs" where fewer are visible.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import engine
from engine.api import LLM, plan
from engine.backends.cuda import CudaBackend
from engine.loader import open_model
from engine.pipeline import StagedCache
from engine.sampling import SamplingParams
from engine.split import Share

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_tiny_model import TinySpec, make_tiny_model  # noqa: E402
from gpu_greedy import assert_follows_cpu  # noqa: E402

pytestmark = pytest.mark.cuda

GREEDY = SamplingParams(temperature=0.0)
PROMPT = [int(i) for i in np.random.default_rng(4).integers(5, 380, 150)]
DCA = {"dca": engine.DCAConfig(chunk_size=64, local_window=16), "plain": "off"}
# the stages run the unsplit model's kernels on the same inputs; only the logits' summation order may differ
SPLIT_TOL = 1e-5


def gpu_count() -> int:
    import cupy

    return cupy.cuda.runtime.getDeviceCount()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    spec = TinySpec(n_layers=5, d_model=256, n_heads=4, n_kv_heads=2, ffn_dim=384, seed=6)
    return make_tiny_model(tmp_path_factory.mktemp("cuda_split"), spec, gguf_types=("q8_0",), hf=False)["q8_0"]


def rel_err(got, ref) -> float:
    got, ref = np.asarray(got, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    return float(np.linalg.norm(got - ref) / np.linalg.norm(ref))


def two_stages_on_gpu0(path, dca) -> LLM:
    """LLM over shares of one GPU: what load builds for GPUs 0 and 1, both on GPU 0."""
    loaded = open_model(path)
    loaded.config, context, dca_config = plan(loaded.config, 256, DCA[dca], None, None, None, None)
    shares = [Share(0, range(0, 3), True, False), Share(0, range(3, 5), False, True)]
    return LLM(loaded, CudaBackend("f16"), context, dca_config, None, shares=shares)


def check_against_unsplit(split: LLM, whole: LLM) -> None:
    """Prefill logits to summation order; greedy decoding the unsplit model's, or diverging only where its top-2
    logits are close: a stage's first layer stages its qkv input (the prenormed one would be the other stage's,
    fused.py), where the unsplit model's reads it prenormed, a rounding apart (tests/prenorm_emulation.py)."""
    assert rel_err(split.logits(PROMPT), whole.logits(PROMPT)) < SPLIT_TOL
    boundary = split.model.stages[1].layers[0]
    assert not split.model.stages[1].blocks.normed_qkv[boundary] and whole.model.decode_blocks.normed_qkv[boundary]
    whole_tokens = list(whole.generate_ids(PROMPT, 16, GREEDY, stop_ids=[]))
    assert_follows_cpu(whole, PROMPT, whole_tokens, list(split.generate_ids(PROMPT, 16, GREEDY, stop_ids=[])), "f16",
                       "split")


@pytest.mark.parametrize("dca", sorted(DCA))
def test_two_stages_on_one_gpu_equal_unsplit(model_path, dca):
    split = two_stages_on_gpu0(model_path, dca)
    assert len({id(stage.backend) for stage in split.model.stages}) == 2
    assert isinstance(split.cache, StagedCache) and [p.k.shape[0] for p in split.cache.parts] == [3, 2]
    check_against_unsplit(split, engine.load(model_path, device="cuda", dtype="f16", context=256, dca=DCA[dca]))


@pytest.mark.parametrize("dca", sorted(DCA))
def test_split_over_two_gpus_equals_unsplit(model_path, dca):
    if gpu_count() < 2:
        pytest.skip(f"needs 2 GPUs ({gpu_count()} visible)")
    split = engine.load(model_path, device="cuda", dtype="f16", context=256, dca=DCA[dca], split_mode="layer",
                        tensor_split="1,1")
    assert [stage.backend.device for stage in split.model.stages] == [0, 1]
    assert [part.k.device.id for part in split.cache.parts] == [0, 1]
    assert split.model.weights.layers[-1].ffn_down.data.device.id == 1
    check_against_unsplit(split, engine.load(model_path, device="cuda", dtype="f16", context=256, dca=DCA[dca]))
