"""Weight conversion: HF safetensors -> GGUF, GGUF -> HF, and GGUF re-quantization, streamed one tensor
at a time into outputs that appear only when complete.

    from engine.convert import convert_hf_to_gguf, convert_gguf_to_hf, quantize_gguf
    convert_hf_to_gguf("hf_dir", "model-q8_0.gguf", "q8_0")
    convert_gguf_to_hf("model.gguf", "hf_dir", dtype="bf16")
    quantize_gguf("model-f16.gguf", "model-q4_k_m.gguf", "q4_k_m")

Command line: ``engine convert`` and ``engine quantize`` (``engine.convert.commands``), or
``python tools/convert.py``.
"""
from .gguf_to_hf import convert_gguf_to_hf
from .hf_to_gguf import convert_hf_to_gguf
from .quantize import encode_rows
from .requantize import quantize_gguf
from .writer import WriteStats

__all__ = ["WriteStats", "convert_gguf_to_hf", "convert_hf_to_gguf", "encode_rows", "quantize_gguf"]
