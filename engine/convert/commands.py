"""Click commands ``engine convert`` and ``engine quantize`` (registered in engine/cli.py).

    engine convert HF_DIR out.gguf [--type TYPE] [--pre NAME] [-t N] [--force]
    engine convert MODEL.gguf out_dir/ [--to hf] [--dtype f32|bf16|f16] [--force]
    engine convert MODEL.gguf out.gguf --type TYPE [-t N] [--force]        (same as engine quantize)
    engine quantize in.gguf out.gguf TYPE [-t N] [--force]

TYPE is a llama.cpp file type (mixture.FILE_TYPES): f32 f16 bf16 q8_0 q6_k q5_k_m q5_k_s q5_1 q5_0
q4_k_m q4_k_s q4_1 q4_0. -t/--threads: tensors are encoded on N threads (default: every available CPU,
as llama-quantize); the bytes do not depend on N.

Progress and the closing summary go to stderr. Errors are EngineErrors (one line from the CLI).
"""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import ConfigError, ModelFormatError
from .gguf_to_hf import DTYPES, convert_gguf_to_hf
from .hf_to_gguf import convert_hf_to_gguf
from .mixture import FILE_TYPES, file_type_from_name
from .requantize import quantize_gguf

DEFAULT_GGUF_TYPE = "f16"  # as llama.cpp's convert_hf_to_gguf.py
DEFAULT_HF_DTYPE = "f32"  # dequantized values kept exactly
THREADS_OPTION = click.option("-t", "--threads", type=int, default=None,
                              help="threads that encode tensors  [default: every available CPU]")


@click.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--to", "target", type=click.Choice(["gguf", "hf"]), default=None,
              help="output format  [default: gguf for an HF folder or a DEST ending in .gguf, else hf]")
@click.option("--type", "tensor_type", default=None,
              help=f"GGUF file type ({' '.join(FILE_TYPES)}), with llama-quantize's per-tensor choices  "
                   f"[default: {DEFAULT_GGUF_TYPE}]")
@click.option("--dtype", type=click.Choice(list(DTYPES)), default=None,
              help=f"safetensors dtype with --to hf  [default: {DEFAULT_HF_DTYPE}]")
@click.option("--pre", default=None, help="tokenizer.ggml.pre to write instead of the detected one (BPE)")
@THREADS_OPTION
@click.option("--force", is_flag=True, help="overwrite an existing output")
@click.option("--no-progress", is_flag=True, help="no progress bar")
def convert(source: Path, dest: Path, target: str | None, tensor_type: str | None, dtype: str | None,
            pre: str | None, threads: int | None, force: bool, no_progress: bool) -> None:
    """Convert an HF Llama folder to GGUF, or a GGUF model to an HF folder."""
    if not source.exists():
        raise ModelFormatError(f"{source}: no such file or directory")
    if tensor_type is not None:
        file_type_from_name(tensor_type)
    target = target or ("gguf" if source.is_dir() or dest.suffix.lower() == ".gguf" else "hf")
    if target == "hf":
        if source.is_dir():
            raise ConfigError(f"{source}: is already an HF folder; --to hf needs a GGUF file")
        _refuse("when exporting to HF", type=tensor_type, pre=pre, threads=threads)
        stats = convert_gguf_to_hf(source, dest, dtype or DEFAULT_HF_DTYPE, force, progress=not no_progress)
    elif source.is_dir():
        _refuse("when converting to GGUF", dtype=dtype)
        stats = convert_hf_to_gguf(source, dest, tensor_type or DEFAULT_GGUF_TYPE, force, pre,
                                   progress=not no_progress, threads=threads)
    else:
        _refuse("when converting GGUF to GGUF", dtype=dtype, pre=pre)
        if tensor_type is None:
            raise ConfigError("GGUF -> GGUF needs --type (or use: engine quantize IN OUT TYPE)")
        stats = quantize_gguf(source, dest, tensor_type, force, progress=not no_progress, threads=threads)
    click.echo(stats.summary(), err=True)


@click.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("dest", type=click.Path(path_type=Path))
@click.argument("tensor_type", metavar="TYPE")
@THREADS_OPTION
@click.option("--force", is_flag=True, help="overwrite an existing output")
@click.option("--no-progress", is_flag=True, help="no progress bar")
def quantize(source: Path, dest: Path, tensor_type: str, threads: int | None, force: bool, no_progress: bool) -> None:
    """Re-quantize a GGUF model to file type TYPE, choosing each tensor's type as llama-quantize does.

    TYPE: f32 f16 bf16 q8_0 q6_k q5_k_m q5_k_s q5_1 q5_0 q4_k_m q4_k_s q4_1 q4_0."""
    file_type_from_name(tensor_type)
    if source.is_dir():
        raise ConfigError(f"{source}: is a folder; quantize reads a GGUF file (an HF folder converts with: "
                          f"engine convert {source} {dest} --type {tensor_type})")
    if not source.is_file():
        raise ModelFormatError(f"{source}: no such file")
    stats = quantize_gguf(source, dest, tensor_type, force, progress=not no_progress, threads=threads)
    click.echo(stats.summary(), err=True)


def _refuse(context: str, **options: str | None) -> None:
    given = [f"--{name}" for name, value in options.items() if value is not None]
    if given:
        raise ConfigError(f"{', '.join(given)}: not used {context}")
