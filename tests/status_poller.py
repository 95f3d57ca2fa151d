"""Shared by the tests that watch a real run: both status files read while it writes them."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from factory.resources import validate


class StatusPoller:
    """Reads .factory/status.json and training-status.json while a run writes them; every read
    must validate against its schema (a problem is recorded, not raised, so the run goes on)."""

    def __init__(self, root: Path):
        self.files = {"status": root / ".factory" / "status.json",
                      "training-status": root / ".factory" / "training-status.json"}
        self.reads: list[tuple[str, dict]] = []
        self.problems: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _poll(self):
        while not self._stop.is_set():
            for schema, file in self.files.items():
                try:
                    doc = json.loads(file.read_bytes())
                    validate(doc, schema)
                    self.reads.append((schema, doc))
                except FileNotFoundError:
                    pass
                except Exception as e:
                    self.problems.append(repr(e))
            time.sleep(0.02)

    def training(self) -> list[dict]:
        """The training-status documents read, in order."""
        return [doc for schema, doc in self.reads if schema == "training-status"]
