"""--device selection: auto falls back to the CPU, cuda says exactly what is missing (runs everywhere)."""
from __future__ import annotations

import sys

import pytest

from engine.backends import cuda_unavailable_reason, get_backend
from engine.backends.numpy_backend import NumpyBackend
from engine.errors import ConfigError, DeviceError


def test_without_cupy_cuda_names_the_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # makes `import cupy` raise ImportError
    assert "CuPy is not installed" in cuda_unavailable_reason()
    with pytest.raises(DeviceError, match="--device cuda is unavailable: CuPy is not installed"):
        get_backend("cuda")
    assert isinstance(get_backend("auto"), NumpyBackend)


def test_auto_and_cuda_follow_what_this_machine_has():
    reason = cuda_unavailable_reason()
    if reason is None:
        assert get_backend("auto").name == "cuda" == get_backend("cuda").name
    else:
        assert isinstance(get_backend("auto"), NumpyBackend)
        with pytest.raises(DeviceError) as info:
            get_backend("cuda")
        assert reason in str(info.value) and "\n" not in str(info.value)


def test_unknown_device_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        get_backend("tpu")
