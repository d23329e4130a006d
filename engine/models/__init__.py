"""Model families: their tensor tables and names (family.py) and the forward pass they share (llama.py: Llama 1-3,
Mistral without sliding window, SmolLM; Qwen2 / Qwen2.5 with their Q/K/V biases)."""
from __future__ import annotations

from .family import FAMILIES, LLAMA, QWEN2, Family, family, family_of_hf
from .llama import Llama

__all__ = ["FAMILIES", "LLAMA", "QWEN2", "Family", "Llama", "family", "family_of_hf"]
