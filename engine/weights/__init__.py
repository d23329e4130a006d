"""Memory-mapped model-file readers (GGUF, safetensors) and ggml block dequantization."""
from .gguf import GGUFFile, TensorInfo
from .quant import GGMLType, block_layout, dequantize, tensor_nbytes
from .safetensors import SafetensorsCheckpoint, SafetensorsFile

__all__ = [
    "GGMLType",
    "GGUFFile",
    "SafetensorsCheckpoint",
    "SafetensorsFile",
    "TensorInfo",
    "block_layout",
    "dequantize",
    "tensor_nbytes",
]
