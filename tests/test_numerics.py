"""Non-finite logits (an overflow upstream) stop generation with one clear NumericsError, on the CPU and on the
GPU (where the device sampler reports them instead of emitting an out-of-range token id)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

import engine
from engine.errors import NumericsError
from engine.sampling import SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from make_tiny_model import VARIANTS, make_tiny_model  # noqa: E402

GREEDY = SamplingParams(temperature=0.0)
STOCHASTIC_ON_HOST = SamplingParams(temperature=0.8, top_k=0)  # top_k 0: the CUDA decoder samples on the host


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("numerics"), VARIANTS["d64"], gguf_types=("q8_0",), hf=False)["q8_0"]


def overflow_head(llm) -> None:
    """The final norm's weights pushed past the float range (to infinity): every logit becomes non-finite."""
    weights = llm.model.weights
    weights.output_norm = weights.output_norm * np.float32(0) + np.float32(np.inf)


def check_prompt_and_decode_overflow(llm, sampling: SamplingParams, hint: str) -> None:
    prompt = list(range(5, 40))
    steps = llm.generate_ids(prompt, 8, sampling, stop_ids=[])
    next(steps)  # the prompt's logits are fine
    overflow_head(llm)
    with pytest.raises(NumericsError, match=f"non-finite logits at decode step 1{hint}"):
        next(steps)
    with pytest.raises(NumericsError, match="non-finite logits at the prompt's last position"):
        list(llm.generate_ids(prompt, 8, sampling, stop_ids=[]))


@pytest.mark.parametrize("sampling", [GREEDY, STOCHASTIC_ON_HOST], ids=["greedy", "stochastic"])
def test_cpu_non_finite_logits_raise(tiny, sampling):
    check_prompt_and_decode_overflow(engine.load(tiny, device="cpu", context=128), sampling, "")


@pytest.mark.cuda
@pytest.mark.parametrize("sampling", [GREEDY, SamplingParams(temperature=0.8, top_k=40), STOCHASTIC_ON_HOST],
                         ids=["greedy", "device-topk", "host"])
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
def test_cuda_non_finite_logits_raise_never_an_illegal_address(tiny, sampling, dtype):
    llm = engine.load(tiny, device="cuda", context=128, dtype=dtype)
    hint = "; fp16 activations overflow past 65,504: run with --dtype bf16" if dtype == "f16" else ""
    check_prompt_and_decode_overflow(llm, sampling, hint)


@pytest.mark.cuda
def test_device_sampler_reports_a_nan_or_inf_logit():
    import cupy as cp

    from engine.backends.cuda.sampling import NON_FINITE, DeviceSampler

    for bad in (np.nan, np.inf, -np.inf):
        logits = cp.asarray(np.random.default_rng(0).standard_normal((1, 1000)).astype(np.float32))
        logits[0, 777] = bad
        position = cp.zeros(1, dtype=cp.int32)
        sampler = DeviceSampler(cp, GREEDY, [1, 2, 3])
        sampler.launch(logits, position, advance=True)
        assert int(sampler.token.get()[0]) == NON_FINITE and int(position.get()[0]) == 0
