"""The prenormed inputs' rounding against the composed one, emulated on the CPU (tests/prenorm_emulation.py): the
measurement behind tests/test_cuda_model.py's tolerance for the fused decode step with prenormed inputs."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from engine.weights.quant import GGMLType

from prenorm_emulation import Normed, decode_difference, decode_steps, prenormed_tol, rel


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("gguf")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    from make_tiny_model import VARIANTS, make_tiny_model

    paths = dict(make_tiny_model(tmp_path_factory.mktemp("gqa"), VARIANTS["gqa"], gguf_types=("q4_1",), hf=False))
    paths.update({f"kquant-{k}": v for k, v in make_tiny_model(
        tmp_path_factory.mktemp("kq"), VARIANTS["kquant"], gguf_types=("q4_k", "q6_k"), hf=False).items()})
    paths.update({f"tied-{k}": v for k, v in make_tiny_model(
        tmp_path_factory.mktemp("tied"), VARIANTS["tied"], gguf_types=("q8_0",), hf=False).items()})
    return paths


@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_the_two_roundings_of_a_normed_input_agree_but_for_act_t(dtype):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((1, 4096)) * 2).astype(np.float32)
    w = rng.uniform(0.5, 1.5, 4096).astype(np.float32)
    composed, prenormed = (Normed(x, w, 1e-5, mode, dtype).quantized() for mode in ("composed", "prenormed"))
    step = np.abs(composed).reshape(-1, 32).max(axis=1) / 127
    # values differ by the scales' act_t rounding (max|v| moved by up to 2^-12 / 2^-9 of itself: at q = 127, 0.03 /
    # 0.25 of a step, doubled for the rounding's other side) and by at most one int8 step where that rounding moved a
    # value across a .5 boundary
    assert (np.abs(composed - prenormed).reshape(-1, 32) <= step[:, None] * {"f16": 1.1, "bf16": 1.6}[dtype]).all()
    assert 0 < np.linalg.norm(composed - prenormed) / np.linalg.norm(composed) < {"f16": 3e-3, "bf16": 1e-2}[dtype]


TYPES = {"q4_1": "Q4_1", "kquant-q4_k": "Q4_K", "kquant-q6_k": "Q6_K", "tied-q8_0": "Q8_0"}


@pytest.mark.parametrize("key", list(TYPES))
def test_decode_step_difference_is_within_the_fused_tolerance(tiny, key):
    tol = prenormed_tol(GGMLType[TYPES[key]])
    for dtype in ("f16", "bf16"):
        logits, rows = decode_difference(tiny[key], dtype, "off", 100)
        print(f"{key} {dtype}: prenormed vs composed logits {logits:.2e}, cache rows {rows:.2e}")
        assert 0 < logits < tol["logits"] and rows < tol["rows"]


def test_neither_rounding_is_further_from_the_float_step(tiny):
    """The prenormed step is as close to the unquantized float step as the composed one (summed over the models and
    dtypes: a case alone is noise; measured 0.5x .. 1.5x a case, DCA off and on)."""
    distance = {"composed": 0.0, "prenormed": 0.0}
    for key in TYPES:
        for dtype in ("f16", "bf16"):
            steps = decode_steps(tiny[key], dtype, "off", 100, ("float", "composed", "prenormed"))
            for mode in distance:
                distance[mode] += rel(steps[mode][0], steps["float"][0])
    print(f"summed distance from the float step: {distance}")
    assert 0 < distance["prenormed"] < 1.2 * distance["composed"]
