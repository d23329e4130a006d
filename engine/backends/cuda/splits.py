"""How many slices the keys of one block's attention work are cut into (flash-decoding's split-K), for every
attention kernel: the one rule, with each kernel's own parameters.

    splits = max(1, min(ceil(slots / blocks), keys // min_keys_per_split, max_splits))
    (one_wave: floor(slots / blocks) instead of the ceiling)

blocks: the launch's blocks without splitting (row blocks x KV heads [x queries]); slots: how many blocks the GPU
runs at once that the launch should fill (resident blocks per SM x SMs, or a multiple of the SM count); keys: the
keys each block scans (for decode the cache capacity, so that a captured graph stays valid as the context grows --
the slices themselves are computed on the device from the positions); min_keys_per_split: a few tiles, so a
slice's fixed cost (its query rotation, its partial result and the combine) stays small beside its keys.
one_wave: the blocks must not spill into a second wave, whose few blocks would each take a whole slice's time
(decode, where every block's slice is equally long: Llama-2-7B's 32 KV heads at 264 slots took 9 slices, 288
blocks, 222 us a layer at 32k on an H100, against 182 us with 8 slices, 256 blocks).
"""
from __future__ import annotations

import math


def key_splits(blocks: int, slots: int, keys: int, min_keys_per_split: int, max_splits: int,
               one_wave: bool = False) -> int:
    """The number of key slices (>= 1) for a launch of `blocks` blocks over `keys` keys each."""
    wanted = slots // max(blocks, 1) if one_wave else math.ceil(slots / max(blocks, 1))
    return max(1, min(wanted, keys // min_keys_per_split, max_splits))


_SM_COUNTS: dict[int, int] = {}  # device -> its streaming multiprocessors


def sm_count(cp) -> int:
    """Streaming multiprocessors of the current GPU (asked of the driver once a GPU: prefill asks every layer)."""
    device = cp.cuda.runtime.getDevice()
    if device not in _SM_COUNTS:
        _SM_COUNTS[device] = cp.cuda.runtime.deviceGetAttribute(cp.cuda.runtime.cudaDevAttrMultiProcessorCount,
                                                                device)
    return _SM_COUNTS[device]
