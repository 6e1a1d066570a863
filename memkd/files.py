"""Writing files safely: atomic writes and per-folder locks.

Every writer renders into a temporary file beside its target and moves it into place with
``os.replace``, so a reader (or a crash) never sees a half-written file. ``folder_lock`` keeps two
memkd processes from writing into one output or run folder at the same time.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Union

import numpy as np

PathLike = Union[str, os.PathLike]

LOCK_FILE = ".memkd.lock"
_held_locks: dict[str, list] = {}  # folder -> [open lock file, depth] of the locks this process holds


class FolderBusyError(OSError):
    """Another process is writing into the same output folder."""


@contextmanager
def folder_lock(directory: PathLike, option: str = "--out") -> Iterator[Path]:
    """Hold ``directory``'s lock (``.memkd.lock``, created with the folder) while writing into it,
    so that two memkd processes never write one folder at the same time: the second fails at once,
    naming ``option``. Reentrant within a process (training, then evaluating into one run folder)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{option}: {directory} is a file, not a folder")
    directory.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(directory)
    if key in _held_locks:
        _held_locks[key][1] += 1
    else:
        handle = open(directory / LOCK_FILE, "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise FolderBusyError(
                f"{option}: another memkd process is writing into {directory}; wait for it to finish or choose another folder"
            ) from None
        _held_locks[key] = [handle, 1]
    try:
        yield directory
    finally:
        _held_locks[key][1] -= 1
        if _held_locks[key][1] == 0:
            _held_locks.pop(key)[0].close()  # closing releases the lock


def atomic_write(path: PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` for a temporary file beside ``path``, then move it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_bytes(path: PathLike, data: bytes) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def jsonable(value: Any) -> Any:
    """``value`` with NaN/inf floats as None, numpy scalars and arrays as Python types, paths as str."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, os.PathLike):
        return str(value)
    return value


def write_json(path: PathLike, data: Any) -> Path:
    """Strict JSON (NaN written as null), indented."""
    return write_text(path, json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n")
