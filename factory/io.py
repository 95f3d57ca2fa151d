"""Small file helpers shared by the engine and the phases: atomic writes and hashing."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import orjson


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename over `path`.

    A reader polling `path` sees either the old or the new content, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    """Atomically write `obj` as indented JSON (UTF-8, trailing newline)."""
    atomic_write_bytes(path, orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY) + b"\n")


def read_json(path: Path) -> Any:
    return orjson.loads(Path(path).read_bytes())


def read_json_if_exists(path: Path) -> Any | None:
    """The JSON in `path`, or None when there is no such file (a phase that has not run)."""
    try:
        return read_json(path)
    except FileNotFoundError:
        return None


class AtomicOutput:
    """A file opened for binary writing that appears at `path` only on success.

    Use as a context manager: on an exception the partial file is removed, so an
    interrupted phase never leaves a half-written artifact where the next phase reads.
    Keeps a running SHA-256 of what was written.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.partial")
        self._file = None
        self.sha256 = hashlib.sha256()

    def __enter__(self) -> "AtomicOutput":
        self._file = open(self._tmp, "wb", buffering=1 << 20)
        return self

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self.sha256.update(data)

    def __exit__(self, exc_type, exc, tb) -> None:
        self._file.close()
        if exc_type is None:
            os.replace(self._tmp, self.path)
        else:
            self._tmp.unlink(missing_ok=True)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
