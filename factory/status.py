"""The pipeline status file, .factory/status.json, owned by the runner.

Every change is written atomically (temp file + rename) with a sequence number that only
increases, across runs too, so a poller never reads a torn file and can order what it reads.
Progress updates are throttled; state changes are written at once.
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import datetime, timezone
from typing import Any

import orjson

from factory.io import atomic_write_bytes, write_json
from factory.workspace import Workspace

PROGRESS_INTERVAL_S = 0.5


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def read_status(ws: Workspace) -> dict | None:
    """The last status written, or None when there is none (or it is unreadable)."""
    try:
        return orjson.loads(ws.status_file.read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None


def read_training_status(ws: Workspace) -> dict | None:
    """The last training status written, or None when there is none (or it is unreadable)."""
    try:
        return orjson.loads(ws.training_status_file.read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None


def runner_alive(doc: dict) -> bool:
    """Whether the process that wrote a "running" status still exists: a run killed with
    SIGKILL cannot write its final state, so its file says "running" forever."""
    if doc.get("state") != "running" or not doc.get("pid"):
        return False
    try:
        os.kill(doc["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


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


class StatusWriter:
    """Holds the run's status in memory and writes it on every change."""

    def __init__(self, ws: Workspace, phase_names: list[str], summaries: dict[str, str], target: str | None):
        self.ws = ws
        previous = read_status(ws)
        self._seq = previous["seq"] if previous else 0
        # Phases not part of this run keep what the last run recorded for them.
        earlier = {p["name"]: p for p in (previous or {}).get("phases", [])}
        self.doc = {
            "schema_version": 1,
            "run_id": uuid.uuid4().hex[:12],
            "seq": self._seq,
            "state": "running",
            "target": target,
            "started_at": now_iso(),
            "updated_at": now_iso(),
            "ended_at": None,
            "pid": os.getpid(),
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
        self._seq += 1
        self.doc["seq"] = self._seq
        self.doc["updated_at"] = now_iso()
        write_json(self.ws.status_file, self.doc)

    def reset_phase(self, name: str) -> None:
        """Mark a phase of this run pending again (it is about to be run or skipped)."""
        entry = self.phase(name)
        summary = entry.get("summary", "")
        entry.clear()
        entry.update(_pending(name, summary))

    def phase_started(self, name: str, metrics_file: str) -> None:
        self.phase(name).update(state="running", started_at=now_iso(), metrics_file=metrics_file)
        self.write()

    def phase_progress(self, name: str, done: int, total: int | None, unit: str, force: bool = False) -> None:
        self.phase(name)["progress"] = {"done": done, "total": total, "unit": unit}
        now = time.monotonic()
        if force or now - self._last_progress_write >= PROGRESS_INTERVAL_S:
            self._last_progress_write = now
            self.write()

    def phase_finished(self, name: str, state: str, *, reason: str | None = None, error: dict | None = None,
                       metrics_file: str | None = None) -> None:
        entry = self.phase(name)
        ended = now_iso()
        started = entry["started_at"] or ended
        entry.update(state=state, ended_at=ended, reason=reason, error=error)
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
        self.doc.update(state=state, ended_at=now_iso(), error=error)
        self.write()


class TrainingStatus:
    """.factory/training-status.json, the live view of a training phase (seed 004's fields).

    The phase reports through `update(...)` (via its context); the runner creates this object,
    and writes the final state itself when the phase ends, whether it succeeded, failed or
    was interrupted, so the file never stays "running" after the process is gone.
    """

    LIVE_FIELDS = {"step", "total_steps", "epoch", "total_epochs", "loss", "learning_rate", "eta_seconds",
                   "checkpoint_at", "backend", "backend_reason", "eval_loss", "best_eval_loss"}

    def __init__(self, ws: Workspace, run_id: str, phase: str):
        self.ws, self.run_id, self.phase = ws, run_id, phase
        self.doc: dict | None = None
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
        if self.doc is None:
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
                "started_at": now_iso(),
                "checkpoint_at": None,
                "error": None,
                "status": "running",
                "phase": self.phase,
                "backend": None,
                "backend_reason": None,
                "seq": self._seq,
                "updated_at": now_iso(),
                "run_id": self.run_id,
                "eval_loss": None,
                "best_eval_loss": None,
            }
        if not self._history_started and ("step" in fields or "loss" in fields):
            self._start_history(fields.get("step", self.doc["step"]))
        self.doc.update(fields)
        self._write()
        if fields.get("loss") is not None:
            self._append_history({"loss": self.doc["loss"], "learning_rate": self.doc["learning_rate"]})
        if fields.get("eval_loss") is not None:
            self._append_history({"eval_loss": self.doc["eval_loss"]})

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
        if self.doc is None or not self.doc["running"]:
            return
        self.doc.update(running=False, status=status, error=error, eta_seconds=0.0 if status == "succeeded" else None)
        self._write()

    def _write(self) -> None:
        self._seq += 1
        self.doc["seq"] = self._seq
        self.doc["updated_at"] = now_iso()
        write_json(self.ws.training_status_file, self.doc)
