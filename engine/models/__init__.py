"""Model families, one module each (mlx-lm's models/ shape): the family's tensor table, typed weights and
forward pass. Today: ``llama`` (Llama 1-3, Mistral without sliding window, SmolLM)."""
from __future__ import annotations

from . import llama
from .llama import Llama

__all__ = ["Llama", "llama"]
