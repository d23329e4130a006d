"""Tokenizers: GGUF vocabularies (gpt2 BPE, llama SPM), HF tokenizer.json / tokenizer.model,
streaming detokenization and sandboxed chat templates.

    tok = tokenizer_from_gguf(metadata)           # or tokenizer_from_hf("path/to/hf-folder")
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hi"}]))
    stream = tok.stream(); text = "".join(stream.push(i) for i in ids) + stream.flush()
"""
from .chat import CHATML_TEMPLATE
from .core import Tokenizer
from .gguf import tokenizer_from_gguf
from .hf import tokenizer_from_hf
from .stream import StreamDecoder

__all__ = ["CHATML_TEMPLATE", "StreamDecoder", "Tokenizer", "tokenizer_from_gguf", "tokenizer_from_hf"]
