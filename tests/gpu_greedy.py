"""Greedy decoding with the CUDA backend's own decoder (device sampling, graph replay), and its agreement with the
CPU's: the cuda tests of the model, the q8_0 KV cache and the extensions."""
from __future__ import annotations

import numpy as np

from engine.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0)
TOP2_TOL = {"f16": 0.1, "bf16": 0.25}  # a 16-bit GPU may pick the CPU's second token where its top two are this close


def greedy_on_gpu(llm, prompt, n, use_graph=True):
    """n greedy tokens from the CUDA backend's decoder after a prefill of prompt -> (tokens, cache, decoder);
    use_graph=False steps eagerly (a decoder may step eagerly anyway: Self-Extend / StreamingLLM)."""
    cache = llm.new_cache()
    logits = llm.prefill(prompt, cache)
    decoder = llm.backend.decoder(llm.model, cache, GREEDY, prompt)
    if not use_graph:
        decoder.use_graph = False
    tokens = [decoder.first(logits)]
    while len(tokens) < n:
        tokens.append(decoder.step(tokens[-1]))
    return tokens, cache, decoder


def assert_follows_cpu(cpu, prompt, cpu_tokens, gpu_tokens, dtype: str, label: str) -> int | None:
    """The GPU's greedy tokens are the CPU's up to a first divergence, which is allowed only where the CPU's top-2
    logits there are within TOP2_TOL: the divergence's index, or None."""
    for t, (a, b) in enumerate(zip(cpu_tokens, gpu_tokens)):
        if a != b:
            logits = np.sort(cpu.logits(prompt + cpu_tokens[:t])[-1])
            gap = logits[-1] - logits[-2]
            print(f"{label}: diverged at token {t}, CPU top-2 gap {gap:.4f}")
            assert gap < TOP2_TOL[dtype]
            return t
    return None
