"""The status files, .factory/status.json and .factory/training-status.json, owned by the runner,
and the lock that makes a workspace's runs one at a time.

Every change is written atomically (temp file + rename) with a sequence number that only
increases, across runs too, so a poller never reads a torn file and can order what it reads.
Progress updates are throttled; state changes are written at once.

A status that says "running" could outlive its process (kill -9, the out-of-memory killer, a
power cut), so both files carry the owner's `pid` and `host`, and a heartbeat: the runner
rewrites `updated_at` every HEARTBEAT_SECONDS while it runs. A poller tells a dead run from a
live one by `updated_at` older than STALE_AFTER_SECONDS (from any machine), or on the run's own
host by `pid` no longer running. Every factory command that finds such an abandoned status
rewrites it to a final state (`finalize_abandoned`), so the files stop saying "running".
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Iterator

import orjson

from factory.errors import FactoryError
from factory.io import atomic_write_bytes, write_json
from factory.redact import redact
from factory.workspace import Workspace

log = logging.getLogger("factory")

PROGRESS_INTERVAL_S = 0.5
HEARTBEAT_SECONDS = 2.0
STALE_AFTER_SECONDS = 30.0  # many missed heartbeats: the run is gone, whatever its pid says
LOCK_WAIT_SECONDS = 1.0  # another command may hold the lock for a moment to finalize a dead run's status
HOST = socket.gethostname()
GONE = "ProcessGone"
# The host of a run on Hugging Face Jobs (hf-jobs/JOB_ID): no heartbeat reaches the workspace; its
# status is what the job's stage was when `factory submit --status` last asked, never finalized here.
REMOTE_HOST_PREFIX = "hf-jobs/"


def is_remote(doc: dict) -> bool:
    return str(doc.get("host") or "").startswith(REMOTE_HOST_PREFIX)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def read_status(ws: Workspace) -> dict | None:
    """The last status written, or None when there is none (or it is unreadable)."""
    return _read(ws.status_file)


def read_training_status(ws: Workspace) -> dict | None:
    """The last training status written, or None when there is none (or it is unreadable)."""
    return _read(ws.training_status_file)


def _read(path) -> dict | None:
    try:
        doc = orjson.loads(path.read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


# --- is the owner alive? ------------------------------------------------------------------------


def _is_running(doc: dict) -> bool:
    return doc.get("state") == "running" or doc.get("running") is True


def _age_seconds(timestamp: str | None) -> float:
    if not timestamp:
        return float("inf")
    return time.time() - datetime.fromisoformat(timestamp).timestamp()


def runner_alive(doc: dict) -> bool:
    """Whether the process that wrote a "running" status (either file) is still running it:
    from another host, by its heartbeat; on its host, by its pid (a process that started
    after the run did has only reused the number)."""
    if not _is_running(doc):
        return False
    if is_remote(doc):
        return True
    pid = doc.get("pid")
    if doc.get("host") not in (None, HOST) or not pid:
        return _age_seconds(doc.get("updated_at")) < STALE_AFTER_SECONDS
    import psutil

    try:
        process = psutil.Process(pid)
        started = process.create_time()
        zombie = process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # alive, owned by another user
        return True
    return not zombie and started <= datetime.fromisoformat(doc["started_at"]).timestamp() + 1.0


def finalize_abandoned(ws: Workspace, *, lock_held: bool = False) -> list[str]:
    """Rewrite a status file whose run disappeared without writing its final state to `failed`,
    with an error saying so. Returns what was rewritten (for a note). Takes the run lock for
    the rewrite, so a run that is starting is never overwritten; on the run's host, the lock
    being free is itself proof that its owner is gone."""
    with _lock_probe(ws, lock_held) as free:
        if not free:
            return []
        rewritten = []
        for path, finalize in ((ws.status_file, _finalize_status), (ws.training_status_file, _finalize_training)):
            doc = _read(path)
            if doc is None or not _is_running(doc) or is_remote(doc):
                continue
            gone = doc.get("host") in (None, HOST) or _age_seconds(doc.get("updated_at")) >= STALE_AFTER_SECONDS
            if not gone:
                continue
            message = (f"the factory run (pid {doc.get('pid') or '?'} on {doc.get('host') or HOST}) disappeared without "
                       f"writing its final state: it was killed (kill -9, the out-of-memory killer) or its machine "
                       f"stopped. Its last sign of life was at {doc.get('updated_at')}. `factory run` resumes.")
            finalize(doc, message)
            try:
                write_json(path, doc)
            except OSError as e:
                log.warning("could not rewrite %s: %s", ws.rel(path), e)
                continue
            rewritten.append(ws.rel(path))
        return rewritten


def _finalize_status(doc: dict, message: str) -> None:
    error = {"type": GONE, "message": message}
    ended = now_iso()
    for phase in doc.get("phases", []):
        if phase.get("state") == "running":
            phase.update(state="failed", ended_at=ended, error=error)
    doc.update(state="failed", ended_at=ended, error=error, seq=doc.get("seq", 0) + 1, updated_at=ended)


def _finalize_training(doc: dict, message: str) -> None:
    doc.update(running=False, status="failed", error=message, eta_seconds=None, seq=doc.get("seq", 0) + 1,
               updated_at=now_iso())


# --- one run per workspace ----------------------------------------------------------------------


@contextmanager
def run_lock(ws: Workspace) -> Iterator[None]:
    """Hold the workspace's run lock for a run. A second run is refused at once, naming the
    owner. flock is released by the kernel when the process dies, however it dies.
    (fcntl: POSIX systems; Windows is not supported.)"""
    ws.state_dir.mkdir(parents=True, exist_ok=True)
    with open(ws.lock_file, "a+") as lock:
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise FactoryError(f"another factory run ({_owner(lock)}) is using {ws.root}; wait for it to "
                                       f"finish, or stop it (Ctrl-C or `kill PID`: it records where it stopped)") from None
                time.sleep(0.05)
        lock.seek(0)
        lock.truncate()
        lock.write(orjson.dumps({"pid": os.getpid(), "host": HOST, "started_at": now_iso()}).decode())
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _owner(lock) -> str:
    lock.seek(0)
    text = lock.read().strip()
    try:
        owner = orjson.loads(text)
        return f"pid {owner['pid']} on {owner['host']}, started {owner['started_at']}"
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return f"pid {text or '?'}"


@contextmanager
def _lock_probe(ws: Workspace, held: bool) -> Iterator[bool]:
    """Yields whether no run holds the lock (holding it meanwhile, without touching the owner
    recorded in it)."""
    if held:
        yield True
        return
    try:
        lock = open(ws.lock_file, "r")
    except FileNotFoundError:
        yield True  # no run was ever started here: nothing can hold it
        return
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# --- the heartbeat ------------------------------------------------------------------------------


class Heartbeat:
    """A daemon thread that refreshes `updated_at` of the status files every HEARTBEAT_SECONDS,
    whatever the phase is doing (a long model load, a converter child). Fork-safe: a fork
    (the split phase's workers) waits until no heartbeat write is under way."""

    def __init__(self, *writers):
        self.writers = list(writers)
        self._stop = threading.Event()
        self._busy = threading.Lock()
        self._thread = threading.Thread(target=self._beat, name="factory-heartbeat", daemon=True)

    def __enter__(self) -> "Heartbeat":
        guard_for_fork(self._thread, self._busy)  # before it starts: no fork sees it unguarded
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        unguard_for_fork(self._thread)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with self._busy:
                for writer in list(self.writers):
                    try:
                        writer.touch()
                    except Exception as e:  # a full disk must not kill the beat; the phase reports it
                        log.debug("heartbeat not written: %s", e)


_FORK_GUARDS: dict[threading.Thread, threading.Lock | threading.RLock] = {}
"""Threads that only touch what they hold their lock for: a fork waits for the lock, so no
child inherits it held or a write half done (the heartbeat, the live progress display)."""


def guard_for_fork(thread: threading.Thread, lock) -> None:
    _FORK_GUARDS[thread] = lock


def unguard_for_fork(thread: threading.Thread) -> None:
    _FORK_GUARDS.pop(thread, None)


def _before_fork() -> None:
    for guard in list(_FORK_GUARDS.values()):
        guard.acquire()


def _after_fork() -> None:
    for guard in list(_FORK_GUARDS.values()):
        guard.release()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork, after_in_child=_after_fork)


def fork_is_safe() -> bool:
    """Whether forking now is safe: no threads but this one and those guarded for forks (any
    other may hold a lock that a child would inherit held)."""
    return all(t is threading.current_thread() or t in _FORK_GUARDS for t in threading.enumerate())


# --- the status files ---------------------------------------------------------------------------


def read_training_history(ws: Workspace) -> list[dict]:
    """The points of the last training, one per step, in step order: the training loss and
    learning rate, the validation loss (`eval_loss`), or both, where a step has them.

    Lines of the same step are merged. A line torn by a kill -9 is skipped; a value logged
    twice for a step (re-trained after a resume) keeps its last value.
    """
    try:
        lines = ws.training_history_file.read_bytes().splitlines()
    except FileNotFoundError:
        return []
    by_step: dict[int, dict] = {}
    for line in lines:
        try:
            point = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        by_step.setdefault(point["step"], {}).update(point)
    return [by_step[step] for step in sorted(by_step)]


def idle_status(phase_names: list[str], summaries: dict[str, str]) -> dict:
    """What `factory status` shows before any run."""
    return {
        "schema_version": 1,
        "run_id": None,
        "seq": 0,
        "state": "idle",
        "target": None,
        "started_at": None,
        "updated_at": now_iso(),
        "ended_at": None,
        "pid": None,
        "host": None,
        "heartbeat_seconds": HEARTBEAT_SECONDS,
        "error": None,
        "phases": [_pending(name, summaries.get(name, "")) for name in phase_names],
    }


def _pending(name: str, summary: str) -> dict:
    return {
        "name": name,
        "state": "pending",
        "summary": summary,
        "started_at": None,
        "ended_at": None,
        "duration_seconds": None,
        "reason": None,
        "progress": None,
        "metrics_file": None,
        "gates": [],
        "error": None,
    }


def _write_status_file(path, doc: dict) -> None:
    """Atomically; on a full disk (where even the temp file cannot be made), in place: a final
    state that says why must reach the file, and overwriting reuses the file's own blocks."""
    try:
        write_json(path, doc)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT) or not path.exists():
            raise
        data = orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n"
        with open(path, "r+b") as f:
            f.write(data)
            f.truncate()


class StatusWriter:
    """Holds the run's status in memory and writes it on every change (thread-safe: the
    heartbeat writes from its own thread)."""

    def __init__(self, ws: Workspace, phase_names: list[str], summaries: dict[str, str], target: str | None):
        self.ws = ws
        self._lock = threading.RLock()
        previous = read_status(ws)
        self._seq = previous["seq"] if previous else 0
        # Phases not part of this run keep what the last run recorded for them.
        earlier = {p["name"]: p for p in (previous or {}).get("phases", [])}
        started = now_iso()
        self.doc = {
            "schema_version": 1,
            "run_id": uuid.uuid4().hex[:12],
            "seq": self._seq,
            "state": "running",
            "target": target,
            "started_at": started,
            "updated_at": started,
            "ended_at": None,
            "pid": os.getpid(),
            "host": HOST,
            "heartbeat_seconds": HEARTBEAT_SECONDS,
            "error": None,
            "phases": [earlier.get(n) or _pending(n, summaries.get(n, "")) for n in phase_names],
        }
        self._last_progress_write = 0.0
        self.write()

    @property
    def run_id(self) -> str:
        return self.doc["run_id"]

    def phase(self, name: str) -> dict:
        return next(p for p in self.doc["phases"] if p["name"] == name)

    def write(self) -> None:
        with self._lock:
            self._seq += 1
            self.doc["seq"] = self._seq
            self.doc["updated_at"] = now_iso()
            _write_status_file(self.ws.status_file, self.doc)

    def touch(self) -> None:
        """The heartbeat: the same content, a new `updated_at`."""
        with self._lock:
            if self.doc["state"] == "running":
                self.write()

    def reset_phase(self, name: str) -> None:
        """Mark a phase of this run pending again (it is about to be run or skipped)."""
        with self._lock:
            entry = self.phase(name)
            summary = entry.get("summary", "")
            entry.clear()
            entry.update(_pending(name, summary))

    def phase_started(self, name: str, metrics_file: str) -> None:
        with self._lock:
            self.phase(name).update(state="running", started_at=now_iso(), metrics_file=metrics_file)
            self.write()

    def phase_progress(self, name: str, done: int, total: int | None, unit: str, force: bool = False) -> None:
        with self._lock:
            self.phase(name)["progress"] = {"done": done, "total": total, "unit": unit}
            now = time.monotonic()
            if force or now - self._last_progress_write >= PROGRESS_INTERVAL_S:
                self._last_progress_write = now
                self.write()

    def phase_finished(self, name: str, state: str, *, reason: str | None = None, error: dict | None = None,
                       metrics_file: str | None = None) -> None:
        with self._lock:
            entry = self.phase(name)
            ended = now_iso()
            started = entry["started_at"] or ended
            entry.update(state=state, ended_at=ended, reason=reason, error=_redacted(error))
            if metrics_file:
                entry["metrics_file"] = metrics_file
            entry["duration_seconds"] = round(
                (datetime.fromisoformat(ended) - datetime.fromisoformat(started)).total_seconds(), 3
            )
            if state == "skipped":
                entry["started_at"] = entry["ended_at"] = ended
                entry["duration_seconds"] = 0.0
            self.write()

    def gate_checked(self, phase: str, result: dict[str, Any]) -> None:
        with self._lock:
            entry = self.phase(phase)
            entry["gates"] = [g for g in entry["gates"] if g["name"] != result["gate"]]
            entry["gates"].append(
                {
                    "name": result["gate"],
                    "passed": result["passed"],
                    "failed_criteria": [c["metric"] for c in result["criteria"] if c["passed"] is False],
                    "result_file": self.ws.rel(self.ws.gate_results_dir / f"{result['gate']}.json"),
                }
            )
            self.write()

    def finish(self, state: str, error: dict | None = None) -> None:
        with self._lock:
            self.doc.update(state=state, ended_at=now_iso(), error=_redacted(error))
            self.write()


def _redacted(error: dict | None) -> dict | None:
    return None if error is None else {**error, "message": redact(error["message"])}


class TrainingStatus:
    """.factory/training-status.json, the live view of a training phase (seed 004's fields).

    The phase reports through `update(...)` (via its context); the runner creates this object,
    and writes the final state itself when the phase ends, whether it succeeded, failed or
    was interrupted, so the file never stays "running" after the process is gone (and when
    the process is killed outright, the next factory command finalizes it).
    """

    LIVE_FIELDS = {"step", "total_steps", "epoch", "total_epochs", "loss", "learning_rate", "eta_seconds",
                   "checkpoint_at", "backend", "backend_reason", "eval_loss", "best_eval_loss"}

    def __init__(self, ws: Workspace, run_id: str, phase: str):
        self.ws, self.run_id, self.phase = ws, run_id, phase
        self.doc: dict | None = None
        self._lock = threading.RLock()
        self._history_started = False
        try:
            self._seq = orjson.loads(ws.training_status_file.read_bytes())["seq"]
        except (FileNotFoundError, orjson.JSONDecodeError, KeyError, TypeError):
            self._seq = 0

    @property
    def started(self) -> bool:
        return self.doc is not None

    def update(self, **fields: Any) -> None:
        unknown = set(fields) - self.LIVE_FIELDS
        if unknown:
            raise ValueError(f"not training-status fields: {sorted(unknown)}")
        with self._lock:
            if self.doc is None:
                started = now_iso()
                self.doc = {
                    "schema_version": 1,
                    "running": True,
                    "step": 0,
                    "total_steps": None,
                    "epoch": 0.0,
                    "total_epochs": None,
                    "loss": None,
                    "learning_rate": None,
                    "eta_seconds": None,
                    "started_at": started,
                    "checkpoint_at": None,
                    "error": None,
                    "status": "running",
                    "phase": self.phase,
                    "backend": None,
                    "backend_reason": None,
                    "seq": self._seq,
                    "updated_at": started,
                    "run_id": self.run_id,
                    "eval_loss": None,
                    "best_eval_loss": None,
                    "pid": os.getpid(),
                    "host": HOST,
                    "heartbeat_seconds": HEARTBEAT_SECONDS,
                }
            if not self._history_started and ("step" in fields or "loss" in fields):
                self._start_history(fields.get("step", self.doc["step"]))
            self.doc.update(fields)
            self._write()
            if fields.get("loss") is not None:
                self._append_history({"loss": self.doc["loss"], "learning_rate": self.doc["learning_rate"]})
            if fields.get("eval_loss") is not None:
                self._append_history({"eval_loss": self.doc["eval_loss"]})

    def touch(self) -> None:
        with self._lock:
            if self.doc is not None and self.doc["running"]:
                self._write()

    def _start_history(self, step: int) -> None:
        """Training (re)starts at `step`: keep the points up to it (a resume continues the
        curve), drop the rest (they are re-trained, or belong to an older training)."""
        self._history_started = True
        kept = [p for p in read_training_history(self.ws) if p["step"] <= step]
        atomic_write_bytes(self.ws.training_history_file, b"".join(orjson.dumps(p) + b"\n" for p in kept))

    def _append_history(self, values: dict) -> None:
        point = {"step": self.doc["step"], **values, "epoch": self.doc["epoch"], "run_id": self.run_id,
                 "at": self.doc["updated_at"]}
        # One whole line per write in append mode: only the last line can be caught half-written
        # (by a reader, or by a kill -9), and read_training_history skips it.
        with open(self.ws.training_history_file, "ab") as f:
            f.write(orjson.dumps(point) + b"\n")

    def finish(self, status: str, error: str | None = None) -> None:
        with self._lock:
            if self.doc is None or not self.doc["running"]:
                return
            self.doc.update(running=False, status=status, error=redact(error) if error else None,
                            eta_seconds=0.0 if status == "succeeded" else None)
            self._write()

    def _write(self) -> None:
        self._seq += 1
        self.doc["seq"] = self._seq
        self.doc["updated_at"] = now_iso()
        _write_status_file(self.ws.training_status_file, self.doc)
