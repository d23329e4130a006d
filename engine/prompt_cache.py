"""Session files: a session's token ids, KV cache and chat on disk, so a processed document is restored
instead of prefilled again (llama.cpp's ``--prompt-cache``). The format is described in docs/session_files.md.

A safetensors file with three tensors (n = the tokens the cache holds):
    tokens  (n,) int32                                  the ids, in order
    k, v    (n_layers, n, n_kv_heads, head_dim)         the cache rows as stored: F32 (CPU), F16, or U16 holding
                                                        bf16 bit patterns (CUDA); keys rotated at their DCA position
            (n_layers, n, n_kv_heads, row_bytes)        U8: a CPU cache of another type (--cache-type-k/-v f16,
                                                        q8_0, ...) or a CUDA q8_0 one: each head's row as ggml
                                                        bytes of that type
and string metadata: format, format_version, engine_version, messages (the chat, JSON) and the settings
that decide what the cached rows mean, all of which must match to load: model (a hash of the model's
header and tensor index, never of its weights), dtype, dca, rope, context, attention_temperature,
cache_types ("K/V", e.g. "q8_0/q8_0"; files without it hold the backend's own type, "f32/f32" on the CPU).
Files are written under a temporary name in the target folder and renamed when complete, streamed
(safetensors_writer.py: the bytes safetensors.numpy.save_file writes) from the cache's row chunks.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open

from . import extensions
from .errors import ConfigError, EngineError
from .safetensors_writer import StreamedTensor, write_safetensors
from .weights.gguf import GGUFFile
from .weights.safetensors import SafetensorsFile

FORMAT = "engine.session"
FORMAT_VERSION = "1"
SETTINGS = ("model", "dtype", "dca", "rope", "context", "attention_temperature", "cache_types")


class SessionFileError(EngineError):
    """A session file is unreadable, truncated, malformed, or was made with another model or settings."""


def model_identity(path: Path, opened: GGUFFile | None = None) -> str:
    """sha256 of what identifies a model cheaply, never all its weights: every file's bytes before the tensor data
    (GGUF: header, metadata, tensor index; safetensors: the JSON header), the first SAMPLE_BYTES of every tensor
    (fine-tunes of one architecture differ there), and an HF folder's config.json. opened: the GGUF file at `path`
    already parsed (the loader's): hashed without parsing it again (~40 ms for a 49k-token vocabulary). Remembered
    per path and modification times for the process."""
    path = Path(path).resolve()
    files = sorted(path.glob("*.safetensors")) + [path / "config.json"] if path.is_dir() else [path]
    key = (path, tuple(f.stat().st_mtime_ns for f in files))
    if key not in _IDENTITIES:
        _IDENTITIES[key] = _identity(path, opened)
        while len(_IDENTITIES) > IDENTITIES_KEPT:
            _IDENTITIES.pop(next(iter(_IDENTITIES)), None)
    return _IDENTITIES[key]


SAMPLE_BYTES = 4096
IDENTITIES_KEPT = 8
_IDENTITIES: dict[tuple[Path, tuple[int, ...]], str] = {}  # (path, mtimes) -> identity, oldest first


def _identity(path: Path, opened: GGUFFile | None) -> str:
    digest = hashlib.sha256()
    if path.is_dir():
        digest.update((path / "config.json").read_bytes())
        files = [SafetensorsFile(shard) for shard in sorted(path.glob("*.safetensors"))]
    else:
        files = [opened if opened is not None else GGUFFile(path)]
    for f in files:
        data_start = min((t.offset for t in f.tensors.values()), default=0)
        with open(f.path, "rb") as raw:
            digest.update(raw.read(data_start))
        for name in sorted(f.tensors):
            digest.update(bytes(f.raw(name)[:SAMPLE_BYTES]))
        if f is not opened:
            f.close()
    return digest.hexdigest()


def session_settings(llm: Any) -> dict[str, str]:
    """The settings a session file records and must match to be loaded, as strings."""
    rope = llm.config.rope
    rope_fields = {f.name: getattr(rope, f.name) for f in dataclasses.fields(rope) if f.name != "freq_factors"}
    if rope.freq_factors is not None:
        rope_fields["freq_factors_sha256"] = hashlib.sha256(np.asarray(rope.freq_factors, np.float64)).hexdigest()
    return {
        "model": model_identity(llm.loaded.path, llm.loaded.gguf),
        "dtype": llm.dtype,
        "dca": extensions.setting(llm.dca, llm.extension),  # the attention layout: DCA, Self-Extend, StreamingLLM
        "rope": json.dumps(rope_fields, sort_keys=True),
        "context": str(llm.context),
        "attention_temperature": "on" if llm.model.temperature_length is not None else "off",
        "cache_types": "/".join(llm.cache_types),
    }


def save_session(session: Any, path: Path) -> None:
    """Write the session's tokens, cache rows and chat to `path` atomically: the header first, then the rows straight
    from the cache, a chunk of one layer's rows at a time (KVCache.host_row_chunks: on a GPU the next chunk is copied
    to the host while one is written), so the cache is never gathered in host memory. ConfigError when the file
    cannot be written (no folder, no permission, disk full); the temporary file is removed then."""
    from . import __version__

    cache = session.cache
    (k_shape, k_dtype), (v_shape, v_dtype) = cache.stored_layout(cache.length)  # (n_layers, n, n_kv_heads, row)
    tensors = {"tokens": np.asarray(session.tokens, dtype=np.int32),
               "k": StreamedTensor(k_dtype, k_shape, functools.partial(cache.host_row_chunks, "k")),
               "v": StreamedTensor(v_dtype, v_shape, functools.partial(cache.host_row_chunks, "v"))}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "engine_version": __version__,
                "messages": json.dumps(session.messages), **session_settings(session.llm)}
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as f:
            write_safetensors(f, tensors, metadata)
        os.replace(temporary, path)
    except OSError as e:
        raise ConfigError(f"cannot write session file {path}: {e.strerror or e}") from None
    finally:
        temporary.unlink(missing_ok=True)


def load_session(session: Any, path: Path) -> None:
    """Replace the session's tokens, cache rows and chat by the file's; SessionFileError when it cannot be."""
    llm = session.llm
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            _check_metadata(path, metadata, session_settings(llm))
            missing = {"tokens", "k", "v"} - set(f.keys())
            if missing:
                raise SessionFileError(f"{path}: not a complete session file (no {', '.join(sorted(missing))})")
            tokens = f.get_tensor("tokens")
        k, v = tensor_bytes(path, ("k", "v"))  # where the rows lie in the file
    except FileNotFoundError:
        raise SessionFileError(f"{path}: no such session file") from None
    except (SafetensorError, OSError, ValueError, KeyError) as e:
        raise SessionFileError(f"{path}: not a readable session file (truncated or corrupt: {e})") from None
    c = llm.config
    expected = session.cache.stored_layout(len(tokens))  # [(shape, dtype) of the keys, of the values]
    if tokens.ndim != 1 or tokens.dtype != np.int32 or [(k.shape, k.dtype), (v.shape, v.dtype)] != expected:
        raise SessionFileError(f"{path}: malformed session file (tokens {tokens.shape} {tokens.dtype}, keys "
                               f"{k.shape} {k.dtype}, values {v.shape} {v.dtype}; expected keys "
                               f"{expected[0][0]} {expected[0][1]}, values {expected[1][0]} {expected[1][1]})")
    if len(tokens) and (tokens.min() < 0 or tokens.max() >= c.vocab_size):
        raise SessionFileError(f"{path}: malformed session file (token ids outside [0, {c.vocab_size}))")
    if len(tokens) > llm.context:
        raise SessionFileError(f"{path}: holds {len(tokens)} tokens, more than the context of {llm.context}")
    messages = _messages(path, metadata.get("messages", "[]"))
    session.tokens = []
    session.cache.truncate(0)  # a read that fails half way leaves an empty session, not rows of two sequences
    _load_rows(session.cache, path, k, v, llm.dtype)
    session.tokens = tokens.tolist()  # Python ints
    session.messages = messages


# safetensors dtype names of the tensors a session file holds
_NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "U16": np.uint16, "U8": np.uint8, "I32": np.int32}


@dataclass(frozen=True)
class TensorBytes:
    """Where a session file's (n_layers, n, n_kv_heads, row) key or value tensor lies: its first byte in the file,
    its shape and dtype."""

    offset: int
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def row_bytes(self) -> int:
        """Bytes of one token's row of one layer: every KV head's."""
        return int(np.prod(self.shape[2:])) * self.dtype.itemsize


def tensor_bytes(path: Path, names: tuple[str, ...]) -> list[TensorBytes]:
    """Where the named tensors of a safetensors file that safe_open has already checked lie
    (header length u64 | JSON header | data; offsets relative to the data)."""
    with open(path, "rb") as raw:
        header_len = int(np.frombuffer(raw.read(8), "<u8")[0])
        header = json.loads(raw.read(header_len))
    tensors = []
    for name in names:
        entry = header[name]
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        dtype = np.dtype(_NUMPY_DTYPES[entry["dtype"]])
        if end - begin != int(np.prod(shape)) * dtype.itemsize:
            raise ValueError(f"tensor {name} has {end - begin} bytes for shape {shape} {entry['dtype']}")
        tensors.append(TensorBytes(8 + header_len + begin, shape, dtype))
    return tensors


def _load_rows(cache: Any, path: Path, k: TensorBytes, v: TensorBytes, dtype: str) -> None:
    """cache <- the file's rows (checked against its stored layout). A GPU cache (activation dtype `dtype`) reads them
    through pinned buffers (engine/restore.py); the CPU's copies them from a memory map of the file, a layer at a time
    (KVCache.load_rows: no host copy of the rows before the cache's own)."""
    if getattr(cache, "parts", [cache])[0].xp is not np:
        from .restore import device_restore

        device_restore(cache, path, {"k": k, "v": v}, dtype)
        return
    try:
        rows = [np.memmap(path, dtype=t.dtype, mode="r", offset=t.offset, shape=t.shape)
                if np.prod(t.shape) else np.empty(t.shape, t.dtype) for t in (k, v)]
    except (OSError, ValueError) as e:  # the file shrank since safe_open checked it
        raise SessionFileError(f"{path}: not a readable session file (truncated or corrupt: {e})") from None
    cache.load_rows(*rows)


def _check_metadata(path: Path, metadata: dict[str, str], settings: dict[str, str]) -> None:
    if metadata.get("format") != FORMAT:
        raise SessionFileError(f"{path}: not an engine session file (format {metadata.get('format')!r})")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise SessionFileError(f"{path}: session format version {metadata.get('format_version')!r} is not "
                               f"supported (this engine reads version {FORMAT_VERSION})")
    native = f"{metadata.get('dtype')}/{metadata.get('dtype')}"  # files from before cache_types: the backend's own
    for key in SETTINGS:
        saved = metadata.get(key, native if key == "cache_types" else None)
        if saved != settings[key]:
            if key == "model":
                raise SessionFileError(f"{path}: was saved with another model file; load the model it was made "
                                       f"with, or delete the file")
            raise SessionFileError(f"{path}: was saved with {key} {saved}, but the model runs with "
                                   f"{key} {settings[key]}; use the same settings, or delete the file")


def _messages(path: Path, text: str) -> list[dict[str, str]]:
    try:
        messages = json.loads(text)
    except ValueError:
        messages = None
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise SessionFileError(f"{path}: malformed session file (its chat messages are not a list of "
                               f"role/content pairs)")
    return messages
