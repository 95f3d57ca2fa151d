"""The phase runner: runs phases in order, skips unchanged ones, checks gates, writes status.

The engine knows nothing about what a phase does (see factory.phase for the contract),
like DVC's reproduce loop knows nothing about a stage's command. For each phase:

1. fingerprint its config sections, its input files and its code; if that matches the last
   success and its outputs are untouched, skip it;
2. otherwise run it, write the metrics it returns to metrics/<stem>.json, store the
   fingerprint;
3. check the gates attached to it (also when skipped: thresholds may have changed), and
   stop the run on a failure.

Status is written at every change, and a final state is written on the way out whatever
happens (an error, Ctrl-C, SIGTERM).
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Protocol

import orjson
import xxhash

from factory import __version__
from factory.config import FactoryConfig
from factory.errors import Cancelled, FactoryError, GateFailed
from factory.gates import Gate, check_gate, gates_after, load_gates
from factory.io import read_json, write_json
from factory.phase import Phase, PhaseContext
from factory.report import REPORTED_METRICS, write_report
from factory.status import StatusWriter, TrainingStatus
from factory.workspace import Workspace

log = logging.getLogger("factory")


class Reporter(Protocol):
    """What the runner tells the terminal (the CLI supplies one; tests may pass None)."""

    def phase_started(self, phase: Phase) -> None: ...

    def progress(self, phase: Phase, done: int, total: int | None, unit: str) -> None: ...

    def phase_finished(self, phase: Phase, state: str, seconds: float, note: str) -> None: ...

    def gate_checked(self, result: dict) -> None: ...

    def note(self, message: str) -> None: ...


class _Silent:
    def phase_started(self, phase): pass
    def progress(self, phase, done, total, unit): pass
    def phase_finished(self, phase, state, seconds, note): pass
    def gate_checked(self, result): pass
    def note(self, message): pass


@dataclass
class RunResult:
    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    gates: list[dict] = field(default_factory=list)


def select_phases(pipeline: tuple[Phase, ...], target: str | None, only: str | None) -> list[Phase]:
    names = [p.name for p in pipeline]
    for asked in (target, only):
        if asked is not None and asked not in names:
            raise FactoryError(f"unknown phase {asked!r}; phases in order: {' -> '.join(names)}")
    if only:
        return [p for p in pipeline if p.name == only]
    end = names.index(target) + 1 if target else len(names)
    return list(pipeline[:end])


def metrics_producers(pipeline: tuple[Phase, ...]) -> dict[str, str]:
    return {p.metrics: p.name for p in pipeline}


def run_pipeline(
    cfg: FactoryConfig,
    ws: Workspace,
    pipeline: tuple[Phase, ...],
    *,
    target: str | None = None,
    only: str | None = None,
    force: bool = False,
    reporter: Reporter | None = None,
    options: dict | None = None,
) -> RunResult:
    selected = select_phases(pipeline, target, only)
    gates = load_gates(ws, cfg)
    reporter = reporter or _Silent()
    result = RunResult()
    with _exclusive(ws), _sigterm_as_cancel(), _log_to_file(ws):
        status = StatusWriter(ws, [p.name for p in pipeline], {p.name: p.summary for p in pipeline}, only or target)
        for phase in selected:
            status.reset_phase(phase.name)
        status.write()
        current: Phase | None = None
        try:
            for phase in selected:
                current = phase
                _run_one(phase, cfg, ws, status, reporter, force, result, options or {})
                try:
                    for gate in gates_after(gates, phase.name):
                        _check(gate, phase, ws, pipeline, status, reporter, result)
                finally:  # a failed gate belongs in the report too
                    if phase.metrics in REPORTED_METRICS:
                        _write_report(ws, reporter)
                current = None
        except BaseException as exc:
            error = {"type": _error_type(exc), "message": str(exc) or _error_type(exc)}
            if current is not None and status.phase(current.name)["state"] == "running":
                status.phase_finished(current.name, "failed", error=error)
            cancelled = isinstance(exc, (KeyboardInterrupt, Cancelled))
            status.finish("cancelled" if cancelled else "failed", error)
            if isinstance(exc, GateFailed):  # a failed gate is a result the tracker's run should show
                _log_to_trackers(ws, result, reporter)
            raise
        status.finish("succeeded")
        _log_to_trackers(ws, result, reporter)
    return result


def _run_one(phase: Phase, cfg: FactoryConfig, ws: Workspace, status: StatusWriter, reporter: Reporter,
             force: bool, result: RunResult, options: dict) -> None:
    metrics_path = ws.metrics_file(phase.metrics)
    fingerprint = compute_fingerprint(phase, cfg, ws)
    reason = None if force else _unchanged_reason(phase, cfg, ws, fingerprint, metrics_path)
    if reason:
        status.phase_finished(phase.name, "skipped", reason=reason, metrics_file=ws.rel(metrics_path))
        reporter.phase_finished(phase, "skipped", 0.0, reason)
        result.skipped.append(phase.name)
        log.info("%s: skipped (%s)", phase.name, reason)
        return

    status.phase_started(phase.name, ws.rel(metrics_path))
    reporter.phase_started(phase)
    log.info("%s: started", phase.name)
    started = time.monotonic()
    progress = _PhaseProgress(phase, status, reporter)
    training = TrainingStatus(ws, status.run_id, phase.name)
    context = PhaseContext(cfg, ws, progress, logging.getLogger(f"factory.{phase.name}"), status.run_id,
                           training, options)
    try:
        metrics = phase.run(context)
    except BaseException as exc:
        cancelled = isinstance(exc, (KeyboardInterrupt, Cancelled))
        training.finish("cancelled" if cancelled else "failed", f"{_error_type(exc)}: {exc}")
        raise
    training.finish("succeeded")
    progress.flush()
    seconds = time.monotonic() - started
    write_json(metrics_path, {
        "schema_version": 1,
        "phase": phase.name,
        "run_id": status.run_id,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **metrics,
    })
    _store_fingerprint(phase, cfg, ws, fingerprint, status.run_id)
    status.phase_finished(phase.name, "succeeded", metrics_file=ws.rel(metrics_path))
    reporter.phase_finished(phase, "succeeded", seconds, ws.rel(metrics_path))
    result.ran.append(phase.name)
    log.info("%s: succeeded in %.1fs; metrics in %s", phase.name, seconds, ws.rel(metrics_path))


def _check(gate: Gate, phase: Phase, ws: Workspace, pipeline: tuple[Phase, ...], status: StatusWriter,
           reporter: Reporter, result: RunResult) -> None:
    outcome = check_gate(gate, ws, metrics_producers(pipeline), status.run_id)
    status.gate_checked(phase.name, outcome)
    reporter.gate_checked(outcome)
    result.gates.append(outcome)
    log.info("gate %s: %s", gate.name, "passed" if outcome["passed"] else "FAILED")
    if not outcome["passed"]:
        failed = [c["metric"] for c in outcome["criteria"] if c["passed"] is False]
        raise GateFailed(f"gate {gate.name} failed after {phase.name} on: {', '.join(failed)}", [outcome])


def _write_report(ws: Workspace, reporter: Reporter) -> None:
    """metrics/report.{md,html}. A view of metrics already written, so a problem making it is
    reported but does not turn the phase's result into a failure; `factory report` retries."""
    try:
        files = write_report(ws)
    except Exception as exc:
        log.warning("report not written: %s: %s", type(exc).__name__, exc, exc_info=True)
        reporter.note(f"report not written ({type(exc).__name__}: {exc}); `factory report --debug` shows why")
        return
    reporter.note(f"report: {', '.join(ws.rel(f) for f in files if f.suffix != '.png')}")


def _log_to_trackers(ws: Workspace, result: RunResult, reporter: Reporter) -> None:
    """The results of this run (scores, gate verdicts) to the experiment tracker run(s) of the
    training (training.report_to), once the run has checked its gates."""
    from factory import trackers

    if result.gates and (logged := trackers.log_results(ws)):
        reporter.note(f"results logged to {', '.join(logged)}")


def _error_type(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "Interrupted"
    return type(exc).__name__


class _PhaseProgress:
    """The Progress a phase sees: forwards to the status file (throttled) and the terminal."""

    def __init__(self, phase: Phase, status: StatusWriter, reporter: Reporter):
        self.phase, self.status, self.reporter = phase, status, reporter
        self.done, self.total, self.unit = 0, None, "items"

    def start(self, total: int | None, unit: str) -> None:
        self.done, self.total, self.unit = 0, total, unit
        self.status.phase_progress(self.phase.name, 0, total, unit, force=True)
        self.reporter.progress(self.phase, 0, total, unit)

    def advance(self, n: int = 1) -> None:
        self.done += n
        self.status.phase_progress(self.phase.name, self.done, self.total, self.unit)
        self.reporter.progress(self.phase, self.done, self.total, self.unit)

    def flush(self) -> None:
        if self.status.phase(self.phase.name)["progress"] is not None:
            self.status.phase_progress(self.phase.name, self.done, self.total, self.unit, force=True)


# --- fingerprints ------------------------------------------------------------------------


def compute_fingerprint(phase: Phase, cfg: FactoryConfig, ws: Workspace) -> dict:
    """What the phase's output depends on: config sections, input contents, phase code."""
    code = Path(phase.run.__code__.co_filename)
    return {
        "factory_version": __version__,
        "code": _hash_path(code),
        "config": {s: cfg.section(s) for s in phase.config_sections},
        "inputs": {ws.rel(p): _hash_path(p) for p in phase.inputs(cfg, ws)},
    }


def _unchanged_reason(phase: Phase, cfg: FactoryConfig, ws: Workspace, fingerprint: dict, metrics_path: Path) -> str | None:
    stored_file = ws.fingerprints_dir / f"{phase.name}.json"
    try:
        stored = read_json(stored_file)
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None
    if stored.get("fingerprint") != fingerprint or not metrics_path.exists():
        return None
    for rel, digest in stored.get("outputs", {}).items():
        path = ws.path(rel)
        if not path.exists() or _hash_path(path) != digest:
            return None
    return "config, inputs and outputs unchanged since the last success"


def _store_fingerprint(phase: Phase, cfg: FactoryConfig, ws: Workspace, fingerprint: dict, run_id: str) -> None:
    write_json(ws.fingerprints_dir / f"{phase.name}.json", {
        "schema_version": 1,
        "phase": phase.name,
        "run_id": run_id,
        "fingerprint": fingerprint,
        "outputs": {ws.rel(p): _hash_path(p) for p in phase.outputs(cfg, ws) if p.exists()},
    })


def _hash_path(path: Path) -> str | None:
    """Content hash of a file, or of every file under a folder (names included); None if absent."""
    path = Path(path)
    if not path.exists():
        return None
    digest = xxhash.xxh3_128()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with open(file, "rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


# --- process guards ----------------------------------------------------------------------


@contextmanager
def _exclusive(ws: Workspace) -> Iterator[None]:
    """One run per workspace. flock is released by the kernel if the process dies."""
    ws.state_dir.mkdir(parents=True, exist_ok=True)
    with open(ws.lock_file, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "?"
            raise FactoryError(f"another factory run (pid {holder}) is using {ws.root}; wait for it or stop it") from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextmanager
def _sigterm_as_cancel() -> Iterator[None]:
    """Turn SIGTERM into an exception, so the final status is written as for Ctrl-C."""
    def cancel(signum, frame):
        raise Cancelled("terminated by SIGTERM")

    try:
        previous = signal.signal(signal.SIGTERM, cancel)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def _log_to_file(ws: Workspace) -> Iterator[None]:
    ws.logs_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(ws.logs_dir / "factory.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("factory")
    root.addHandler(handler)
    previous_level = root.level
    root.setLevel(min(previous_level or logging.INFO, logging.INFO))
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)
        handler.close()

