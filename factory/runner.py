"""The phase runner: runs phases in order, skips unchanged ones, checks gates, writes status.

The engine knows nothing about what a phase does (see factory.phase for the contract),
like DVC's reproduce loop knows nothing about a stage's command. For each phase:

1. fingerprint its code, config sections and input files (factory.fingerprint); if that
   matches the last success and its outputs are untouched, skip it;
2. otherwise forget its last success, check that its outputs may be replaced, run it, write
   the metrics it returns to metrics/<stem>.json, store the fingerprint;
3. check the gates attached to it (also when skipped: thresholds may have changed), and
   stop the run on a failure; after they pass, run the phase's `after_gates` step.

Status is written at every change, refreshed by a heartbeat while the run lasts, and a final
state is written on the way out whatever happens (an error, a full disk, Ctrl-C, SIGTERM);
a status left "running" by a process killed outright is finalized by the next command.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Protocol

from factory import distributed
from factory import fingerprint as fingerprints
from factory.config import FactoryConfig
from factory.errors import Cancelled, FactoryError, GateFailed, disk_full, is_disk_full
from factory.gates import Gate, check_gate, gates_after, load_gates
from factory.io import read_json_if_exists, write_json
from factory.phase import Phase, PhaseContext
from factory.redact import RedactingFormatter, redact
from factory.report import REPORTED_METRICS, write_report
from factory.status import Heartbeat, StatusWriter, TrainingStatus, finalize_abandoned, run_lock
from factory.workspace import Workspace, check_replaceable, discard_unfinished, output_settings, record_created

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
    handoff: list[Path] = field(default_factory=list)
    """Files the phases' after_gates steps wrote (the model cards)."""


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
    distributed.check(cfg, selected)  # a strategy the engines would not run as asked: refused before anything runs
    gates = load_gates(ws, cfg)
    settings = output_settings(cfg, ws)  # none may be the workspace or contain it: refused before anything runs
    reporter = reporter or _Silent()
    result = RunResult()
    with run_lock(ws), _signals_as_cancel(), _log_to_file(ws, reporter):
        for rewritten in finalize_abandoned(ws, lock_held=True):
            reporter.note(f"{rewritten}: the previous run had disappeared without a final state; marked failed")
        for removed in discard_unfinished(ws):
            log.info("removed %s: the previous run stopped while writing it", removed)
        status = StatusWriter(ws, [p.name for p in pipeline], {p.name: p.summary for p in pipeline}, only or target)
        cache = fingerprints.HashCache(ws)
        heartbeat = Heartbeat(status)
        for phase in selected:
            status.reset_phase(phase.name)
        status.write()
        current: Phase | None = None
        try:
            with heartbeat:
                for phase in selected:
                    current = phase
                    ran = _run_one(phase, cfg, ws, status, reporter, force, result, options or {}, cache, heartbeat,
                                   settings)
                    stale_report = ran or not (ws.metrics_dir / "report.md").exists()
                    reported = phase.metrics in REPORTED_METRICS
                    try:
                        for gate in gates_after(gates, phase.name):
                            stale_report |= _check(gate, phase, ws, pipeline, status, reporter, result)
                    except GateFailed:
                        stale_report = reported = True  # a failed gate belongs in the report, after any phase
                        raise
                    finally:
                        if reported and stale_report:
                            _write_report(ws, reporter)
                    if phase.after_gates is not None:
                        _after_gates(phase, cfg, ws, reporter, result, cache)
                    current = None
        except BaseException as exc:
            exc = _as_user_error(exc, ws, f"running {current.name}" if current else "writing the run's results")
            error = {"type": _error_type(exc), "message": str(exc) or _error_type(exc)}
            cancelled = isinstance(exc, (KeyboardInterrupt, Cancelled))
            if current is not None and status.phase(current.name)["state"] == "running":
                status.phase_finished(current.name, "cancelled" if cancelled else "failed", error=error)
            status.finish("cancelled" if cancelled else "failed", error)
            if isinstance(exc, GateFailed):  # a failed gate is a result the tracker's run should show
                _log_to_trackers(ws, result, reporter)
            raise exc
        finally:
            _save_hash_cache(cache)
        status.finish("succeeded")
        _log_to_trackers(ws, result, reporter)
    return result


def _save_hash_cache(cache: fingerprints.HashCache) -> None:
    """What was hashed stays known after a failed run too; a cache that cannot be written
    (a full disk) only means hashing again."""
    try:
        cache.save()
    except OSError as e:
        log.warning("hash cache not saved: %s", e)


def _run_one(phase: Phase, cfg: FactoryConfig, ws: Workspace, status: StatusWriter, reporter: Reporter,
             force: bool, result: RunResult, options: dict, cache: fingerprints.HashCache, heartbeat: Heartbeat,
             settings: dict[Path, str]) -> bool:
    """Run or skip one phase; True when it ran."""
    metrics_path = ws.metrics_file(phase.metrics)
    fingerprint = fingerprints.compute(phase, cfg, ws, cache)
    reason = None if force else fingerprints.unchanged_reason(phase, cfg, ws, fingerprint, cache)
    if reason:
        status.phase_finished(phase.name, "skipped", reason=reason, metrics_file=ws.rel(metrics_path))
        reporter.phase_finished(phase, "skipped", 0.0, reason)
        result.skipped.append(phase.name)
        log.info("%s: skipped (%s)", phase.name, reason)
        return False

    for output in phase.outputs(cfg, ws):  # refuse before any work, not after an hour of it
        check_replaceable(ws, output, settings.get(Path(os.path.abspath(output)), f"the {phase.name} phase's output"))
    fingerprints.invalidate(ws, phase)
    _save_hash_cache(cache)  # what the phase hashes again (finetune's checkpoint identity) is then known
    status.phase_started(phase.name, ws.rel(metrics_path))
    reporter.phase_started(phase)
    log.info("%s: started", phase.name)
    started, started_wall = time.monotonic(), time.time()
    progress = _PhaseProgress(phase, status, reporter)
    training = TrainingStatus(ws, status.run_id, phase.name)
    heartbeat.writers.append(training)
    context = PhaseContext(cfg, ws, progress, logging.getLogger(f"factory.{phase.name}"), status.run_id,
                           training, options)
    try:
        metrics = distributed.run_phase(phase, context) if distributed.launches(phase, cfg) else phase.run(context)
        _raise_if_signalled()  # a cancellation the phase's code swallowed is still one
    except BaseException as exc:
        # after a signal the run is cancelled, whatever error the cancellation surfaced as on
        # its way out: a library's cleanup it broke (torch's "trying to pop from empty mode
        # stack" during model loading, then reported as a model that cannot be loaded, exit 2)
        cancellation = _cancellation()
        if cancellation is not None and not isinstance(exc, (KeyboardInterrupt, Cancelled)):
            cancellation.__context__ = exc
            exc = cancellation
        exc = _as_user_error(exc, ws, f"running {phase.name}")  # while the disk is as the failure left it
        try:
            discard_unfinished(ws)  # on a full disk, that is the space the final status needs
            _record_written_since(phase, cfg, ws, started_wall)
        except OSError as e:
            log.warning("could not tidy up after %s: %s", phase.name, e)
        cancelled = isinstance(exc, (KeyboardInterrupt, Cancelled))
        training.finish("cancelled" if cancelled else "failed", f"{_error_type(exc)}: {exc}")
        raise exc
    finally:
        heartbeat.writers.remove(training)
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
    for output in phase.outputs(cfg, ws):
        if output.exists():
            record_created(ws, output)
    fingerprints.store(phase, cfg, ws, fingerprint, status.run_id, cache)
    status.phase_finished(phase.name, "succeeded", metrics_file=ws.rel(metrics_path))
    reporter.phase_finished(phase, "succeeded", seconds, ws.rel(metrics_path))
    result.ran.append(phase.name)
    log.info("%s: succeeded in %.1fs; metrics in %s", phase.name, seconds, ws.rel(metrics_path))
    return True


def _record_written_since(phase: Phase, cfg: FactoryConfig, ws: Workspace, since: float) -> None:
    """Outputs a failed phase wrote whole before it failed are still the factory's to replace."""
    for output in phase.outputs(cfg, ws):
        try:
            stat = output.stat()
        except FileNotFoundError:
            continue
        if max(stat.st_mtime, stat.st_ctime) >= since - 1.0:
            record_created(ws, output)


def _after_gates(phase: Phase, cfg: FactoryConfig, ws: Workspace, reporter: Reporter, result: RunResult,
                 cache: fingerprints.HashCache) -> None:
    written = phase.after_gates(cfg, ws)
    if written:
        result.handoff += written
        fingerprints.refresh_outputs(phase, cfg, ws, cache)
        log.info("%s: wrote %s", phase.name, ", ".join(ws.rel(p) for p in written))


def _as_user_error(exc: BaseException, ws: Workspace, what: str) -> BaseException:
    """A full disk is the user's to fix, however deep in a library it surfaced: DiskFull
    (exit 2) naming the disk, instead of an internal error."""
    if not isinstance(exc, Exception) or isinstance(exc, FactoryError):
        return exc
    where = next((e.filename for e in _chain(exc) if isinstance(e, OSError) and e.filename), None) or ws.root
    if is_disk_full(exc, where):
        user_error = disk_full(where, what)
        user_error.__cause__ = exc
        return user_error
    return exc


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _check(gate: Gate, phase: Phase, ws: Workspace, pipeline: tuple[Phase, ...], status: StatusWriter,
           reporter: Reporter, result: RunResult) -> bool:
    """Check one gate; raise GateFailed when it fails. Returns whether its outcome differs from
    the last check's."""
    previous = read_json_if_exists(ws.gate_results_dir / f"{gate.name}.json") or {}
    outcome = check_gate(gate, ws, metrics_producers(pipeline), status.run_id)
    status.gate_checked(phase.name, outcome)
    reporter.gate_checked(outcome)
    result.gates.append(outcome)
    log.info("gate %s: %s", gate.name, "passed" if outcome["passed"] else "FAILED")
    if not outcome["passed"]:
        failed = [c["metric"] for c in outcome["criteria"] if c["passed"] is False]
        raise GateFailed(f"gate {gate.name} failed after {phase.name} on: {', '.join(failed)}", [outcome])
    return (previous.get("passed"), previous.get("criteria")) != (outcome["passed"], outcome["criteria"])


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
        _raise_if_signalled()
        self.done, self.total, self.unit = 0, total, unit
        self.status.phase_progress(self.phase.name, 0, total, unit, force=True)
        self.reporter.progress(self.phase, 0, total, unit)

    def advance(self, n: int = 1) -> None:
        _raise_if_signalled()
        self.done += n
        self.status.phase_progress(self.phase.name, self.done, self.total, self.unit)
        self.reporter.progress(self.phase, self.done, self.total, self.unit)

    def flush(self) -> None:
        if self.status.phase(self.phase.name)["progress"] is not None:
            self.status.phase_progress(self.phase.name, self.done, self.total, self.unit, force=True)


# --- process guards ----------------------------------------------------------------------


_signalled: int | None = None  # the SIGTERM or SIGINT this run received (signal handlers are per process)


def _cancel(signum: int, frame) -> None:
    global _signalled
    _signalled = signum
    _raise_if_signalled()


def _cancellation() -> BaseException | None:
    """The cancellation a signal asked for (Cancelled for SIGTERM, KeyboardInterrupt for
    Ctrl-C), or None when none came."""
    if _signalled == signal.SIGTERM:
        return Cancelled("terminated by SIGTERM")
    if _signalled == signal.SIGINT:
        return KeyboardInterrupt()
    return None


def _raise_if_signalled() -> None:
    """Raise the cancellation a signal asked for. The handler raises it at once; this raises it
    again at the next progress step and at the end of each phase, because Python drops an
    exception raised while a finalizer runs ("Exception ignored in ...: KeyboardInterrupt", a
    weakref callback during garbage collection): a Ctrl-C during quantize was lost that way and
    the run went on to succeed."""
    cancellation = _cancellation()
    if cancellation is not None:
        raise cancellation


@contextmanager
def _signals_as_cancel() -> Iterator[None]:
    """Turn SIGTERM and Ctrl-C into exceptions that are not lost, so the final status is written."""
    global _signalled
    _signalled = None
    try:
        previous = {signum: signal.signal(signum, _cancel) for signum in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class _WarningsToTerminal(logging.Handler):
    """Warnings of the factory's loggers as notes on the terminal, where they are read, each
    once a run (each phase that builds the chat format says the same); the log file keeps them
    all, with their tracebacks."""

    def __init__(self, reporter: Reporter):
        super().__init__(logging.WARNING)
        self.reporter = reporter
        self.shown: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = redact(record.getMessage())
            if message not in self.shown:
                self.shown.add(message)
                self.reporter.note(f"warning: {message}")
        except Exception:  # a broken terminal must not fail the run; the file has the warning
            self.handleError(record)


@contextmanager
def _log_to_file(ws: Workspace, reporter: Reporter) -> Iterator[None]:
    """The factory's log to logs/factory.log, and its warnings to the terminal."""
    ws.logs_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(ws.logs_dir / "factory.log", encoding="utf-8")
    handler.setFormatter(RedactingFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    shown = _WarningsToTerminal(reporter)
    root = logging.getLogger("factory")
    root.addHandler(handler)
    root.addHandler(shown)
    previous_level = root.level
    root.setLevel(min(previous_level or logging.INFO, logging.INFO))
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.removeHandler(shown)
        root.setLevel(previous_level)
        handler.close()

