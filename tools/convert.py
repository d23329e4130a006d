"""Weight conversion without the `engine` entry point: the same commands as `engine convert` / `engine quantize`.

    python tools/convert.py convert HF_DIR out.gguf --type q8_0
    python tools/convert.py convert MODEL.gguf out_dir/ --to hf --dtype bf16
    python tools/convert.py quantize in.gguf out.gguf q4_k_m
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from engine.cli import run  # noqa: E402
from engine.convert.commands import convert, quantize  # noqa: E402

tools_cli = click.Group(name="convert.py", commands={"convert": convert, "quantize": quantize},
                        help="Convert between HF safetensors and GGUF, and re-quantize GGUF files.")

if __name__ == "__main__":
    run(tools_cli)
