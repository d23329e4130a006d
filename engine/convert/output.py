"""Outputs that appear whole or not at all, and user-facing reporting on stderr.

A file is written to a temporary name in its destination folder and renamed over the final name
when complete; an HF folder is assembled in a temporary sibling folder and renamed into place. Any
failure (a bad tensor, a full disk, Ctrl-C) removes the temporary output, so nothing half-written
is ever left, under the final name or another. A run killed outright (SIGKILL, power loss) cannot
clean up: its temporary is named ``.NAME.PID.XXXX.partial`` and the next run writing NAME removes
those whose process no longer exists. An existing output is replaced only with --force;
a non-empty folder only if it looks like a model folder (holds config.json), so a mistyped path
cannot wipe an unrelated directory.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import click

from ..errors import ConfigError

PARTIAL_SUFFIX = ".partial"


def warn(message: str) -> None:
    """One warning line on stderr."""
    click.echo(f"warning: {message}", err=True)


def progress_bar(total_bytes: int, label: str, enabled: bool):
    """A click progress bar on stderr counting bytes (a no-op context when disabled)."""
    if not enabled:
        return contextlib.nullcontext(None)
    return click.progressbar(length=total_bytes, label=label, file=sys.stderr, show_pos=False)


def check_file_destination(dest: Path, force: bool, source: Path | None = None) -> None:
    """Refuse before any work: an existing file without force, a folder, a missing parent, the input itself."""
    if dest.is_dir():
        raise ConfigError(f"{dest}: is a folder; give the output file name")
    if source is not None and dest.exists() and _same_file(source, dest):
        raise ConfigError(f"{dest}: is the input file; write to another name")
    if dest.exists() and not force:
        raise ConfigError(f"{dest}: already exists; use --force to overwrite it")
    if not dest.parent.is_dir():
        raise ConfigError(f"{dest.parent}: output folder does not exist")


def check_folder_destination(dest: Path, force: bool) -> None:
    if dest.exists() and not dest.is_dir():
        raise ConfigError(f"{dest}: exists and is not a folder")
    if dest.is_dir() and any(dest.iterdir()):
        if not force:
            raise ConfigError(f"{dest}: folder exists and is not empty; use --force to replace it")
        if not (dest / "config.json").is_file():
            raise ConfigError(f"{dest}: refusing to replace a folder that is not a model folder (no config.json)")
    if not dest.parent.is_dir():
        raise ConfigError(f"{dest.parent}: output folder does not exist")


@contextlib.contextmanager
def atomic_file(dest: Path, force: bool, source: Path | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; on success it becomes ``dest``, on failure it is removed."""
    check_file_destination(dest, force, source)
    remove_stale_partials(dest)
    fd, name = _os_call(dest, tempfile.mkstemp, prefix=_partial_prefix(dest), suffix=PARTIAL_SUFFIX, dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.chmod(0o666 & ~_umask())  # mkstemp makes it private; a finished output gets the usual mode
    try:
        with _write_errors(dest):
            yield tmp
            os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_folder(dest: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary folder beside ``dest``; on success it replaces ``dest``, on failure it is removed."""
    check_folder_destination(dest, force)
    remove_stale_partials(dest)
    tmp = Path(_os_call(dest, tempfile.mkdtemp, prefix=_partial_prefix(dest), suffix=PARTIAL_SUFFIX, dir=dest.parent))
    tmp.chmod(0o777 & ~_umask())
    try:
        with _write_errors(dest):
            yield tmp
            _replace_folder(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_partials(dest: Path) -> list[Path]:
    """Remove ``.NAME.PID.*.partial`` files and folders beside ``dest`` left by processes that are gone."""
    prefix = f".{dest.name}."
    removed = []
    for path in dest.parent.iterdir():
        name = path.name
        if not (name.startswith(prefix) and name.endswith(PARTIAL_SUFFIX)):
            continue
        pid = name[len(prefix):].split(".", 1)[0]
        if not pid.isdigit() or _process_exists(int(pid)):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        warn(f"removed {len(removed)} partial output(s) of an interrupted run: {', '.join(p.name for p in removed)}")
    return removed


def _partial_prefix(dest: Path) -> str:
    return f".{dest.name}.{os.getpid()}."


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or a number no process can have: left alone)
    return True


def _replace_folder(new: Path, dest: Path) -> None:
    if not dest.exists():
        os.rename(new, dest)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
    os.rename(dest, old / "previous")
    try:
        os.rename(new, dest)
    except OSError:
        os.rename(old / "previous", dest)  # put the previous folder back
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _write_errors(dest: Path) -> Iterator[None]:
    try:
        yield
    except OSError as e:
        raise ConfigError(f"{dest}: cannot write: {e.strerror or e}") from None


def _os_call(dest: Path, fn, **kwargs):
    try:
        return fn(**kwargs)
    except OSError as e:
        raise ConfigError(f"{dest}: cannot create the output: {e.strerror or e}") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
