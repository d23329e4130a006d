// Device-side token sampling: only the chosen token id ever leaves the GPU.
//
// Chain, in llama.cpp's order as engine/sampling.py: repetition penalty on the distinct tokens of a
// device ring buffer (the last `ring_size` tokens) -> greedy argmax (temperature <= 0), or top-k
// candidates -> softmax -> top-p prefix -> min-p -> softmax(logits / temperature) -> draw.
//
// Design: every full pass over the (vocab,) fp32 logits runs on G blocks, each owning the contiguous
// slice [b*slice, min((b+1)*slice, vocab)) (engine/backends/cuda/sampling.py `partition` picks G and
// slice), and only reductions over G partials or a small pool run on one block:
//   sample_scan  (G blocks) penalises the ring tokens of its own slice (slices are disjoint: no race),
//                then in one pass over the slice writes its non-finite flag and its best (value, id)
//                under ranks_before (value descending, id ascending) to partial_bad/_v/_i[b]; block 0
//                resets the pool counters (on the device, so a captured graph replays correctly).
//   sample_pool  (G blocks, temperature > 0 only) reduces the G partials to the top value, then adds
//                its slice's tokens within POOL_CUTOFF*max(T,1) of it (relative probability after the
//                temperature above e^-30) to a global pool: one atomicAdd per block on the counter,
//                stored while the slot < POOL_CAP (the counter still counts the rest: overflow shows).
//                It also counts the tokens within each of N_RUNGS tighter distances (RUNG) of the top.
//   sample_narrow (G blocks, temperature > 0 only) does nothing unless the pool overflowed (a language
//                model's logits usually spread over more than 30 within the top), then refills the pool
//                with the tokens of the loosest rung holding at most POOL_CAP tokens, when it holds at
//                least top_k: every token above a threshold, so the exact top_k of the vocabulary.
//   sample_token (1 block) reports non-finite logits (any partial flag): token_out = -1 and nothing
//                else changes (ring, ring count, position and counter; the logits may hold the penalty),
//                so the host can stop with a clear error instead of feeding an out-of-range id to the
//                next step. Greedy: the best of the G partials. Stochastic: k rounds of an argmax, each
//                restricted to items ranked after the previous pick, so the candidates come sorted
//                (k <= MAX_TOP_K): over the pool (or sample_narrow's) copied into shared memory, on one
//                warp, else (no rung between top_k and POOL_CAP tokens: a very flat distribution) over the
//                whole vocabulary, on the block.
//                Then top-p / min-p / the draw; token_out = id, the ring gets the id, and with advance
//                != 0 the decode position (pos[0]) moves on by one.
// Determinism: the partials and the pool's order depend on scheduling (atomics), but every selection is
// by the total order ranks_before over distinct ids, and the pool is the same set of tokens whatever its
// order (the narrowed pool holds every token ranked before any of its own), so the token is the one the
// single-block kernel (one pass per stage over the whole vocabulary, commit d3595cb, kept in
// dev/cuda/sampler.py) picks for the same logits, seed and counter: greedy exactly np.argmax (the lowest id
// among ties). The candidates are the top min(top_k, pool count) in every case: past POOL_CAP >= MAX_TOP_K
// tokens near the top, that is the top top_k, whichever way they are found.
// Randomness: splitmix64(seed, counter) with the seed and the counter kept on the device, so a captured graph
// draws a fresh number at every replay, and one graph serves generations of any seed (each resets both).

#define MAX_TOP_K 256
#define SAMPLE_THREADS 1024  // sample_token's block
#define POOL_CAP 1024        // candidates kept for the top-k rounds (sample_token copies them to shared memory)
#define POOL_CUTOFF 30.0f    // logits this far (times max(T, 1)) below the top never matter
#define N_RUNGS 12           // sample_narrow's thresholds: the top minus RUNG[r]
#define POOL 0               // pool_count[POOL]: tokens within the cutoff (stored while < POOL_CAP)
#define NARROW 1             // pool_count[NARROW]: tokens of sample_narrow's rung (0: none fits)
#define RUNGS 2              // pool_count[RUNGS + r]: tokens within RUNG[r] of the top
#define POOL_COUNTS (RUNGS + N_RUNGS)

// the rung thresholds' distances below the top, loosest first
__constant__ float RUNG[N_RUNGS] = {16.0f, 11.0f, 8.0f, 5.5f, 4.0f, 2.75f, 2.0f, 1.375f, 1.0f, 0.5f, 0.25f, 0.0f};

// the rung r threshold, computed alike by sample_pool (counting) and sample_narrow (storing)
__device__ __forceinline__ float rung_floor(float top, int r) { return top - RUNG[r]; }

__device__ __forceinline__ bool ranks_before(float av, int ai, float bv, int bi) {
    return av > bv || (av == bv && ai < bi);
}

__device__ __forceinline__ bool non_finite(float v) {
    return (__float_as_uint(v) & 0x7f800000u) == 0x7f800000u;
}

// block-wide best (value, id) of each thread's (best_v, best_i), into *out_v / *out_i (every thread
// may read them after the call)
__device__ __forceinline__ void block_best_of(float best_v, int best_i, float* out_v, int* out_i, float* sv,
                                              int* si) {
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
    block_best_of(best_v, best_i, out_v, out_i, sv, si);
}

// warp-wide best (value, id) among items ranked after (after_v, after_i) (everything when first); items are
// vals[j] with id ids[j]; called by all 32 lanes of a warp, every lane gets the result (the order is total over
// distinct ids, so the butterfly leaves the same item on every lane)
__device__ __forceinline__ void warp_best(const float* vals, const int* ids, int n, bool first, float after_v,
                                          int after_i, float& out_v, int& out_i) {
    float best_v = NEG_INF;
    int best_i = 0x7fffffff;
    for (int j = threadIdx.x & 31; j < n; j += 32) {
        const float v = vals[j];
        const int i = ids[j];
        if (!first && !ranks_before(after_v, after_i, v, i)) continue;
        if (ranks_before(v, i, best_v, best_i)) { best_v = v; best_i = i; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, best_v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, best_i, o);
        if (ranks_before(ov, oi, best_v, best_i)) { best_v = ov; best_i = oi; }
    }
    out_v = best_v;
    out_i = best_i;
}

__device__ __forceinline__ double uniform01(unsigned long long seed, unsigned long long counter) {
    unsigned long long z = seed + (counter + 1ull) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (double)(z >> 11) * (1.0 / 9007199254740992.0);  // [0, 1)
}

// G blocks (any blockDim multiple of 32): penalty on the slice's ring tokens, then one pass -> the partials
extern "C" __global__ void sample_scan(float* __restrict__ logits, int vocab, int slice, const int* __restrict__ ring,
                                       int ring_size, const int* __restrict__ ring_count, float penalty,
                                       float* __restrict__ partial_v, int* __restrict__ partial_i,
                                       int* __restrict__ partial_bad, int* __restrict__ pool_count) {
    __shared__ float sv[32];
    __shared__ int si[32];
    const int start = blockIdx.x * slice, end = min(start + slice, vocab);
    if (blockIdx.x == 0 && threadIdx.x < POOL_COUNTS) pool_count[threadIdx.x] = 0;  // the later launches count from 0

    // 1. repetition penalty on the distinct ring tokens of this slice (a duplicate is skipped by its later
    // copies: the first occurrence penalises)
    if (penalty != 1.0f && ring_size > 0) {
        const int filled = min(*ring_count, ring_size);
        for (int t = threadIdx.x; t < filled; t += blockDim.x) {
            const int tok = ring[t];
            if (tok < start || tok >= end) continue;
            bool duplicate = false;
            for (int s = 0; s < t && !duplicate; ++s) duplicate = ring[s] == tok;
            if (!duplicate) {
                const float v = logits[tok];
                logits[tok] = v > 0.0f ? v / penalty : v * penalty;
            }
        }
        __syncthreads();  // the block's own global writes are visible to it after the barrier
    }

    // 2. one pass: non-finite flag and the best (value, id); ids rise along a thread's items, so a later tie
    // never replaces an earlier one
    bool bad = false;
    float best_v = NEG_INF;
    int best_i = 0x7fffffff;
#pragma unroll 4
    for (int i = start + threadIdx.x; i < end; i += blockDim.x) {
        const float v = logits[i];
        bad |= non_finite(v);
        if (ranks_before(v, i, best_v, best_i)) { best_v = v; best_i = i; }
    }
    bad = __syncthreads_or(bad);
    block_best_of(best_v, best_i, &partial_v[blockIdx.x], &partial_i[blockIdx.x], sv, si);
    if (threadIdx.x == 0) partial_bad[blockIdx.x] = bad;
}

// The top logit, from the G partials (any blockDim multiple of 32); false when a partial saw a non-finite logit
// (every thread gets the same answer).
__device__ bool top_of_partials(const float* __restrict__ partial_v, const int* __restrict__ partial_bad,
                                int n_partials, float* top_out, float* smax) {
    bool bad = false;
    float top = NEG_INF;
    for (int b = threadIdx.x; b < n_partials; b += blockDim.x) {
        bad |= partial_bad[b] != 0;
        top = fmaxf(top, partial_v[b]);
    }
    if (__syncthreads_or(bad)) return false;
    top = warp_max(top);
    if ((threadIdx.x & 31) == 0) smax[threadIdx.x >> 5] = top;
    __syncthreads();
    top = smax[0];
    for (int w = 1; w < (int)(blockDim.x >> 5); ++w) top = fmaxf(top, smax[w]);
    *top_out = top;
    return true;
}

// The slice's logits >= floor_v -> the global pool: gathered in shared memory (one shared atomic per warp and
// step), then one atomicAdd per block on *count (which counts every token, stored or not); stored while the
// slot < POOL_CAP.
__device__ void append_to_pool(const float* __restrict__ logits, int start, int end, float floor_v,
                               float* __restrict__ pool_v, int* __restrict__ pool_i, int* __restrict__ count) {
    __shared__ float local_v[POOL_CAP];
    __shared__ int local_i[POOL_CAP];
    __shared__ int n_local;
    __shared__ int base;
    if (threadIdx.x == 0) n_local = 0;
    __syncthreads();
    const int lane = threadIdx.x & 31;
    for (int i0 = start; i0 < end; i0 += blockDim.x) {  // uniform trip count: every lane reaches the ballot
        const int i = i0 + threadIdx.x;
        const float v = i < end ? logits[i] : NEG_INF;
        const bool take = i < end && v >= floor_v;
        const unsigned mask = __ballot_sync(0xffffffffu, take);
        int first = 0;
        if (lane == 0 && mask) first = atomicAdd(&n_local, __popc(mask));
        first = __shfl_sync(0xffffffffu, first, 0);
        if (take) {
            const int slot = first + __popc(mask & ((1u << lane) - 1u));
            if (slot < POOL_CAP) { local_v[slot] = v; local_i[slot] = i; }
        }
    }
    __syncthreads();
    const int n = n_local;
    if (n == 0) return;
    if (threadIdx.x == 0) base = atomicAdd(count, n);
    __syncthreads();
    const int stored = min(n, POOL_CAP);
    for (int j = threadIdx.x; j < stored && base + j < POOL_CAP; j += blockDim.x) {
        pool_v[base + j] = local_v[j];
        pool_i[base + j] = local_i[j];
    }
}

// G blocks (the scan's grid and slice; blockDim a multiple of 32): the top value from the partials, then the
// slice's tokens within the cutoff of it -> the global pool (counts[POOL]); and the slice's counts of the
// tokens within RUNG[r] of the top -> counts[RUNGS + r], for sample_narrow
extern "C" __global__ void sample_pool(const float* __restrict__ logits, int vocab, int slice, float temperature,
                                       const float* __restrict__ partial_v, const int* __restrict__ partial_bad,
                                       float* __restrict__ pool_v, int* __restrict__ pool_i,
                                       int* __restrict__ pool_count) {
    __shared__ float smax[32];
    __shared__ int rung_count[N_RUNGS];
    float top;
    if (!top_of_partials(partial_v, partial_bad, gridDim.x, &top, smax)) return;  // sample_token reports it
    const int start = blockIdx.x * slice, end = min(start + slice, vocab);
    append_to_pool(logits, start, end, top - POOL_CUTOFF * fmaxf(temperature, 1.0f), pool_v, pool_i,
                   &pool_count[POOL]);

    // the rungs' counts (read by sample_narrow only when the pool overflowed)
    float threshold[N_RUNGS];
    int n[N_RUNGS];
#pragma unroll
    for (int r = 0; r < N_RUNGS; ++r) { threshold[r] = rung_floor(top, r); n[r] = 0; }
    if (threadIdx.x < N_RUNGS) rung_count[threadIdx.x] = 0;
    __syncthreads();
    for (int i = start + threadIdx.x; i < end; i += blockDim.x) {
        const float v = logits[i];
#pragma unroll
        for (int r = 0; r < N_RUNGS; ++r) n[r] += v >= threshold[r];
    }
#pragma unroll
    for (int r = 0; r < N_RUNGS; ++r) {
        int c = n[r];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) c += __shfl_xor_sync(0xffffffffu, c, o);
        if ((threadIdx.x & 31) == 0 && c) atomicAdd(&rung_count[r], c);
    }
    __syncthreads();
    if (threadIdx.x < N_RUNGS && rung_count[threadIdx.x]) atomicAdd(&pool_count[RUNGS + threadIdx.x],
                                                                     rung_count[threadIdx.x]);
}

// G blocks (the scan's grid and slice), temperature > 0 only. When the pool overflowed (more than POOL_CAP
// tokens within the cutoff: the usual case for a language model's logits), the loosest rung holding at most
// POOL_CAP tokens, if it holds at least top_k, refills the pool (counts[NARROW]): every token >= a threshold
// is in it, so it holds the exact top_k of the whole vocabulary, the candidates the whole-vocabulary rounds
// would find. No such rung (counts jump past POOL_CAP between rungs, or fewer than top_k tie at the top):
// counts[NARROW] stays 0 and sample_token runs the whole-vocabulary rounds.
extern "C" __global__ void sample_narrow(const float* __restrict__ logits, int vocab, int slice, int top_k,
                                         const float* __restrict__ partial_v, const int* __restrict__ partial_bad,
                                         float* __restrict__ pool_v, int* __restrict__ pool_i,
                                         int* __restrict__ pool_count) {
    __shared__ float smax[32];
    if (pool_count[POOL] <= POOL_CAP) return;  // the pool holds every token that matters (or non-finite logits)
    int rung = 0;
    while (rung < N_RUNGS && pool_count[RUNGS + rung] > POOL_CAP) ++rung;
    if (rung == N_RUNGS || pool_count[RUNGS + rung] < top_k) return;
    float top;
    if (!top_of_partials(partial_v, partial_bad, gridDim.x, &top, smax)) return;
    const int start = blockIdx.x * slice, end = min(start + slice, vocab);
    append_to_pool(logits, start, end, rung_floor(top, rung), pool_v, pool_i, &pool_count[NARROW]);
}

// 1 block of SAMPLE_THREADS: the token from the partials (greedy) or the pool (stochastic)
extern "C" __global__ void sample_token(const float* __restrict__ logits, int vocab,
                                        const float* __restrict__ partial_v, const int* __restrict__ partial_i,
                                        const int* __restrict__ partial_bad, int n_partials,
                                        const float* __restrict__ pool_v, const int* __restrict__ pool_i,
                                        const int* __restrict__ pool_count, int* __restrict__ ring, int ring_size,
                                        int* __restrict__ ring_count, float temperature, int top_k, float top_p,
                                        float min_p, const unsigned long long* __restrict__ seed,
                                        unsigned long long* __restrict__ counter,
                                        int* __restrict__ token_out, int* __restrict__ pos, int advance) {
    __shared__ float sv[32];
    __shared__ int si[32];
    __shared__ float cand_v[MAX_TOP_K];
    __shared__ int cand_i[MAX_TOP_K];
    __shared__ int chosen;

    // non-finite logits: report, sample nothing
    bool bad = false;
    for (int b = threadIdx.x; b < n_partials; b += blockDim.x) bad |= partial_bad[b] != 0;
    if (__syncthreads_or(bad)) {
        if (threadIdx.x == 0) *token_out = -1;
        return;
    }

    if (temperature <= 0.0f) {
        float v;
        block_best(partial_v, partial_i, n_partials, true, 0.0f, 0, &v, &chosen, sv, si);
    } else {
        __shared__ float shared_v[POOL_CAP];
        __shared__ int shared_i[POOL_CAP];
        const int n_pool = pool_count[POOL];
        const bool pooled = n_pool <= POOL_CAP;
        const int k = min(top_k, pooled ? n_pool : vocab);
        // the pool, or sample_narrow's (>= k tokens, every one above a threshold); 0: the whole vocabulary
        const int n_src = pooled ? n_pool : pool_count[NARROW];
        if (n_src > 0) {  // the rounds on one warp (<= 32 items a lane, no block barrier per round)
            for (int j = threadIdx.x; j < n_src; j += blockDim.x) {
                shared_v[j] = pool_v[j];
                shared_i[j] = pool_i[j];
            }
            __syncthreads();
            if (threadIdx.x < 32) {
                float v = 0.0f;
                int i = 0;
                for (int r = 0; r < k; ++r) {
                    warp_best(shared_v, shared_i, n_src, r == 0, v, i, v, i);
                    if (threadIdx.x == 0) { cand_v[r] = v; cand_i[r] = i; }
                }
            }
            __syncthreads();
        } else {  // the whole vocabulary, on the block
            for (int r = 0; r < k; ++r)
                block_best(logits, nullptr, vocab, r == 0, r ? cand_v[r - 1] : 0.0f, r ? cand_i[r - 1] : 0,
                           &cand_v[r], &cand_i[r], sv, si);
        }
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
            const double u = uniform01(*seed, *counter) * mass;
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
