"""RoPE: inverse frequencies against HF transformers goldens, rotation against a complex-number formula."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from engine.config import RopeConfig
from engine.errors import ConfigError, ContextError
from engine.rope import RotaryTable, attention_factor, inv_freq

GOLDEN = Path(__file__).parent / "golden" / "rope_hf.npz"


def _golden_cases():
    with np.load(GOLDEN) as golden:
        cases = json.loads(str(golden["cases"]))
        return [(c, golden[f"inv_freq/{c['name']}"], float(golden[f"attention/{c['name']}"])) for c in cases]


@pytest.mark.parametrize("case,expected_inv_freq,expected_attention", _golden_cases(),
                         ids=lambda value: value["name"] if isinstance(value, dict) else "")
def test_inv_freq_and_attention_factor_match_hf(case, expected_inv_freq, expected_attention):
    rope = RopeConfig(**case["rope"])
    ours = inv_freq(rope, case["context"])
    assert ours.shape == (rope.dim // 2,) and ours.dtype == np.float64
    np.testing.assert_allclose(ours, expected_inv_freq, rtol=1e-6, atol=0)
    assert attention_factor(rope) == pytest.approx(expected_attention, rel=1e-6)


def test_golden_covers_every_hf_scaling_and_scaling_changes_frequencies():
    cases = _golden_cases()
    assert {c["rope"].get("scaling", "none") for c, _, _ in cases} == {"none", "linear", "ntk", "dynamic", "yarn",
                                                                      "llama3"}
    for case, expected, _ in cases:
        plain = inv_freq(RopeConfig(theta=case["rope"]["theta"], dim=case["rope"]["dim"]))
        is_noop = case["rope"].get("scaling", "none") == "none" or (
            case["rope"].get("scaling") == "dynamic" and case["context"] <= case["rope"]["original_context"])
        assert np.allclose(expected, plain, rtol=1e-6) == is_noop, case["name"]


def _complex_rotation(x: np.ndarray, positions: np.ndarray, rope: RopeConfig, context=None) -> np.ndarray:
    """Rotate-half pairing (t, t + dim/2) as the complex number x_t + i*x_{t+dim/2} times e^{i p w_t}."""
    half = rope.dim // 2
    z = x[..., :half].astype(np.float64) + 1j * x[..., half:rope.dim].astype(np.float64)
    angle = positions[:, None, None] * inv_freq(rope, context)[None, None, :]
    z = z * np.exp(1j * angle) * attention_factor(rope)
    out = x.astype(np.float64).copy()
    out[..., :half], out[..., half:rope.dim] = z.real, z.imag
    return out


@pytest.mark.parametrize("rope", [
    RopeConfig(theta=10000.0, dim=64),
    RopeConfig(theta=500000.0, dim=32, scaling="yarn", factor=4.0, original_context=256),
    RopeConfig(theta=10000.0, dim=48, scaling="dynamic", factor=2.0, original_context=100),
])
@pytest.mark.parametrize("dtype,tolerance", [(np.float64, 1e-6), (np.float32, 1e-5), (np.float16, 2e-2)])
def test_rotate_matches_complex_formula_and_passes_extra_dims_through(rope, dtype, tolerance):
    head_dim = 64
    rng = np.random.default_rng(1)
    x = rng.standard_normal((37, 3, head_dim)).astype(dtype)
    positions = rng.integers(0, 400, size=37)
    table = RotaryTable(rope, 400, context=300)
    rotated = table.rotate(x, positions)
    assert rotated.dtype == dtype and rotated.shape == x.shape
    expected = _complex_rotation(x, positions, rope, context=300)
    np.testing.assert_allclose(rotated.astype(np.float64), expected, atol=tolerance * np.abs(expected).max())
    np.testing.assert_array_equal(rotated[..., rope.dim:], x[..., rope.dim:])
    assert not np.shares_memory(rotated, x)


def test_rotation_dot_product_depends_only_on_relative_position():
    rope = RopeConfig(theta=10000.0, dim=64)
    table = RotaryTable(rope, 5000)
    rng = np.random.default_rng(2)
    q, k = rng.standard_normal((2, 1, 1, 64))

    def score(i: int, j: int) -> float:
        return float(np.sum(table.rotate(q, np.array([i])) * table.rotate(k, np.array([j]))))

    for i, j in [(0, 0), (5, 3), (100, 1), (700, 650), (4000, 17)]:
        for shift in (1, 37, 900):
            assert score(i + shift, j + shift) == pytest.approx(score(i, j), rel=1e-5, abs=1e-5)
    assert abs(score(10, 0) - score(0, 10)) > 1e-3  # the sign of the distance matters


def test_freq_factors_divide_base_frequencies_before_scaling():
    factors = np.linspace(1.0, 8.0, 32)
    plain = inv_freq(RopeConfig(theta=10000.0, dim=64))
    with_factors = inv_freq(RopeConfig(theta=10000.0, dim=64, freq_factors=factors))
    np.testing.assert_allclose(with_factors, plain / factors, rtol=1e-12)
    linear = inv_freq(RopeConfig(theta=10000.0, dim=64, scaling="linear", factor=2.0, freq_factors=factors))
    np.testing.assert_allclose(linear, plain / factors / 2.0, rtol=1e-12)


def test_freq_factors_with_llama3_scaling_are_refused():
    rope = RopeConfig(theta=500000.0, dim=64, scaling="llama3", factor=8.0, freq_factors=np.ones(32))
    with pytest.raises(ConfigError, match="llama3"):
        inv_freq(rope)


def test_dynamic_ntk_grows_with_context_and_ntk_keeps_highest_frequency():
    rope = RopeConfig(theta=10000.0, dim=64, scaling="dynamic", factor=4.0, original_context=1000)
    lowest = [inv_freq(rope, context)[-1] for context in (500, 1000, 2000, 8000)]
    assert lowest[0] == lowest[1] > lowest[2] > lowest[3]
    ntk = inv_freq(RopeConfig(theta=10000.0, dim=64, scaling="ntk", factor=4.0))
    assert ntk[0] == 1.0 and ntk[-1] < inv_freq(RopeConfig(theta=10000.0, dim=64))[-1]


def test_table_is_float32_and_scaled_by_yarn_attention_factor():
    rope = RopeConfig(theta=10000.0, dim=16, scaling="yarn", factor=8.0, original_context=64)
    table = RotaryTable(rope, 10)
    assert table.cos.shape == table.sin.shape == (10, 8) and table.cos.dtype == np.float32
    np.testing.assert_allclose(table.cos[0], 0.1 * np.log(8.0) + 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.hypot(table.cos, table.sin), attention_factor(rope), rtol=1e-6)


@pytest.mark.parametrize("bad_position", [10, 11, -1])
def test_positions_outside_the_table_raise_context_error(bad_position):
    table = RotaryTable(RopeConfig(dim=8), 10)
    x = np.zeros((2, 1, 8), dtype=np.float32)
    with pytest.raises(ContextError, match=str(bad_position)):
        table.rotate(x, np.array([0, bad_position]))


def test_bad_rotate_arguments_raise_config_error():
    table = RotaryTable(RopeConfig(dim=8), 10)
    with pytest.raises(ConfigError, match="head_dim"):
        table.rotate(np.zeros((2, 1, 4), dtype=np.float32), np.array([0, 1]))
    with pytest.raises(ConfigError, match="positions"):
        table.rotate(np.zeros((2, 1, 8), dtype=np.float32), np.array([0, 1, 2]))
    with pytest.raises(ConfigError, match="positive"):
        RotaryTable(RopeConfig(dim=8), 0)
