"""Worker processes for the data phases: how many for a file, and a pool that stops cleanly.

A file of at least PARALLEL_MIN_BYTES is cut into line-aligned byte ranges, and one worker
process per CPU (at most MAX_WORKERS) handles them; a smaller file is handled in the phase's
own process (starting workers would cost more than it saves).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from factory.status import fork_is_safe

PARALLEL_MIN_BYTES = 64 << 20
MAX_WORKERS = 8


def default_workers(size: int) -> int:
    """Worker processes for a file of `size` bytes: 1 (none) below PARALLEL_MIN_BYTES."""
    if size < PARALLEL_MIN_BYTES:
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_WORKERS))


def _start_worker(initializer: Callable[..., None] | None, initargs: tuple) -> None:
    # Ctrl-C is handled by the parent, which terminates the pool; SIGTERM just ends a worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    # The objects inherited from the parent are never garbage: frozen, the collector no longer
    # walks them each time a block's records fill a generation, and so no longer copies their
    # pages (copy-on-write): 20% of the split workers' CPU at 1M records.
    gc.freeze()
    if initializer is not None:
        initializer(*initargs)


@contextmanager
def worker_pool(workers: int, log, what: str, initializer: Callable[..., None] | None = None,
                initargs: tuple = ()) -> Iterator[Any]:
    """A multiprocessing pool of `workers` processes, or None for one (work in this process).
    Start it before holding large data: forked workers would otherwise copy its pages."""
    if workers <= 1:
        yield None
        return
    # fork is instant; with other threads alive (a progress display) forking is unsafe.
    method = "fork" if fork_is_safe() and "fork" in multiprocessing.get_all_start_methods() else "spawn"
    log.info("%s: %d worker processes (%s)", what, workers, method)
    with multiprocessing.get_context(method).Pool(workers, initializer=_start_worker,
                                                  initargs=(initializer, initargs)) as pool:
        yield pool
