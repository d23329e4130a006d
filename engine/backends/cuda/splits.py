"""How many slices the keys of one block's attention work are cut into (flash-decoding's split-K), for every
attention kernel: the one rule, with each kernel's own parameters.

    splits = max(1, min(ceil(slots / blocks), keys // min_keys_per_split, max_splits))

blocks: the launch's blocks without splitting (row blocks x KV heads [x queries]); slots: how many blocks the GPU
runs at once that the launch should fill (resident blocks per SM x SMs, or a multiple of the SM count); keys: the
keys each block scans (for decode the cache capacity, so that a captured graph stays valid as the context grows --
the slices themselves are computed on the device from the positions); min_keys_per_split: a few tiles, so a
slice's fixed cost (its query rotation, its partial result and the combine) stays small beside its keys.
"""
from __future__ import annotations

import math


def key_splits(blocks: int, slots: int, keys: int, min_keys_per_split: int, max_splits: int) -> int:
    """The number of key slices (>= 1) for a launch of `blocks` blocks over `keys` keys each."""
    wanted = math.ceil(slots / max(blocks, 1))
    return max(1, min(wanted, keys // min_keys_per_split, max_splits))


def sm_count(cp) -> int:
    return cp.cuda.runtime.deviceGetAttribute(cp.cuda.runtime.cudaDevAttrMultiProcessorCount, cp.cuda.Device().id)
