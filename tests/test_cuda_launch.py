"""The dependent (programmatic) launch's host side, without a GPU: the driver structures' layout, the argument
marshalling, and the refusal of a kernel that does not wait."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest

from engine.backends.cuda import launch as launch_module
from engine.errors import DeviceError


def test_driver_structures_have_the_driver_layout():
    # CUlaunchAttribute: 4-byte id, 4 bytes of padding, a 64-byte union; CUlaunchConfig: 7 uints, the stream at 32
    assert ctypes.sizeof(launch_module._LaunchAttribute) == 72
    assert launch_module._LaunchAttribute.value.offset == 8
    assert launch_module._LaunchConfig.hStream.offset == 32
    assert launch_module._LaunchConfig.attrs.offset == 40
    assert launch_module._LaunchConfig.numAttrs.offset == 48
    assert ctypes.sizeof(launch_module._LaunchConfig) == 56


class _DeviceArray:  # what _argument reads of a cupy.ndarray
    class data:
        ptr = 0x7F0012345600


def test_arguments_marshal_as_their_parameter_types():
    values = [launch_module._argument(a) for a in (_DeviceArray(), np.int32(-3), np.uint64(0), np.float32(0.5),
                                                    np.int64(1 << 40))]
    assert [type(v) for v in values] == [ctypes.c_void_p, ctypes.c_int32, ctypes.c_uint64, ctypes.c_float,
                                         ctypes.c_int64]
    assert [v.value for v in values] == [0x7F0012345600, -3, 0, 0.5, 1 << 40]
    with pytest.raises(DeviceError, match="int"):
        launch_module._argument(3)  # a Python int has no fixed width


def test_a_kernel_that_does_not_wait_is_not_launched_dependent():
    class Kernel:
        name = "sample_token"

    with pytest.raises(DeviceError, match="sample_token does not wait"):
        launch_module.launch(Kernel(), (1,), (32,), (), 0, dependent=True)
