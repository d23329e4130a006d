"""Development driver for the device sampler (kernels/sampling.cu): the split (sample_scan + sample_pool on G blocks,
sample_token on one) against the previous single-block kernel (one block of 1024 threads over the whole vocabulary,
kept here as OLD_SOURCE; production no longer has it). Needs a GPU; run from the repository root:

    python dev/cuda/sampler.py [--vocabs 32000,128256,152064] [--reps 5] [--steps 40]

Check first: for each vocabulary and mode, --steps launches of both on fresh random logits (the same for both), two
DeviceSamplers with the same settings and history: the tokens, the penalised logits, the ring, its count and the
random counter must be identical at every step (the split picks what the single block picks, by construction).
Then timing: 40 launches captured in a CUDA graph (as the decode step captures it), the median of --reps replays,
per launch, in us; ratio = old / new.
Modes: greedy (what `engine bench` uses); greedy with a repetition penalty over 64 tokens; stochastic T=0.8 top-k 40
top-p 0.95 min-p 0.05 (penalty 1.1) on "peaked" logits (40 tokens within 30 of the top: the pool path) and on
"spread" logits (N(0, 2.5), a language model's spread: every token within 30 of the top, the pool overflows;
sample_narrow refills it with the tokens above a tighter threshold that still holds the top 40, where the old
kernel ran 40 rounds over the whole vocabulary on one block).
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.backends.cuda import kernels  # noqa: E402
from engine.backends.cuda.sampling import DeviceSampler  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402

_spec = importlib.util.spec_from_file_location("gemv_driver", Path(__file__).with_name("gemv.py"))
_gemv_driver = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_gemv_driver)
time_launches = _gemv_driver.time_launches  # (cp, launch(i), copies, reps): median seconds a launch in a CUDA graph

MODES = {  # name: (params, logits shape)
    "greedy": (SamplingParams(temperature=0.0), "spread"),  # engine bench's settings
    "greedy/penalty": (SamplingParams(temperature=0.0, repeat_penalty=1.1, repeat_last_n=64), "spread"),
    "stoch/peaked": (SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.1,
                                    repeat_last_n=64, seed=7), "peaked"),
    "stoch/spread": (SamplingParams(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.1,
                                    repeat_last_n=64, seed=7), "spread"),
}

# kernels/sampling.cu before the split (commit d3595cb), verbatim
OLD_SOURCE = r"""// Device-side token sampling: only the chosen token id ever leaves the GPU.
//
// Design. One block of 1024 threads over the (vocab,) fp32 logits of the last position, in
// llama.cpp's order as engine/sampling.py: repetition penalty on the distinct tokens of a device
// ring buffer (the last `ring_size` tokens) -> greedy argmax (temperature <= 0), or top-k candidates
// -> softmax -> top-p prefix -> min-p -> softmax(logits / temperature) -> draw. The top-k candidates
// come from k rounds of a block-wide argmax, each restricted to items ordered after the previous pick
// (value descending, id ascending), so they are sorted (k <= MAX_TOP_K). The rounds scan a shared-
// memory pool of the tokens within 30*max(T,1) of the top logit (their relative probability is above
// e^-30), or the whole vocabulary when that pool would exceed POOL_CAP.
// Randomness: splitmix64(seed, counter) with the counter kept on the device, so a captured graph
// draws a fresh number at every replay. After the draw: token_out = id, the ring gets the id, and
// with advance != 0 the decode position (pos[0]) moves on by one. Logits holding a NaN or an infinity (an
// overflow upstream) are not sampled: token_out = -1 and nothing else changes, so the host can stop with a
// clear error instead of feeding an out-of-range id to the next step.

#define MAX_TOP_K 256
#define SAMPLE_THREADS 1024
#define POOL_CAP 1024       // candidates kept in shared memory for the top-k rounds
#define POOL_CUTOFF 30.0f   // logits this far (times max(T, 1)) below the top never matter

__device__ __forceinline__ bool ranks_before(float av, int ai, float bv, int bi) {
    return av > bv || (av == bv && ai < bi);
}

// block-wide best (value, id) among items ranked after (after_v, after_i) (everything when first);
// items are vals[j] with id ids[j] (ids == nullptr: id j)
__device__ void block_best(const float* vals, const int* ids, int n, bool first, float after_v, int after_i,
                           float* out_v, int* out_i, float* sv, int* si) {
    float best_v = NEG_INF;
    int best_i = 0x7fffffff;
#pragma unroll 8
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const float v = vals[j];
        const int i = ids ? ids[j] : j;
        if (!first && !ranks_before(after_v, after_i, v, i)) continue;
        if (ranks_before(v, i, best_v, best_i)) { best_v = v; best_i = i; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, best_v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, best_i, o);
        if (ranks_before(ov, oi, best_v, best_i)) { best_v = ov; best_i = oi; }
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) { sv[warp] = best_v; si[warp] = best_i; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < (int)(blockDim.x >> 5); ++w)
            if (ranks_before(sv[w], si[w], best_v, best_i)) { best_v = sv[w]; best_i = si[w]; }
        *out_v = best_v;
        *out_i = best_i;
    }
    __syncthreads();
}

__device__ __forceinline__ double uniform01(unsigned long long seed, unsigned long long counter) {
    unsigned long long z = seed + (counter + 1ull) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (double)(z >> 11) * (1.0 / 9007199254740992.0);  // [0, 1)
}

extern "C" __global__ void sample_token(float* __restrict__ logits, int vocab, int* __restrict__ ring,
                                        int ring_size, int* __restrict__ ring_count, float penalty,
                                        float temperature, int top_k, float top_p, float min_p,
                                        unsigned long long seed, unsigned long long* __restrict__ counter,
                                        int* __restrict__ token_out, int* __restrict__ pos, int advance) {
    __shared__ float sv[32];
    __shared__ int si[32];
    __shared__ float cand_v[MAX_TOP_K];
    __shared__ int cand_i[MAX_TOP_K];
    __shared__ int chosen;

    // 0. non-finite logits: report, sample nothing
    bool non_finite = false;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x)
        non_finite |= (__float_as_uint(logits[i]) & 0x7f800000u) == 0x7f800000u;
    if (__syncthreads_or(non_finite)) {
        if (threadIdx.x == 0) *token_out = -1;
        return;
    }

    // 1. repetition penalty on the distinct tokens of the ring (a duplicate is skipped by its later copies)
    const int filled = min(*ring_count, ring_size);
    if (penalty != 1.0f && (int)threadIdx.x < filled) {
        const int tok = ring[threadIdx.x];
        bool duplicate = false;
        for (int t = 0; t < (int)threadIdx.x; ++t) duplicate |= ring[t] == tok;
        if (!duplicate) {
            const float v = logits[tok];
            logits[tok] = v > 0.0f ? v / penalty : v * penalty;
        }
    }
    __syncthreads();

    if (temperature <= 0.0f) {
        float v;
        block_best(logits, nullptr, vocab, true, 0.0f, 0, &v, &chosen, sv, si);
    } else {
        // pool the tokens within POOL_CUTOFF*max(T,1) of the top logit (the rest have relative
        // probability < e^-30 after the temperature), so the k selection rounds scan shared memory
        __shared__ float pool_v[POOL_CAP];
        __shared__ int pool_i[POOL_CAP];
        __shared__ int n_pool;
        __shared__ float top_v;
        int top_i;
        block_best(logits, nullptr, vocab, true, 0.0f, 0, &top_v, &top_i, sv, si);
        if (threadIdx.x == 0) n_pool = 0;
        __syncthreads();
        const float floor_v = top_v - POOL_CUTOFF * fmaxf(temperature, 1.0f);
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            const float v = logits[i];
            if (v >= floor_v) {
                const int slot = atomicAdd(&n_pool, 1);
                if (slot < POOL_CAP) { pool_v[slot] = v; pool_i[slot] = i; }
            }
        }
        __syncthreads();
        const bool pooled = n_pool <= POOL_CAP;  // else (a very flat distribution) scan the whole vocabulary
        const float* src_v = pooled ? pool_v : logits;
        const int* src_i = pooled ? pool_i : nullptr;
        const int n_src = pooled ? n_pool : vocab;
        const int k = min(top_k, n_src);
        for (int r = 0; r < k; ++r)
            block_best(src_v, src_i, n_src, r == 0, r ? cand_v[r - 1] : 0.0f, r ? cand_i[r - 1] : 0, &cand_v[r],
                       &cand_i[r], sv, si);
        if (threadIdx.x == 0) {
            // probabilities of the top-k candidates (sorted, cand_v[0] the largest)
            double total = 0.0;
            for (int r = 0; r < k; ++r) total += exp((double)cand_v[r] - (double)cand_v[0]);
            int n_keep = k;
            if (top_p < 1.0f) {  // smallest prefix whose mass reaches top_p
                double cum = 0.0;
                int below = 0;
                for (int r = 0; r < k; ++r) {
                    cum += exp((double)cand_v[r] - (double)cand_v[0]) / total;
                    if (cum < (double)top_p) ++below;
                }
                n_keep = min(below + 1, k);
            }
            if (min_p > 0.0f) {  // p_r >= min_p * p_0  <=>  exp(v_r - v_0) >= min_p
                int keep = 0;
                for (int r = 0; r < n_keep; ++r) keep += exp((double)cand_v[r] - (double)cand_v[0]) >= (double)min_p;
                n_keep = keep;
            }
            double mass = 0.0;
            for (int r = 0; r < n_keep; ++r) mass += exp(((double)cand_v[r] - (double)cand_v[0]) / temperature);
            const double u = uniform01(seed, *counter) * mass;
            *counter += 1ull;
            double cum = 0.0;
            int pick = n_keep - 1;
            for (int r = 0; r < n_keep; ++r) {
                cum += exp(((double)cand_v[r] - (double)cand_v[0]) / temperature);
                if (u < cum) { pick = r; break; }
            }
            chosen = cand_i[pick];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        *token_out = chosen;
        if (ring_size > 0) {
            ring[*ring_count % ring_size] = chosen;
            *ring_count += 1;
        }
        if (advance) *pos += 1;
    }
}
"""


def old_kernel(cp):
    """The single-block sample_token, built as the loader builds sampling.cu (common.cuh prepended)."""
    code = (kernels.KERNEL_DIR / "common.cuh").read_text() + "\n" + OLD_SOURCE
    return cp.RawModule(code=code, options=kernels.nvrtc_options("sampling")).get_function("sample_token")


def launch_old(fn, sampler: DeviceSampler, seed: np.uint64, logits, position, advance: bool) -> None:
    """DeviceSampler.launch as it was: one block of 1024 threads, the sampler's ring, counter and token slot, the
    seed (the sampler's, read back beforehand: the old kernel takes it by value)."""
    s = sampler.scalars
    top_k = 0 if s.greedy else min(s.top_k, logits.shape[-1])
    fn((1,), (1024,), (logits, np.int32(logits.shape[-1]), sampler.ring, np.int32(s.ring_size),
                       sampler.ring_count, np.float32(s.penalty), np.float32(s.temperature), np.int32(top_k),
                       np.float32(s.top_p), np.float32(s.min_p), seed, sampler.counter, sampler.token,
                       position, np.int32(advance)))


def host_seed(sampler: DeviceSampler) -> np.uint64:
    return np.uint64(sampler.seed.get()[0])


def make_logits(rng, vocab: int, shape: str) -> np.ndarray:
    """"spread": N(0, 2.5) (every token within 30 of the top); "peaked": N(-60, 2) with min(40, vocab) tokens drawn
    N(0, 1.5) at random places (the pool holds them); "flat": U(0, 1)."""
    if shape == "flat":
        return rng.uniform(0.0, 1.0, vocab).astype(np.float32)
    if shape == "spread":
        return (rng.standard_normal(vocab) * 2.5).astype(np.float32)
    logits = (rng.standard_normal(vocab) * 2.0 - 60.0).astype(np.float32)
    top = rng.choice(vocab, min(40, vocab), replace=False)
    logits[top] = (rng.standard_normal(len(top)) * 1.5).astype(np.float32)
    return logits


def compare(cp, vocab: int, params: SamplingParams, shape: str, steps: int, seed: int = 0, history=None) -> list[str]:
    """Run the old kernel and the split side by side for `steps` launches on the same fresh logits; the
    differences found (empty: identical tokens, penalised logits, rings, counts and counters at every step)."""
    rng = np.random.default_rng(seed)
    history = list(rng.integers(0, vocab, 80)) if history is None else history
    old, new = DeviceSampler(cp, params, history), DeviceSampler(cp, params, history)
    old_seed = host_seed(old)
    fn = old_kernel(cp)
    pos_old, pos_new = cp.zeros(1, dtype=cp.int32), cp.zeros(1, dtype=cp.int32)
    problems = []
    for step in range(steps):
        host = make_logits(rng, vocab, shape)
        logits_old, logits_new = cp.asarray(host[None]), cp.asarray(host[None])
        launch_old(fn, old, old_seed, logits_old, pos_old, advance=True)
        new.launch(logits_new, pos_new, advance=True)
        for what, a, b in (("token", old.token, new.token), ("logits", logits_old, logits_new),
                           ("ring", old.ring, new.ring), ("ring count", old.ring_count, new.ring_count),
                           ("counter", old.counter, new.counter), ("position", pos_old, pos_new)):
            a, b = cp.asnumpy(a), cp.asnumpy(b)
            if not np.array_equal(a.view(np.uint8), b.view(np.uint8)):
                problems.append(f"vocab {vocab} {shape} step {step}: {what} differs"
                                + (f" (old {a[0]}, new {b[0]})" if a.size == 1 else ""))
    return problems


def time_mode(cp, vocab: int, params: SamplingParams, shape: str, reps: int) -> tuple[float, float]:
    """(old, new) seconds per call. The logits are restored before every call (a copy, timed for both alike and
    subtracted), so the penalty and the pool see the same values at every replay."""
    rng = np.random.default_rng(vocab)
    source = cp.asarray(make_logits(rng, vocab, shape)[None])
    logits = source.copy()
    position = cp.zeros(1, dtype=cp.int32)
    history = list(rng.integers(0, vocab, 80))
    fn = old_kernel(cp)
    old, new = DeviceSampler(cp, params, history), DeviceSampler(cp, params, history)
    old_seed = host_seed(old)

    def restore():
        cp.copyto(logits, source)

    copy = time_launches(cp, lambda _: restore(), 1, reps)
    t_old = time_launches(cp, lambda _: (restore(), launch_old(fn, old, old_seed, logits, position, False)), 1, reps)
    t_new = time_launches(cp, lambda _: (restore(), new.launch(logits, position, False)), 1, reps)
    return t_old - copy, t_new - copy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocabs", default="32000,128256,152064")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated names of MODES")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40, help="launches compared per vocabulary and mode")
    args = ap.parse_args()
    import cupy as cp

    vocabs = [int(v) for v in args.vocabs.split(",")]
    modes = args.modes.split(",")
    problems = []
    for vocab in vocabs:
        for mode in modes:
            params, shape = MODES[mode]
            found = compare(cp, vocab, params, shape, args.steps, seed=vocab)
            print(f"check vocab {vocab:>6} {mode:<14}: {'identical' if not found else f'{len(found)} differences'}")
            problems += found
    for line in problems[:20]:
        print("  " + line)
    print(f"\n| {'vocab':>6} | {'mode':<14} | {'old us':>8} | {'new us':>8} | {'ratio':>6} |")
    print("|" + "|".join("-" * (w + 2) for w in (6, 14, 8, 8, 6)) + "|")
    for vocab in vocabs:
        for mode in modes:
            params, shape = MODES[mode]
            t_old, t_new = time_mode(cp, vocab, params, shape, args.reps)
            print(f"| {vocab:>6} | {mode:<14} | {t_old * 1e6:>8.1f} | {t_new * 1e6:>8.1f} | {t_old / t_new:>6.1f} |")
    if problems:
        raise SystemExit("correctness check failed: the split and the single-block kernel differ")


if __name__ == "__main__":
    main()
