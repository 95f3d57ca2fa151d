"""What a person sees in the terminal: progress bars while phases run, tables after.

Rich progress bars on a terminal; plain, timestamp-free lines when the output is a pipe
or a CI log, so logs stay readable.
"""

from __future__ import annotations

import time
from datetime import datetime

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from factory.status import guard_for_fork, read_status, unguard_for_fork
from factory.workspace import Workspace

STATE_STYLE = {
    "pending": "dim",
    "running": "cyan",
    "succeeded": "green",
    "skipped": "blue",
    "failed": "red",
    "cancelled": "yellow",
    "idle": "dim",
}
PLAIN_INTERVAL_S = 5.0


class RunReporter:
    """The runner's Reporter for the CLI."""

    def __init__(self, console: Console):
        self.console = console
        self.live = console.is_terminal
        self._bars = Progress(
            TextColumn("{task.description:<10}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[unit]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not self.live,
        )
        self._tasks: dict[str, TaskID] = {}
        self._last_line = 0.0
        self._origin: dict[str, tuple[float, int, str]] = {}  # per phase: when counting began, at what, in what unit

    def __enter__(self) -> "RunReporter":
        self._bars.__enter__()
        # the display's refresh thread draws only while it holds the display's lock: guarded by
        # it, a phase's worker processes can still be forked (spawned, each imports numpy and
        # the phase again: about a second more at the start of each pool)
        self._refresher = getattr(self._bars.live, "_refresh_thread", None)
        if self._refresher is not None:
            guard_for_fork(self._refresher, self._bars.live._lock)
        return self

    def __exit__(self, *exc) -> None:
        self._bars.__exit__(*exc)
        if self._refresher is not None:
            self._refresher.join(timeout=5)  # told to stop, it ends at once
            unguard_for_fork(self._refresher)

    def phase_started(self, phase) -> None:
        self._tasks[phase.name] = self._bars.add_task(phase.name, total=None, unit="")
        if not self.live:
            self.console.print(escape(f"{phase.name}: started ({phase.summary})"), highlight=False)

    def progress(self, phase, done: int, total: int | None, unit: str) -> None:
        task = self._tasks.get(phase.name)
        if task is not None:
            self._bars.update(task, completed=done, total=total, unit=unit)
        now = time.monotonic()
        origin = self._origin.get(phase.name)
        if origin is None or origin[2] != unit or done < origin[1]:  # a new count (e.g. the next split scored)
            origin = self._origin[phase.name] = (now, done, unit)
        # 0 of an unknown total says nothing the "started" line did not ("format: 0 records" read as a result)
        if not self.live and (done or total) and now - self._last_line >= PLAIN_INTERVAL_S:
            self._last_line = now
            line = f"{phase.name}: {done}{f'/{total}' if total else ''} {unit}"
            if total and done > origin[1]:
                rate = (done - origin[1]) / (now - origin[0])
                line += f", {rate:.3g}/s, ETA {duration((total - done) / rate)}"
            self.console.print(escape(line), highlight=False)

    def phase_finished(self, phase, state: str, seconds: float, note: str) -> None:
        task = self._tasks.pop(phase.name, None)
        if task is not None:
            self._bars.remove_task(task)
        style = STATE_STYLE.get(state, "")
        detail = f"{seconds:.1f}s" if state == "succeeded" else note
        self.console.print(f"[{style}]{phase.name}: {state}[/] ({escape(detail)})", highlight=False)

    def gate_checked(self, result: dict) -> None:
        verdict = "[green]passed[/]" if result["passed"] else "[red]FAILED[/]"
        self.console.print(f"  gate {result['gate']}: {verdict}", highlight=False)

    def note(self, message: str) -> None:
        self.console.print(f"  {escape(message)}", highlight=False)

    def summary(self, ws: Workspace) -> None:
        doc = read_status(ws)
        if doc:
            self.console.print(status_table(doc))


def status_table(doc: dict) -> Table:
    state = doc["state"]
    title = f"pipeline: [{STATE_STYLE.get(state, '')}]{state}[/]"
    if doc.get("run_id"):
        title += f"  run {doc['run_id']}"
    if doc.get("error"):
        title += f"\n[red]{doc['error']['type']}: {doc['error']['message']}[/]"
    table = Table(title=title, title_justify="left")
    for column in ("phase", "state", "started", "duration", "progress", "gates", "note"):
        table.add_column(column)
    for p in doc["phases"]:
        progress = ""
        if p.get("progress"):
            pr = p["progress"]
            progress = f"{pr['done']}/{pr['total']} {pr['unit']}" if pr["total"] else f"{pr['done']} {pr['unit']}"
        gates = ", ".join(f"{g['name']} {'✓' if g['passed'] else '✗'}" for g in p["gates"])
        note = (p.get("error") or {}).get("message") or p.get("reason") or ""
        table.add_row(
            p["name"],
            f"[{STATE_STYLE.get(p['state'], '')}]{p['state']}[/]",
            _clock(p["started_at"]),
            f"{p['duration_seconds']:.1f}s" if p["duration_seconds"] is not None else "",
            progress,
            gates,
            note,
        )
    return table


def duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _clock(timestamp: str | None) -> str:
    if not timestamp:
        return ""
    return datetime.fromisoformat(timestamp).astimezone().strftime("%H:%M:%S")
