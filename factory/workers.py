"""Worker processes for the data phases: how many for a file, and a pool that stops cleanly.

A file of at least PARALLEL_MIN_BYTES is cut into line-aligned byte ranges, and one worker
process per CPU (at most MAX_WORKERS) handles them; a smaller file is handled in the phase's
own process (starting workers would cost more than it saves).
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from typing import Callable, Iterator

from factory.errors import WorkerKilled
from factory.io import libc_function
from factory.status import fork_is_safe

PARALLEL_MIN_BYTES = 64 << 20
MAX_WORKERS = 8
HEAP_TOP_PAD = 16 << 20
"""Free memory each worker keeps at the top of its heap (_keep_heap_top)."""
M_TOP_PAD = -2  # glibc's mallopt parameter for it
PR_SET_PDEATHSIG = 1  # Linux's prctl option: a signal for this process when its parent ends
_CRASHES = {signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGFPE, signal.SIGILL}
"""Signals a worker sends itself when it crashes: a bug, reported as one."""


def default_workers(size: int, configured: int | None = None) -> int:
    """Worker processes for a file of `size` bytes: `configured` (data.workers) when set, else
    1 (none) below PARALLEL_MIN_BYTES and one per CPU (at most MAX_WORKERS) from there."""
    if configured is not None:
        return configured
    if size < PARALLEL_MIN_BYTES:
        return 1
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_WORKERS))


def _start_worker(parent: int, initializer: Callable[..., None] | None, initargs: tuple) -> None:
    # Ctrl-C is handled by the parent, which terminates the pool; SIGTERM just ends a worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _end_with(parent)
    # The objects inherited from the parent are never garbage: frozen, the collector no longer
    # walks them each time a block's records fill a generation, and so no longer copies their
    # pages (copy-on-write): 20% of the split workers' CPU at 1M records.
    gc.freeze()
    _keep_heap_top()
    if initializer is not None:
        initializer(*initargs)


def _end_with(parent: int) -> None:
    """Be killed when the parent process ends (Linux's PR_SET_PDEATHSIG), however it ends: a
    worker of a parent killed by SIGKILL (the out-of-memory killer), or one the parent started
    just as Ctrl-C stopped it and so never knew of, would otherwise wait forever on the pool's
    pipes, of which it holds both ends, with its memory. A no-op elsewhere. (The signal comes
    when the thread that started the worker ends: the thread that uses the pool, here.)"""
    prctl = libc_function("prctl")
    if prctl is None:
        return
    prctl(ctypes.c_int(PR_SET_PDEATHSIG), ctypes.c_ulong(signal.SIGKILL))
    if os.getppid() != parent:  # it ended before the line above
        os._exit(1)


def _keep_heap_top() -> None:
    """Keep HEAP_TOP_PAD bytes of free memory at the top of the heap (glibc's mallopt
    M_TOP_PAD) instead of returning it to the system each time it frees: a worker handles
    range after range with the same few large buffers, and with glibc's default every range
    faulted them in again (200,000 page faults and 0.5 s of system time per format worker at
    1M records; about 4,000 with the pad). A no-op without glibc."""
    mallopt = libc_function("mallopt")
    if mallopt is not None:
        mallopt(ctypes.c_int(M_TOP_PAD), ctypes.c_int(HEAP_TOP_PAD))


@contextmanager
def without_huge_pages() -> Iterator[None]:
    """numpy asks the kernel for 2 MB pages (madvise MADV_HUGEPAGE) for each array of 4 MB or
    more. Under the kernel's default THP defrag setting (`madvise`), a first touch of such an
    array must find a free 2 MB block, compacting memory when none is at hand (and on a VM
    that hands free memory back to its host, fault there too). Once the page cache holds the
    files a data phase reads and writes, that stalls: in the split, gathering 750,000 rows of
    band keys took 0.35 s instead of 0.09 s, and the dedup step 3.9 s instead of 2.8 s at 1M
    records. The split's arrays are built once and read a few times: 4 KB pages serve them.
    Workers forked inside inherit the setting."""
    try:
        from numpy._core.multiarray import _set_madvise_hugepage
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _set_madvise_hugepage
    before = _set_madvise_hugepage(False)
    try:
        yield
    finally:
        _set_madvise_hugepage(before)


@contextmanager
def worker_pool(workers: int, log, what: str, initializer: Callable[..., None] | None = None,
                initargs: tuple = ()) -> Iterator[ProcessPoolExecutor | None]:
    """A pool of `workers` processes, or None for one (work in this process). Start it before
    holding large data: forked workers would otherwise copy its pages. On an error or Ctrl-C
    the workers are stopped at once, not left to finish what was queued.

    concurrent.futures' pool, not multiprocessing's: the latter's worker-watching thread wakes
    whenever a result waits in the pipe, and with the split's 300 KB results it cost this
    process 1.2 s of CPU per 865 of them (0.3 s here)."""
    if workers <= 1:
        yield None
        return
    # fork is instant; with other threads alive (a progress display) forking is unsafe.
    method = "fork" if fork_is_safe() and "fork" in multiprocessing.get_all_start_methods() else "spawn"
    log.info("%s: %d worker processes (%s)", what, workers, method)
    pool = ProcessPoolExecutor(workers, multiprocessing.get_context(method), _start_worker,
                               (os.getpid(), initializer, initargs))
    try:
        pool.submit(int).result()  # the workers start now (all of them, when forked), before any data is held
        yield pool
    except BaseException as error:
        # every worker the pool started, a dead one too (its exit code says what killed it);
        # the pool has no public list of them before Python 3.14's terminate_workers()
        processes = list((getattr(pool, "_processes", None) or {}).values())
        for process in processes:
            process.terminate()
        pool.shutdown(wait=True, cancel_futures=True)  # every worker is joined: its exit code is known
        killed = {-p.exitcode for p in processes if p.exitcode is not None and p.exitcode < 0}
        if len(killed) > 1:  # the others of a broken pool are ended with SIGTERM
            killed.discard(signal.SIGTERM)
        if isinstance(error, BrokenProcessPool) and killed and not killed & _CRASHES:
            memory = " (most likely by the system, for lack of memory)" if signal.SIGKILL in killed else ""
            raise WorkerKilled(
                f"{what}: a worker process was killed by {', '.join(signal.Signals(k).name for k in sorted(killed))}"
                f"{memory}; nothing half-written was kept: free memory (or set data.workers: 1, which needs less), "
                f"or stop what killed it, and run again"
            ) from None
        raise
    pool.shutdown(wait=True)
