"""Whether NVRTC (CuPy's, from the nvidia-cuda-nvrtc wheel) works here: the kernel tests that compile CUDA sources
without a GPU skip where it does not."""
import pytest


def nvrtc_usable() -> bool:
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()
        return True
    except Exception:
        return False


requires_nvrtc = pytest.mark.skipif(not nvrtc_usable(), reason="NVRTC library not found (nvidia-cuda-nvrtc wheel)")
