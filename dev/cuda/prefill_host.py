"""Where a short prefill's host time goes: a development driver for the host-bound 1B pp512 (dev/cuda/NOTES.md v35).

Loads a bench shape's random-weight model (as tools/profile_prefill.py does) or a GGUF file, runs plain prefills
(wall and host queueing time), then one under cProfile (functions by own time, with each one's own and cumulative
time a call), then the host cost of the primitives the backend's op wrappers are built from (CuPy allocation, a
RawKernel launch, the cuBLAS handle and stream, a device query), each timed over 2,000 calls.

    python dev/cuda/prefill_host.py [--shape llama3.2-1b | -m MODEL.gguf] [--tokens 512] [--dtype bf16]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from engine.bench import _prefill, load_bench_model, new_cache  # noqa: E402
from engine.options import LoadSettings  # noqa: E402
from profile_prefill import plain_prefill  # noqa: E402


def plain_runs(model, cp, n: int, runs: int) -> None:
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, n)
    for run in range(runs):
        wall, queued = plain_prefill(model, cp, ids, n)
        print(f"prefill {n}: run {run}: wall {wall:.2f} ms, host queueing {queued:.2f} ms ({n / wall * 1e3:.0f} tok/s)")


def profiled_run(model, cp, n: int) -> None:
    ids = np.random.default_rng(1).integers(0, model.config.vocab_size, n)
    cache = new_cache(model, n + 8)
    cp.cuda.Device().synchronize()
    prof = cProfile.Profile()
    prof.enable()
    _prefill(model, cache, ids, n)
    prof.disable()
    cp.cuda.Device().synchronize()
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (primitive calls, calls, own s, cumulative s, callers)
    rows = sorted(((own, cum, calls, f"{Path(file).name}:{line}({name})")
                   for (file, line, name), (_, calls, own, cum, _) in stats.items()), reverse=True)
    total = sum(r[0] for r in rows)
    print(f"--- cProfile of one prefill of {n} tokens: {total * 1e3:.2f} ms of own time; by own time (us)")
    print(f"  {'function':60s} {'calls':>6s} {'own':>8s} {'own/call':>9s} {'cum/call':>9s}")
    for own, cum, calls, name in rows[:45]:
        print(f"  {name[:60]:60s} {calls:6d} {own * 1e6:8.0f} {own * 1e6 / calls:9.2f} {cum * 1e6 / calls:9.2f}")


def per_call_us(fn, calls: int = 2000) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def primitives(backend, cp) -> None:
    from cupy_backends.cuda.libs import cublas

    from engine.backends.cuda.kernels import function

    x = cp.zeros((512, 2048), dtype=cp.float32)
    w = cp.ones(2048, dtype=cp.float32)
    out = cp.empty((512, 2048), dtype=backend.act)
    rms = function("elementwise", "rmsnorm", backend.dtype)
    args = (x, w, out, np.int32(512), np.int32(2048), np.float32(1e-5), np.int32(0), np.int32(1))
    cases = {
        "cp.empty (512, 2048) f32": lambda: cp.empty((512, 2048), dtype=cp.float32),
        "cp.ascontiguousarray (contiguous)": lambda: cp.ascontiguousarray(x),
        "cp.ascontiguousarray dtype=f32 (is f32)": lambda: cp.ascontiguousarray(x, dtype=cp.float32),
        "function() lookup": lambda: function("elementwise", "rmsnorm", backend.dtype),
        "RawKernel launch, 8 args": lambda: rms((128,), (128,), args),
        "RawKernel launch, 8 args (python ints)": lambda: rms((128,), (128,), (x, w, out, 512, 2048, 1e-5, 0, 1)),
        "backend.rmsnorm": lambda: backend.rmsnorm(x, w, 1e-5),
        "cp.cuda.Device().compute_capability": lambda: cp.cuda.Device().compute_capability,
        "cp.cuda.runtime.getDevice()": lambda: cp.cuda.runtime.getDevice(),
        "get_cublas_handle + setStream": lambda: cublas.setStream(cp.cuda.device.get_cublas_handle(),
                                                                 cp.cuda.get_current_stream().ptr),
        "np.ones(1) + np.full(1)": lambda: (np.ones(1, dtype=np.float32), np.full(1, 0.0, dtype=np.float32)),
        "x.reshape + slice view": lambda: x.reshape(512, 16, 128)[:, :8],
        "np.int32 x 8": lambda: tuple(np.int32(i) for i in range(8)),
        "cp.cuda.Event record": lambda: cp.cuda.Event().record(),
        "cp.arange(512) int32": lambda: cp.arange(0, 512, dtype=cp.int32),
        "cp.asarray(512 ints)": lambda: cp.asarray(np.arange(512, dtype=np.int32)),
    }
    print("--- host cost of primitives (us a call)")
    for name, fn in cases.items():
        us = per_call_us(fn)
        cp.cuda.Device().synchronize()
        print(f"  {name:44s} {us:8.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama3.2-1b")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--model", "-m", default=None, help="a GGUF file's own weights instead of a shape's")
    args = parser.parse_args()
    import cupy as cp

    settings = LoadSettings(model=Path(args.model) if args.model else None, device="cuda", dtype=args.dtype,
                            context=args.tokens + 256, dca="on")
    llm, label = load_bench_model(settings, synthetic=args.model is None,
                                  shape=None if args.shape == "smollm2" or args.model else args.shape)
    print(f"model: {label}")
    plain_runs(llm.model, cp, args.tokens, 5)
    profiled_run(llm.model, cp, args.tokens)
    primitives(llm.backend, cp)


if __name__ == "__main__":
    main()
