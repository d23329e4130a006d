// DCA positions (design.md §3): the one place every kernel takes them from. Prepended after common.cuh to every
// file whose kernels rotate keys or queries (elementwise, attention, the fused attention and decode kernels).

struct Dca {
    int chunk_len, chunk_size;  // chunk_len 0: plain causal attention
    // the chunk of position p (0 without DCA)
    __device__ __forceinline__ int chunk(int p) const { return chunk_len > 0 ? p / chunk_len : 0; }
    // the position a key at absolute position j is rotated (and cached) at
    __device__ __forceinline__ int key_position(int j) const { return chunk_len > 0 ? j % chunk_len : j; }
    // relation of a query in chunk `query_chunk` to the key at position j: 0 intra, 1 successive, 2 inter
    __device__ __forceinline__ int relation_in(int query_chunk, int j) const {
        return chunk_len > 0 ? min(max(query_chunk - j / chunk_len, 0), 2) : 0;
    }
    // relation of query position i to key position j
    __device__ __forceinline__ int relation(int i, int j) const { return relation_in(chunk(i), j); }
    // the position a query at `pos` is rotated at for relation `rel`
    __device__ __forceinline__ int query_position(int pos, int rel) const {
        if (chunk_len == 0) return pos;
        const int intra = pos % chunk_len;
        return rel == 0 ? intra : rel == 1 ? min(chunk_len + intra, chunk_size) : min(2 * chunk_len - 1, chunk_size);
    }
};
