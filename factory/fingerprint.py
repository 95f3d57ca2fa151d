"""What a phase's output depends on, and a cache that makes checking it cheap.

A phase's fingerprint holds:
- the code: every file of the installed `factory` and `phases` packages (a change anywhere
  in the engine or a helper can change an output, not only the phase's own module), and the
  versions of the libraries the phase names (`Phase.libraries`);
- the config sections and keys the phase names (`Phase.config_sections`);
- the content of its input files and folders (`Phase.inputs`);
- for a phase that reads `model`, a hub model id's resolved commit (factory.hub).

Content hashes (factory.io.content_digest) of large inputs are kept in .factory/hash-cache.json
by (size, mtime, ctime, inode), as DVC's state cache does: an 8 GB model folder is read once,
and later runs only `stat` it. A file a phase wrote through AtomicOutput is not read at all:
its digest was computed as it was written. A file modified within the last seconds is not
cached (its timestamp may not yet tell two writes apart), so it is hashed again next time.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from factory import __version__
from factory.config import FactoryConfig
from factory.io import content_digest, file_digest, stat_key, write_json, written_digest
from factory.workspace import Workspace

if TYPE_CHECKING:
    from factory.phase import Phase

CODE_PACKAGES = ("factory", "phases")
RACY_SECONDS = 2.0  # files changed more recently than this are hashed again next time


@functools.cache
def code_digest() -> str:
    """One hash over every file of the installed factory and phases packages (names included)."""
    digest = content_digest()
    for package in CODE_PACKAGES:
        spec = importlib.util.find_spec(package)
        root = Path(spec.origin).parent
        for file in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            digest.update(f"{package}/{file.relative_to(root).as_posix()}\0".encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()


@functools.cache
def library_version(distribution: str) -> str | None:
    """The installed version of a distribution (None: not installed), without importing it."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


class HashCache:
    """Content digests of files, recognised by (size, mtime, ctime, inode) while unchanged. A
    file changed in the last RACY_SECONDS is not saved for the next run (a change in the same
    clock tick would leave its key as it was), but kept for this one: a phase's output, just
    hashed as the phase ends, is the next phase's input."""

    def __init__(self, ws: Workspace):
        self.file = ws.hash_cache_file
        try:
            self.entries: dict[str, list] = orjson.loads(self.file.read_bytes())["files"]
        except (FileNotFoundError, orjson.JSONDecodeError, KeyError, TypeError):
            self.entries = {}
        self.racy: dict[str, list] = {}  # for this run only
        self.dirty = False

    def file_digest(self, path: Path) -> str:
        path = Path(os.path.abspath(path))
        stat = path.stat()
        key = stat_key(stat)
        for cached in (self.entries.get(str(path)), self.racy.get(str(path))):
            if cached is not None and cached[:4] == key:
                return cached[4]
        value = written_digest(path, key) or file_digest(path)
        if time.time_ns() - max(stat.st_mtime_ns, stat.st_ctime_ns) > RACY_SECONDS * 1e9:
            self.entries[str(path)] = [*key, value]
            self.dirty = True
        else:
            self.racy[str(path)] = [*key, value]
        return value

    def path_digest(self, path: Path) -> str | None:
        """Digest of a file, or of every file under a folder (their names included); None if absent."""
        path = Path(path)
        if not path.exists():
            return None
        if not path.is_dir():
            return self.file_digest(path)
        digest = content_digest()
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{file.relative_to(path).as_posix()}\0{self.file_digest(file)}\0".encode())
        return digest.hexdigest()

    def save(self) -> None:
        if self.dirty:
            live = {name: entry for name, entry in self.entries.items() if os.path.exists(name)}
            write_json(self.file, {"schema_version": 1, "files": live})
            self.dirty = False


def compute(phase: "Phase", cfg: FactoryConfig, ws: Workspace, cache: HashCache) -> dict:
    """What the phase's output depends on (see the module docstring)."""
    fingerprint = {
        "factory_version": __version__,
        "code": code_digest(),
        "libraries": {name: library_version(name) for name in phase.libraries},
        "config": {s: cfg.section(s) for s in phase.config_sections},
        "inputs": {ws.rel(p): cache.path_digest(p) for p in phase.inputs(cfg, ws)},
    }
    if "model" in phase.config_sections and not ws.path(cfg.model.name).is_dir():
        fingerprint["model_revision"] = base_model_identity(cfg, ws, cache)
    return fingerprint


def base_model_identity(cfg: FactoryConfig, ws: Workspace, cache: HashCache) -> str:
    """What model.name loads: a local folder's content digest, or a hub id's resolved commit."""
    folder = ws.path(cfg.model.name)
    if folder.is_dir():
        return cache.path_digest(folder)
    from factory import hub

    return hub.resolved_revision(cfg.model.name)


def output_digests(phase: "Phase", cfg: FactoryConfig, ws: Workspace, cache: HashCache) -> dict[str, str]:
    return {ws.rel(p): cache.path_digest(p) for p in phase.outputs(cfg, ws) if p.exists()}


def stored(ws: Workspace, phase: "Phase") -> dict | None:
    try:
        return orjson.loads((ws.fingerprints_dir / f"{phase.name}.json").read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return None


def unchanged_reason(phase: "Phase", cfg: FactoryConfig, ws: Workspace, fingerprint: dict, cache: HashCache) -> str | None:
    """Why the phase may be skipped, or None when it must run."""
    record = stored(ws, phase)
    if record is None or record.get("fingerprint") != fingerprint or not ws.metrics_file(phase.metrics).exists():
        return None
    for rel, digest in record.get("outputs", {}).items():
        if cache.path_digest(ws.path(rel)) != digest:
            return None
    return "code, config, inputs and outputs unchanged since the last success"


def store(phase: "Phase", cfg: FactoryConfig, ws: Workspace, fingerprint: dict, run_id: str, cache: HashCache) -> None:
    write_json(ws.fingerprints_dir / f"{phase.name}.json", {
        "schema_version": 1,
        "phase": phase.name,
        "run_id": run_id,
        "fingerprint": fingerprint,
        "outputs": output_digests(phase, cfg, ws, cache),
    })


def refresh_outputs(phase: "Phase", cfg: FactoryConfig, ws: Workspace, cache: HashCache) -> None:
    """After the runner itself added to a phase's outputs (model cards): the stored digests
    follow, so that the next run does not take its own addition for a change."""
    record = stored(ws, phase)
    if record is not None:
        record["outputs"] = output_digests(phase, cfg, ws, cache)
        write_json(ws.fingerprints_dir / f"{phase.name}.json", record)


def invalidate(ws: Workspace, phase: "Phase") -> None:
    """Forget the phase's last success before it touches its outputs (as DVC drops a stage's
    lock entry): a run killed halfway is then never taken for the earlier success."""
    (ws.fingerprints_dir / f"{phase.name}.json").unlink(missing_ok=True)
