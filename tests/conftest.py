"""Shared pytest hooks: tests marked `cuda` skip cleanly where CuPy or a GPU is missing."""
from __future__ import annotations

import os

# One OpenBLAS thread for the tests and the engine processes they start, unless set: on a shared or loaded machine
# OpenBLAS's spinning worker threads make small products 10-50x slower (docs/results.md); tests check results.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    cuda_items = [item for item in items if item.get_closest_marker("cuda")]
    if not cuda_items:
        return
    from engine.backends import cuda_unavailable_reason

    reason = cuda_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"needs CUDA: {reason}")
    for item in cuda_items:
        item.add_marker(skip)
