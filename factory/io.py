"""Small file helpers shared by the engine and the phases: atomic writes, content digests, and
a few switches scoped to where they are needed."""

from __future__ import annotations

import csv
import ctypes
import json
import os
import sys
import tempfile
import threading
import zipfile
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import orjson
import xxhash


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


WRITEBACK_BYTES = 32 << 20
"""An AtomicOutput has the system start writing its data to disk each time this many more
bytes have come (Linux's sync_file_range), so that closing it waits for the last ones only:
the fsync of a 900 MB file written to the page cache took 0.3 s of 1.0 s here, against
0.01 s."""
SYNC_FILE_RANGE_WRITE = 2


@lru_cache(maxsize=None)
def libc_function(name: str):
    """A function of the C library this process runs on, or None where it has no such one."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def content_digest() -> "xxhash.xxh3_128":
    """The one hash that identifies a file's content in factory: the metrics' digests of data
    files, the fingerprints' inputs and outputs. xxh3-128 (`xxhsum -H2` prints it), not
    SHA-256: 8.6 GB/s against 1.6 GB/s here, and SHA-256 of each 900 MB file took 0.5 s of
    the data phases' CPU at 1M records. It tells files apart, it does not authenticate them."""
    return xxhash.xxh3_128()


def file_digest(path: Path) -> str:
    """content_digest() of a file, hex."""
    digest = content_digest()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def stat_key(stat: os.stat_result) -> list[int]:
    """What tells a file's versions apart without reading it (DVC's state key)."""
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


_WRITTEN: dict[str, tuple[list[int], str]] = {}  # path -> (stat_key, digest) of each AtomicOutput completed


def written_digest(path: Path, key: list[int]) -> str | None:
    """The digest an AtomicOutput computed as it wrote `path` in this process, if the file is
    still as it left it (same stat_key): the file need not be read again to be hashed."""
    written = _WRITTEN.get(os.path.abspath(path))
    return written[1] if written is not None and written[0] == key else None


def drop_in_background(paths: list[Path]) -> threading.Thread:
    """Remove these files (those there) in a thread, moved aside at once: stale outputs about
    to be written again (AtomicOutput's drop_old), removed while other work goes on. Freeing
    the disk blocks of a 900 MB file takes 0.15 s here. Join the thread before writing them:
    their freed pages in the page cache are then there for the new files (see drop_old)."""
    aside = []
    for path in map(Path, paths):
        moved = path.with_name(f".{path.name}.dropped")
        moved.unlink(missing_ok=True)  # a killed run's
        try:
            os.replace(path, moved)
        except FileNotFoundError:
            continue
        aside.append(moved)
    thread = threading.Thread(target=lambda: [p.unlink(missing_ok=True) for p in aside], daemon=True)
    thread.start()
    return thread


_OPEN_OUTPUTS = threading.local()  # the AtomicOutputs open in this thread, outermost first


class AtomicOutput:
    """A file opened for binary writing that appears at `path` only on success.

    Use as a context manager: on an exception (a full disk included, which can also surface
    when the last buffer is flushed) the partial file is removed, so an interrupted phase
    never leaves a half-written artifact where the next phase reads. Keeps a running
    content_digest() of what was written, and hands it to written_digest() when complete.

    Outputs opened together (`with AtomicOutput(a) as x, AtomicOutput(b) as y:`) appear
    together: one that completes inside another waits, written and synced, until the
    outermost completes, and is removed if it fails; a phase never leaves `b` new and `a`
    missing.

    `drop_old`: the file now at `path` is removed when writing starts, for a large output whose
    last version is stale by then (its phase's last success is forgotten when the phase
    starts). Its pages in the page cache are then free for the new file's: on a VM that hands
    free memory back to its host (BENCHMARKS.md's), a 900 MB output written while the old one
    was still there took 3.9-4.5 s of `format` against 2.6-3.0 s, its pages coming from the
    host.
    """

    def __init__(self, path: Path, drop_old: bool = False):
        self.path = Path(path)
        self.drop_old = drop_old
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.partial = self.path.with_name(f".{self.path.name}.partial")  # where it is written until complete
        self._file = None
        self._waiting: list[AtomicOutput] = []  # completed inner outputs, renamed when this one is
        self.digest = content_digest()
        self._written = self._written_back = 0  # bytes written, and those handed to the disk (WRITEBACK_BYTES)

    def __enter__(self) -> "AtomicOutput":
        try:
            if self.drop_old:
                self.path.unlink(missing_ok=True)
            self._file = open(self.partial, "wb", buffering=1 << 20)
            _open_outputs().append(self)
        except BaseException:  # Ctrl-C can land here, where `with` calls no __exit__: no partial file is left
            if self._file is not None:
                self._file.close()
            self.partial.unlink(missing_ok=True)
            if self in _open_outputs():
                _open_outputs().remove(self)
            raise
        return self

    def write(self, data: bytes) -> None:
        self._file.write(data)
        self.digest.update(data)
        self._written += len(data)
        if self._written - self._written_back >= WRITEBACK_BYTES:
            self._start_writeback()

    def written_elsewhere(self, end: int) -> None:
        """Take in the bytes up to `end` that other processes wrote into `partial` (all of
        them by now): read back into the digest, and handed to the disk as write() hands its
        own."""
        with open(self.partial, "rb") as f:
            f.seek(self._written)
            while self._written < end:
                chunk = f.read(min(4 << 20, end - self._written))
                if not chunk:
                    raise OSError(f"{self.partial} ends at byte {self._written}, before the {end} written")
                self.digest.update(chunk)
                self._written += len(chunk)
        if self._written - self._written_back >= WRITEBACK_BYTES:
            self._start_writeback()

    def _start_writeback(self) -> None:
        sync_file_range = libc_function("sync_file_range")  # Linux only: elsewhere the fsync does it all
        if sync_file_range is not None:
            self._file.flush()
            start, count = self._written_back, self._written - self._written_back
            sync_file_range(self._file.fileno(), ctypes.c_int64(start), ctypes.c_int64(count),
                            ctypes.c_uint(SYNC_FILE_RANGE_WRITE))
        self._written_back = self._written

    def __exit__(self, exc_type, exc, tb) -> None:
        stack = _open_outputs()
        stack.remove(self)
        try:
            if exc_type is None:
                self._file.flush()
                os.fsync(self._file.fileno())
            self._file.close()
        except BaseException:
            self._discard()
            raise
        if exc_type is not None:
            self._discard()
        elif stack:  # inside another output that is still being written
            stack[-1]._waiting += [self, *self._waiting]
        else:
            for output in (*self._waiting, self):
                os.replace(output.partial, output.path)
                _WRITTEN[os.path.abspath(output.path)] = (stat_key(output.path.stat()), output.digest.hexdigest())

    def _discard(self) -> None:
        for output in (self, *self._waiting):
            output.partial.unlink(missing_ok=True)


def _open_outputs() -> list[AtomicOutput]:
    if not hasattr(_OPEN_OUTPUTS, "stack"):
        _OPEN_OUTPUTS.stack = []
    return _OPEN_OUTPUTS.stack


def load_yaml(text: str) -> Any:
    """yaml.safe_load, parsed by libyaml where PyYAML has it (ten times faster: every `factory
    run` reads factory.yaml and each gate file). A document libyaml rejects is parsed again by
    PyYAML's own parser, so that an error reads the same with or without libyaml."""
    import yaml

    try:
        return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError:
        return yaml.safe_load(text)


# --- checking a file someone else wrote -----------------------------------------------------


def damaged_file_problem(path: Path) -> str | None:
    """Why a saved file cannot be read back whole (None: it can), cheaply and without the
    library that wrote it: a safetensors file must be exactly as long as its header says, a
    torch .pt/.pth/.bin (a zip archive) must pass its CRC checks, a .json must parse."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    return "shorter than a safetensors header"
                header_size = int.from_bytes(head, "little")
                header = json.loads(f.read(header_size))
            ends = [info["data_offsets"][1] for name, info in header.items() if name != "__metadata__"]
            expected = 8 + header_size + max(ends, default=0)
            size = path.stat().st_size
            if size != expected:
                return f"{size} bytes where its header describes {expected} (truncated)"
        elif path.suffix in (".pt", ".pth", ".bin") and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
            if bad:
                return f"member {bad} fails its CRC check"
        elif path.suffix == ".pt" or path.suffix == ".pth":
            return "not a readable torch archive (truncated)"
        elif path.suffix == ".json":
            json.loads(path.read_bytes())
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as e:
        return f"unreadable ({type(e).__name__}: {e})"
    return None


# --- process-wide switches, scoped -------------------------------------------------------------


@contextmanager
def csv_field_size_limit(limit: int = min(sys.maxsize, 2**31 - 1)) -> Iterator[None]:
    """csv.field_size_limit is process-wide: raise it for one reader, then put it back."""
    previous = csv.field_size_limit(limit)
    try:
        yield
    finally:
        csv.field_size_limit(previous)
