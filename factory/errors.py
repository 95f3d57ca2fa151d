"""The errors a user can cause, and the exit code each maps to.

Everything a user can fix (bad config, bad input, a missing file, a failed gate, a full
disk) raises a subclass of FactoryError; the CLI turns it into a message and an exit code
in one place. Any other exception is a bug and is reported as one.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

EXIT_GATE_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130


class FactoryError(Exception):
    """Base class for problems the user can fix. The message says what and how."""

    exit_code = EXIT_USAGE


class ConfigError(FactoryError):
    """factory.yaml (or a gate file) is invalid; the message lists every problem."""


class InputError(FactoryError):
    """Input data or a required file is missing or unusable."""


class UnsafePath(FactoryError):
    """A config-given path the factory was about to replace is the workspace, an ancestor of
    it, or holds files the factory did not write: nothing is removed."""


class DiskFull(FactoryError):
    """A write failed for lack of space (or quota). Nothing half-written is left in place."""


class WorkerKilled(FactoryError):
    """A worker process of a phase was killed from outside (by the out-of-memory killer, or a
    signal sent to it). Nothing half-written is left; running again starts the phase over."""


class GateFailed(FactoryError):
    """A gate's criteria were not met. Carries the results for the report."""

    exit_code = EXIT_GATE_FAILED

    def __init__(self, message: str, results: list | None = None):
        super().__init__(message)
        self.results = results or []


class Cancelled(BaseException):
    """Raised on SIGTERM so that the runner can record a final state, like Ctrl-C."""


# --- a full disk, however a library reports it --------------------------------------------

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
# Rust (safetensors, tokenizers) and C++ (torch) code wrap the OS error in their own exception
# types; their messages keep the OS's words or its code.
_NO_SPACE_TEXT = re.compile(r"No space left on device|Disk quota exceeded|os error (28|122)\b|errno (28|122)\b", re.I)


FULL_BELOW_BYTES = 1 << 20  # a write that failed on a disk with less free space than this ran out of it


def is_disk_full(exc: BaseException, where: Path | str | None = None) -> bool:
    """Whether `exc`, or an exception it was raised from, is a write that ran out of space.
    Some writers lose the OS's reason (torch.save: "file write failed"); with `where`, a
    failure while the disk holding it is practically full counts too."""
    if where is not None and _free_bytes(where) < FULL_BELOW_BYTES:
        return True
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
            return True
        if _NO_SPACE_TEXT.search(str(exc)):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _free_bytes(path: Path | str) -> int:
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return FULL_BELOW_BYTES


def disk_full(path: Path | str, what: str) -> DiskFull:
    """The error for a write under `path` that ran out of space: which disk, how full, what to do."""
    path = Path(path)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    mount = probe.resolve()
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    try:
        usage = shutil.disk_usage(probe)
        space = f"{usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB"
    except OSError:
        space = "free space unknown"
    return DiskFull(f"no space left on the disk mounted at {mount} ({space}) while {what}; nothing half-written "
                    f"was kept. Free some space there (or point the workspace or save paths at a larger disk), "
                    f"then run `factory run` again: finished phases are skipped.")
