import numpy as np
import pytest

from engine.errors import ConfigError
from engine.sampling import Sampler, SamplingParams, apply_repeat_penalty


def _logits(seed=0, vocab=50):
    return np.random.default_rng(seed).normal(size=vocab).astype(np.float32)


def test_greedy_is_argmax():
    logits = _logits()
    assert Sampler(SamplingParams(temperature=0.0))(logits) == int(np.argmax(logits))


def test_top_k_one_is_greedy_at_any_temperature():
    logits = _logits(1)
    sampler = Sampler(SamplingParams(temperature=5.0, top_k=1, top_p=1.0, min_p=0.0, seed=3))
    assert {sampler(logits) for _ in range(50)} == {int(np.argmax(logits))}


def test_same_seed_same_tokens_and_different_seed_differs():
    logits = np.zeros(1000, dtype=np.float32)  # uniform: every draw is pure randomness
    params = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    a = [Sampler(SamplingParams(**params, seed=7))(logits) for _ in range(1)]
    s1, s2, s3 = (Sampler(SamplingParams(**params, seed=s)) for s in (7, 7, 8))
    draws1 = [s1(logits) for _ in range(20)]
    assert draws1 == [s2(logits) for _ in range(20)]
    assert draws1 != [s3(logits) for _ in range(20)]
    assert a[0] == draws1[0]


def test_top_k_never_samples_outside_the_k_best():
    logits = _logits(2, vocab=200)
    best = set(np.argsort(-logits)[:5].tolist())
    sampler = Sampler(SamplingParams(temperature=3.0, top_k=5, top_p=1.0, min_p=0.0, seed=0))
    draws = {sampler(logits) for _ in range(300)}
    assert draws <= best and len(draws) > 1


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = np.log(probs)
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=0.75, min_p=0.0, seed=0))
    draws = {sampler(logits) for _ in range(300)}
    assert draws == {0, 1}  # 0.5 + 0.3 is the smallest prefix reaching 0.75


def test_min_p_drops_tokens_below_fraction_of_best():
    probs = np.array([0.4, 0.3, 0.2, 0.06, 0.04])
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2, seed=0))
    draws = {sampler(np.log(probs)) for _ in range(400)}
    assert draws == {0, 1, 2}  # 0.06 < 0.2 * 0.4


def test_temperature_sharpens_distribution():
    logits = np.array([1.0, 0.0])
    params = dict(top_k=0, top_p=1.0, min_p=0.0, seed=1)
    cold = Sampler(SamplingParams(temperature=0.1, **params))
    hot = Sampler(SamplingParams(temperature=10.0, **params))
    cold_share = np.mean([cold(logits) == 0 for _ in range(400)])
    hot_share = np.mean([hot(logits) == 0 for _ in range(400)])
    assert cold_share > 0.99 and 0.4 < hot_share < 0.65


def test_repeat_penalty_follows_llama_cpp_rule():
    logits = np.array([2.0, -2.0, 1.0, 3.0])
    out = apply_repeat_penalty(logits, [0, 1, 1], penalty=2.0, last_n=64)
    np.testing.assert_allclose(out, [1.0, -4.0, 1.0, 3.0])
    # only the last `last_n` tokens count
    out = apply_repeat_penalty(logits, [0, 1, 3], penalty=2.0, last_n=1)
    np.testing.assert_allclose(out, [2.0, -2.0, 1.0, 1.5])


def test_repeat_penalty_changes_greedy_choice():
    logits = np.array([2.0, 1.9, 0.0])
    sampler = Sampler(SamplingParams(temperature=0.0, repeat_penalty=1.5))
    assert sampler(logits, history=[0]) == 1


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(top_p=0.0), dict(top_p=1.5), dict(min_p=2.0),
                                    dict(repeat_penalty=0.0), dict(repeat_last_n=-1), dict(temperature=float("nan")),
                                    dict(temperature=float("inf")), dict(repeat_penalty=float("nan")),
                                    dict(repeat_penalty=float("inf")), dict(seed=-5)])
def test_impossible_parameters_raise(kwargs):
    with pytest.raises(ConfigError):
        SamplingParams(**kwargs)
