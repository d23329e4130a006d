"""The installable package: pyproject.toml lists every import package, and a wheel carries the CUDA sources."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import setuptools

REPO = Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_package():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set(setuptools.find_packages(REPO, include=["engine", "engine.*"]))
    assert set(config["packages"]) == found | {"engine.kernel_sources"}
    assert config["package-dir"] == {"engine.kernel_sources": "kernels"}


def test_install_carries_kernel_sources(tmp_path):
    """setuptools' build_py (what a wheel is packed from) puts kernels/ at engine/kernel_sources, where the
    loader finds it."""
    subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q", "build_py", "--build-lib",
                    str(tmp_path)], cwd=REPO, check=True, capture_output=True)
    built = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    sources = {f"engine/kernel_sources/{p.name}" for p in (REPO / "kernels").iterdir() if p.suffix in (".cu", ".cuh")}
    assert sources and sources <= built
    assert "engine/backends/cuda/kernels.py" in built
    found = subprocess.run([sys.executable, "-c", "from engine.backends.cuda import kernels; print(kernels.KERNEL_DIR)"],
                           cwd=tmp_path, check=True, capture_output=True, text=True).stdout.strip()
    assert Path(found) == tmp_path / "engine" / "kernel_sources"
